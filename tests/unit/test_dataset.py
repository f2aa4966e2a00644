"""Data preparation: document separator for continued pre-training, the token cache and its key."""

from __future__ import annotations

from helpers.runs import make_config, write_instruction_data, write_text_data
from tuneforge.data import builders as builders_mod
from tuneforge.data.dataset import prepare_data


def test_clm_blocks_join_documents_with_the_document_separator(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = make_config(tiny_model_dir, write_text_data(tmp_path / "docs", docs=6), tmp_path / "run", method="clm")
    data = prepare_data(cfg, tiny_tokenizer, "text_blocks")
    sep = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [t for i in range(len(data.train)) for t in data.train[i].input_ids]
    assert ids.count(sep) == 6 and eot not in ids
    assert all(len(data.train[i]) == cfg.data.max_length for i in range(len(data.train) - 1))
    assert all(sum(data.train[i].loss_mask) == len(data.train[i]) - 1 for i in range(len(data.train)))


def test_cache_is_reused_and_its_key_covers_what_changes_tokens(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                monkeypatch):
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl"), tmp_path / "run")
    first = prepare_data(cfg, tiny_tokenizer, "chat")
    calls = []
    real = builders_mod.tokenize_chat
    monkeypatch.setattr(builders_mod, "tokenize_chat", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = prepare_data(cfg, tiny_tokenizer, "chat")
    assert not calls and again.train.folder == first.train.folder
    assert [again.train[i].input_ids for i in range(3)] == [first.train[i].input_ids for i in range(3)]
    cfg.data.mask = "all"
    changed = prepare_data(cfg, tiny_tokenizer, "chat")
    assert calls and changed.train.folder != first.train.folder
    assert sum(changed.train[0].loss_mask) > sum(first.train[0].loss_mask)


def test_over_long_examples_are_dropped_and_counted(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "short", "output": "ok"}\n'
                    + '{"instruction": "' + "long " * 200 + '", "output": "ok"}\n')
    cfg = make_config(tiny_model_dir, path, tmp_path / "run")
    cfg.data.max_length = 64
    data = prepare_data(cfg, tiny_tokenizer, "chat")
    assert len(data.train) == 1 and data.stats["train"]["dropped_too_long"] == 1
    cfg.data.truncation = "left"
    data = prepare_data(cfg, tiny_tokenizer, "chat")
    assert len(data.train) == 2 and data.stats["train"]["truncated_left"] == 1


def test_cache_lengths_at_once_equal_each_examples_length(tiny_model_dir, tmp_path):
    """Packing and length grouping read every example's length through `lengths()` (from the offsets)."""
    from helpers.runs import method_config
    from tuneforge.models.load import load_tokenizer
    from tuneforge.run import prepare
    tok = load_tokenizer(str(tiny_model_dir))
    for method in ("sft", "dpo"):  # one sequence per example; two (chosen, rejected)
        data = prepare(method_config(method, tiny_model_dir, tmp_path / "data", tmp_path / method), tok).train
        assert data.lengths() == [data.length(i) for i in range(len(data))] and len(data) > 0
