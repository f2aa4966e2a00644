"""Optimizer groups and the learning-rate schedule."""

from __future__ import annotations

import pytest

from tuneforge.train.optim import lr_at, make_optimizer


def test_schedule_warmup_then_decay():
    lrs = [lr_at(s, 10, 1.0, 2, "cosine") for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 0.05
    assert [lr_at(s, 10, 1.0, 0, "linear") for s in (0, 5)] == pytest.approx([1.0, 0.5])
    assert lr_at(7, 10, 1.0, 2, "constant") == 1.0
    assert lr_at(9, 10, 1.0, 0, "cosine", min_ratio=0.1) >= 0.1


def test_no_weight_decay_on_lora_bias_and_norm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.adapters.lora import apply_lora
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), r=2, alpha=4)
    opt = make_optimizer(model, 1e-3, 0.1)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # LoRA only: nothing decays
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = make_optimizer(full, 1e-3, 0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in full.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and "norm" not in name), name
