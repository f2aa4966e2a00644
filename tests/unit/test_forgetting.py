"""Forgetting: general-text perplexity, by hand on the tiny model, and the shipped general text."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from helpers.runs import make_config
from tuneforge.eval.forgetting import (GENERAL_TEXT, forgetting_row, general_blocks, general_perplexity,
                                       measures_forgetting)
from tuneforge.models.heads import TrainModule
from tuneforge.train.loop import make_autocast


def _cfg(tmp_path, tiny_model_dir, **eval_kw):
    cfg = make_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out")
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.max_length, cfg.eval.forgetting = 32, True
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    return cfg


def test_perplexity_equals_a_hand_computation(tmp_path, tiny_model_dir, tiny_tokenizer):
    text = tmp_path / "general.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6 + "\n\nA second document, shorter.\n")
    cfg = _cfg(tmp_path, tiny_model_dir, general_text=str(text), general_tokens=10_000)
    blocks = general_blocks(cfg, tiny_tokenizer)
    assert len(blocks) >= 2 and all(len(b) <= 32 for b in blocks)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    got = general_perplexity(TrainModule(model), tiny_tokenizer, blocks, 3, make_autocast("none", torch.device("cpu")),
                             torch.device("cpu"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:  # every token after a block's first is predicted from the ones before it
            ids = torch.tensor([b.input_ids])
            logits = model(ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += len(b) - 1
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_general_tokens_caps_the_blocks(tmp_path, tiny_model_dir, tiny_tokenizer):
    cfg = _cfg(tmp_path, tiny_model_dir, general_tokens=100)
    blocks = general_blocks(cfg, tiny_tokenizer)
    assert 100 <= sum(len(b) for b in blocks) < 100 + 32  # whole blocks until the budget is reached


def test_forgetting_row_by_hand():
    row = forgetting_row({"perplexity": 10.0}, {"perplexity": 12.5, "tokens": 900}, "g")
    assert row == {"general_text": "g", "tokens": 900, "after": 12.5, "before": 10.0, "change": pytest.approx(0.25)}
    assert "change" not in forgetting_row(None, {"perplexity": 3.0, "tokens": 1}, "g")


def test_measured_for_language_models_only(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    assert measures_forgetting(cfg)
    cfg.eval.forgetting = False
    assert not measures_forgetting(cfg)
    for method in ("contrastive", "reward"):
        other = make_config(tiny_model_dir, tmp_path / "d.jsonl", tmp_path / "out", method=method)
        other.eval.forgetting = True
        assert not measures_forgetting(other), method


def test_the_shipped_general_text_is_real_and_not_reserved():
    docs = [json.loads(x) for x in GENERAL_TEXT.read_text(encoding="utf-8").splitlines()]
    assert len(docs) > 100 and sum(len(d["text"]) for d in docs) > 100_000
    sources = {d["source"].split(":")[0] for d in docs}
    assert sources == {"python 3.11 stdlib", "licence text"}
    from pydoc_data.topics import topics  # read only to check that none of it is in the set
    reserved = " ".join(" ".join(t.split()) for t in topics.values())
    for d in docs:
        assert " ".join(d["text"].split())[:200] not in reserved, d["source"]
