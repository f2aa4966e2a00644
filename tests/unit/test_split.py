"""Held-out split: seeded and streaming, duplicates never straddle train and eval."""

from __future__ import annotations

import json

from helpers.runs import make_config
from tuneforge.data.dataset import prepare_data
from tuneforge.data.records import ChatRecord, InstructionRecord, Message, PairRecord, TextRecord
from tuneforge.data.split import in_eval_split, record_key


def test_split_is_seeded_deterministic_and_near_the_fraction():
    keys = [f"record {i}" for i in range(4000)]
    a = [in_eval_split(k, 0.1, seed=0) for k in keys]
    assert a == [in_eval_split(k, 0.1, seed=0) for k in keys]
    assert 0.08 < sum(a) / len(a) < 0.12
    assert a != [in_eval_split(k, 0.1, seed=1) for k in keys]
    assert not any(in_eval_split(k, 0.0, seed=0) for k in keys)


def test_record_key_identifies_content_across_forms():
    inst = InstructionRecord("Say hi", "hi")
    as_chat = ChatRecord([Message("user", "Say hi"), Message("assistant", "hi")])
    assert record_key(inst) == record_key(as_chat)
    assert record_key(TextRecord("x")) != record_key(PairRecord("x", "y"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_file_duplicates_removed_from_train(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(10)]
    train = _write(tmp_path / "train.jsonl", rows)
    ev = _write(tmp_path / "eval.jsonl", rows[:3] + [{"instruction": "new", "output": "x"}])
    cfg = make_config(tiny_model_dir, train, tmp_path / "run")
    cfg.data.eval = str(ev)
    data = prepare_data(cfg, tiny_tokenizer, "chat")
    assert data.stats["duplicates_removed"] == 3
    assert len(data.train) == 7 and len(data.eval) == 4 and len(data.eval_records) == 4


def test_fraction_split_keeps_duplicates_on_one_side(tmp_path, tiny_model_dir, tiny_tokenizer):
    rows = [{"instruction": f"Q{i % 40}", "output": f"A{i % 40}"} for i in range(80)]  # each record twice
    cfg = make_config(tiny_model_dir, _write(tmp_path / "train.jsonl", rows), tmp_path / "run")
    cfg.data.eval_fraction = 0.25
    data = prepare_data(cfg, tiny_tokenizer, "chat")
    held_out = {record_key(r) for r in data.eval_records}
    assert 0 < len(held_out) < 40
    assert len(data.eval) == len(held_out)  # the second copy of a held-out record is not held out twice
    assert data.stats["duplicates_removed"] == len(held_out)
    assert len(data.train) == 80 - 2 * len(held_out)
