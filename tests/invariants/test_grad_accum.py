"""Gradient accumulation does not change the maths, for every registered method: 1 micro-batch of 8 ==
8 micro-batches of 1 (methods that train on the data as it is), and through the loop batch 8 x accum 1 ==
batch 2 x accum 4; online RL, whose samples must not depend on how the step's prompts are split (into
micro-batches or decoding batches), 4 x 1 == 1 x 4 == 2 x 2 with three rl.rollout_batch_size values."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import load_for_method, method_config, method_module, update_sums
from tuneforge.data.collate import collate
from tuneforge.run import prepare
from helpers.runs import all_methods, online_rl_methods, token_batch_methods
from tuneforge.models.load import load_causal_lm
from tuneforge.run import batching, make_objective
from tuneforge.train.loop import fit

METHOD_NAMES = token_batch_methods()
# (micro_batch_size, grad_accum, rl.rollout_batch_size) of runs that must train alike
SHAPES = {"tokens": ((8, 1, None), (2, 4, None)), "online_rl": ((4, 1, 3), (1, 4, 32), (2, 2, 5))}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_grad_accum_1x8_equals_8x1(method, tiny_model_dir, tmp_path):
    cfg = method_config(method, tiny_model_dir, tmp_path, tmp_path / "run")
    model, tok = load_for_method(method, tiny_model_dir)
    examples = prepare(cfg, tok).train[:8]
    model = method_module(cfg, model)  # with the method's extra heads (reward)
    objective = make_objective(cfg)
    batches = lambda micro: [collate(examples[i:i + micro], tok.pad_token_id)  # noqa: E731
                             for i in range(0, len(examples), micro)]
    sum_a, count_a, grads_a = update_sums(model, objective, batches(8))
    sum_b, count_b, grads_b = update_sums(model, objective, batches(1))
    assert count_a == count_b > 0
    assert abs(sum_a / count_a - sum_b / count_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name] / count_a, grads_b[name] / count_b, rtol=1e-4, atol=1e-6)


def test_chat_examples_have_different_lengths(tiny_model_dir, tmp_path):
    """The sft case above is only a check of padding if the 8 examples differ in length."""
    cfg = method_config("sft", tiny_model_dir, tmp_path, tmp_path / "run")
    _, tok = load_causal_lm(str(tiny_model_dir))
    assert len({len(e) for e in prepare(cfg, tok).train[:8]}) > 1


@pytest.mark.parametrize("method", all_methods())
def test_fit_same_weights_with_and_without_accumulation(method, tiny_model_dir, tmp_path):
    """Through the loop: every shape of SHAPES trains to the same weights and losses (online RL: and rewards)."""
    online = method in online_rl_methods()
    results = []
    for micro, accum, decode in SHAPES["online_rl" if online else "tokens"]:
        cfg = method_config(method, tiny_model_dir, tmp_path, tmp_path / f"run{micro}", max_steps=3,
                            micro_batch_size=micro, grad_accum=accum)
        if decode is not None:
            cfg.rl.rollout_batch_size = decode
        model, tok = load_for_method(method, tiny_model_dir)
        prepared = prepare(cfg, tok)
        module = method_module(cfg, model)  # with the method's extra heads (reward, value)
        rows, _, collate_fn, settings = batching(cfg, prepared, tok, packed=False)
        res = fit(module, make_objective(cfg, tok), rows, collate_fn, settings)
        results.append(({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
                         [h["loss"] for h in res.history], [h.get("reward") for h in res.history]))
    wa, la, ra = results[0]
    assert len(la) == 3 and all(x is not None for x in la)
    assert not online or (all(r is not None for r in ra) and len(set(ra)) > 1)  # rewards differ between steps
    for wb, lb, rb in results[1:]:
        assert len(lb) == 3 and all(x is not None for x in lb)
        for a, b in zip(la, lb):
            assert abs(a - b) < 1e-5, (la, lb)
        assert ra == rb  # the same completions: the same rewards, exactly
        for name in wa:  # Adam divides by sqrt(v): float32 rounding of a gradient entry that nearly cancels moves
            # the weight ~1e-5 after 3 steps (reward, lr 3e-3: 9e-6 in float32, 1e-15 in float64)
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=2e-5)
    fresh, _ = load_for_method(method, tiny_model_dir)
    start = {n: p for n, p in method_module(cfg, fresh).named_parameters() if p.requires_grad}
    assert start.keys() == wa.keys() and any(not torch.equal(wa[n], start[n]) for n in wa)  # it trained
