"""Packing: packed rows give the same loss and gradients as the same examples unpadded, one per row."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.runs import (
    load_for_method, make_config, method_config, method_module, read_metrics, update_sums, write_chat_data,
    write_instruction_data,
)
from tuneforge.data.collate import collate
from tuneforge.run import make_objective, prepare, prompt_shared
from tuneforge.data.packing import PackedExamples, collate_packed, pack_bins
from helpers.runs import token_batch_methods
from tuneforge.methods import METHODS
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.functional import hidden_states
from tuneforge.objectives.sft import SFTObjective


def test_pack_bins_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 39 tokens need at least 4 rows of 10, and best-fit finds 4


def _loss_and_grads(model, batches, objective=None):
    loss_sum, count, grads = update_sums(model, objective or SFTObjective(), batches)
    return torch.tensor(loss_sum / count), count, {n: g / count for n, g in grads.items()}


@pytest.mark.parametrize("method", token_batch_methods())
def test_packed_equals_unpacked(method, tiny_model_dir, tmp_path):
    cfg = method_config(method, tiny_model_dir, tmp_path, tmp_path / "run")
    model, tok = load_for_method(method, tiny_model_dir)
    examples = prepare(cfg, tok).train[:12]
    model, objective = method_module(cfg, model), make_objective(cfg)  # the method's own loss and heads
    share = prompt_shared(model, True)  # as a run packs: a preference pair's prompt once (varlen attention)
    # several examples share a row (a preference example holds two sequences: room for two such)
    packed = PackedExamples(examples, max(160, 2 * max(len(e) for e in examples)), share)
    rows = [packed[i] for i in range(len(packed))]
    assert len(packed) < len(examples)
    batch = collate_packed(rows, tok.pad_token_id, share_prompt=share)
    assert share and ("predictor_index" in batch) == (METHODS[method].builder == "preference")
    loss_p, count_p, grads_p = _loss_and_grads(model, [batch], objective)
    singles = [collate([examples[i]], tok.pad_token_id) for i in range(len(examples))]
    loss_u, count_u, grads_u = _loss_and_grads(model, singles, objective)
    assert count_p == count_u
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tmp_path):
    """Changing one example of a row leaves the other examples' logits unchanged."""
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl", n=4), tmp_path / "run")
    model, tok = load_causal_lm(str(tiny_model_dir))
    ex = prepare(cfg, tok).train
    a = collate_packed([[ex[0], ex[1]]], tok.pad_token_id)
    first = len(ex[0])
    h_a = hidden_states(model, a)
    modified = a["input_ids"].clone()
    modified[0, 1:first] = (modified[0, 1:first] + 7) % 300  # scramble the first example
    h_m = hidden_states(model, {**a, "input_ids": modified})
    torch.testing.assert_close(h_a[0, first:], h_m[0, first:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(h_a[0, :first], h_m[0, :first])


def test_training_with_packing_and_length_grouping_runs(tiny_model_dir, tmp_path):
    from tuneforge.run import train
    data = write_chat_data(tmp_path / "c.jsonl", n=24)
    for extra in ({"packing": True}, {"group_by_length": True}):
        cfg = make_config(tiny_model_dir, data, tmp_path / f"run{len(extra)}{list(extra)[0]}", max_steps=3)
        for k, v in extra.items():
            setattr(cfg.data, k, v)
        res = train(cfg)
        losses = [r["loss"] for r in read_metrics(cfg.train.output_dir) if r["split"] == "train"]
        assert res["train"]["steps"] == 3 and len(losses) == 3
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
