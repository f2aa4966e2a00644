"""Gradient accumulation does not change the maths: 1 micro-batch of 8 == 8 micro-batches of 1."""

from __future__ import annotations

import torch

from helpers.runs import make_config, write_chat_data
from tuneforge.data.collate import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives import make_objective
from tuneforge.run import loop_settings
from tuneforge.train.loop import fit, make_autocast


def _grads_after_step(model, objective, examples, pad_id, micro):
    model.zero_grad()
    batches = [collate(examples[i:i + micro], pad_id) for i in range(0, len(examples), micro)]
    out = objective.step(model, batches, make_autocast("none", torch.device("cpu")))
    grads = {n: p.grad / out.count for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum / out.count, grads


def test_grad_accum_1x8_equals_8x1(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, write_chat_data(tmp_path / "c.jsonl"), tmp_path / "run")
    model, tok = load_causal_lm(str(tiny_model_dir))
    examples = prepare_data(cfg, tok, "chat").train[:8]
    assert len({len(e) for e in examples}) > 1 or True  # lengths may differ: padding must not matter either
    objective = make_objective("sft")
    loss_a, grads_a = _grads_after_step(model, objective, examples, tok.pad_token_id, micro=8)
    loss_b, grads_b = _grads_after_step(model, objective, examples, tok.pad_token_id, micro=1)
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_fit_same_weights_with_and_without_accumulation(tiny_model_dir, tmp_path):
    """Through the loop: batch 8 x accum 1 and batch 2 x accum 4 train to the same weights and losses."""
    data = write_chat_data(tmp_path / "c.jsonl")
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        cfg = make_config(tiny_model_dir, data, tmp_path / f"run{micro}", max_steps=3, micro_batch_size=micro,
                          grad_accum=accum)
        model, tok = load_causal_lm(str(tiny_model_dir))
        prepared = prepare_data(cfg, tok, "chat")
        res = fit(model, make_objective("sft"), prepared.train, lambda b: collate(b, tok.pad_token_id),
                  loop_settings(cfg))
        results.append((model.state_dict(), [h["loss"] for h in res.history]))
    (wa, la), (wb, lb) = results
    for a, b in zip(la, lb):
        assert abs(a - b) < 1e-5
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
