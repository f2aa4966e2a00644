"""Defects of the data layer, each pinned by a test that failed before its fix."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest

from helpers.runs import make_config, write_instruction_data, write_text_data
from tuneforge.data import builders as builders_mod, dataset as dataset_mod
from tuneforge.data.builders import BuildStats
from tuneforge.data.records import TextRecord
from tuneforge.data.dataset import prepare_data
from tuneforge.models.tiny import make_tiny_tokenizer


class _CountingList(list):
    """A list that counts the elements its slicing and prefix deletions copy or move."""

    copied = 0

    def __getitem__(self, index):
        out = super().__getitem__(index)
        if isinstance(index, slice):
            _CountingList.copied += len(out)
            return _CountingList(out)
        return out

    def __delitem__(self, index):
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            _CountingList.copied += len(self) - stop  # the elements after the cut move down
        super().__delitem__(index)


class _FakeTokenizer:
    eos_token = None

    def __init__(self, n):
        self.n = n

    def __call__(self, text, **kwargs):
        return {"input_ids": list(range(self.n))}

    def get_vocab(self):
        return {"<|endoftext|>": 9999}


class _ListWriter:
    def __init__(self):
        self.examples = []

    def add(self, ex):
        self.examples.append(ex)


def test_clm_block_builder_copies_each_token_a_bounded_number_of_times():
    """One long document cut into blocks: slicing the buffer head again and again was quadratic
    (67 s of list copies for a 4M-token document)."""
    n_tokens, block = 4003, 8  # 500 full blocks and a tail of 4 (3 tokens + separator)
    writer = _ListWriter()
    data = SimpleNamespace(max_length=block, doc_separator=None)
    packer = builders_mod.TextBlocks(_FakeTokenizer(n_tokens), data, writer, BuildStats())
    packer.buffer = _CountingList()
    _CountingList.copied = 0
    packer.add(TextRecord("a long document"))
    packer.close()
    assert sum(len(ex.input_ids) for ex in writer.examples) == n_tokens + 1
    assert all(len(ex.input_ids) == block for ex in writer.examples[:-1])
    assert _CountingList.copied <= 3 * (n_tokens + 1), _CountingList.copied  # linear, not ~n^2 / (2 block)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_long_documents_tokenise_without_the_sequence_length_warning(tmp_path, tiny_model_dir):
    """Blocks are cut to data.max_length, so transformers' "longer than the specified maximum" warning is
    noise. transformers' logger does not propagate to the root (caplog misses it): listen on it directly."""
    tok = make_tiny_tokenizer()
    tok.model_max_length = 16  # every 60-word document is longer
    cfg = make_config(tiny_model_dir, write_text_data(tmp_path / "docs", docs=3), tmp_path / "run", method="clm")
    collect = _Collect()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(collect)
    try:
        data = prepare_data(cfg, tok, "text_blocks")
    finally:
        hf_logger.removeHandler(collect)
    assert len(data.train) > 3
    assert not [m for m in collect.messages if "longer than the specified maximum" in m], collect.messages


def test_a_kill_between_the_splits_leaves_no_half_cache_entry(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                              monkeypatch):
    """The train and eval caches were renamed into place one after the other: a kill between the two left
    a train cache without its eval cache, and every later run failed with a raw FileNotFoundError."""
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl", n=12), tmp_path / "run")
    cfg.data.eval_fraction = 0.25
    finish = dataset_mod.CacheWriter.finish
    calls = []

    def killed_at_the_second_split(self, meta):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the splits")
        return finish(self, meta)

    monkeypatch.setattr(dataset_mod.CacheWriter, "finish", killed_at_the_second_split)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, tiny_tokenizer, "chat")
    monkeypatch.setattr(dataset_mod.CacheWriter, "finish", finish)
    data = prepare_data(cfg, tiny_tokenizer, "chat")  # rebuilt cleanly
    assert len(data.train) + len(data.eval) == 12
    again = prepare_data(cfg, tiny_tokenizer, "chat")  # and then reused
    assert again.train.folder == data.train.folder and len(again.eval) == len(data.eval)


def test_a_half_written_cache_entry_on_disk_is_rebuilt(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl", n=12), tmp_path / "run")
    first = prepare_data(cfg, tiny_tokenizer, "chat")
    entry = first.train.folder.parent
    for leftover in ("eval", "meta.json"):  # what a kill between the two renames left behind
        path = entry / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    data = prepare_data(cfg, tiny_tokenizer, "chat")
    assert len(data.train) == 12 and (entry / "eval").is_dir()
