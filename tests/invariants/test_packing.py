"""Packing: packed rows give the same loss and gradients as the same examples unpadded, one per row."""

from __future__ import annotations

import torch

from helpers.runs import make_config, write_chat_data, write_instruction_data
from tuneforge.data.collate import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.packing import PackedExamples, collate_packed, pack_bins
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives import make_objective
from tuneforge.train.loop import make_autocast


def test_pack_bins_respects_capacity_and_keeps_every_example():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    bins = pack_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 39 tokens need at least 4 rows of 10, and best-fit finds 4


def _loss_and_grads(model, batches):
    model.zero_grad()
    out = make_objective("sft").step(model, batches, make_autocast("none", torch.device("cpu")))
    return out.loss_sum / out.count, out.count, {n: p.grad.clone() / out.count
                                                 for n, p in model.named_parameters() if p.grad is not None}


def test_packed_equals_unpacked(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, write_chat_data(tmp_path / "c.jsonl", n=12), tmp_path / "run")
    model, tok = load_causal_lm(str(tiny_model_dir))
    examples = prepare_data(cfg, tok, "chat").train
    packed = PackedExamples(examples, capacity=160)
    assert len(packed) < len(examples)  # several examples share a row
    rows = [packed[i] for i in range(len(packed))]
    loss_p, count_p, grads_p = _loss_and_grads(model, [collate_packed(rows, tok.pad_token_id)])
    singles = [collate([examples[i]], tok.pad_token_id) for i in range(len(examples))]
    loss_u, count_u, grads_u = _loss_and_grads(model, singles)
    assert count_p == count_u
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tmp_path):
    """Changing one example of a row leaves the other examples' logits unchanged."""
    from tuneforge.objectives.functional import hidden_states
    cfg = make_config(tiny_model_dir, write_instruction_data(tmp_path / "d.jsonl", n=4), tmp_path / "run")
    model, tok = load_causal_lm(str(tiny_model_dir))
    ex = prepare_data(cfg, tok, "chat").train
    a = collate_packed([[ex[0], ex[1]]], tok.pad_token_id)
    first = len(ex[0])
    h_a = hidden_states(model, a["input_ids"], None, a["position_ids"])
    modified = a["input_ids"].clone()
    modified[0, 1:first] = (modified[0, 1:first] + 7) % 300  # scramble the first example
    h_m = hidden_states(model, modified, None, a["position_ids"])
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
        assert res["train"]["steps"] == 3 and res["train"]["final_loss"] == res["train"]["final_loss"]
