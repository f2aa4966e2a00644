"""The loop's contract with a method (objectives/base.py), checked with small methods built on SFT's maths:
several updates from one batch of data, a pass over the whole update before its micro-batches, and metrics
normalised by their own counts."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import make_config, write_chat_data
from tuneforge.data.collate import collate
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.base import LossOutput
from tuneforge.objectives.sft import SFTObjective
from tuneforge.run import prepare
from tuneforge.train.loop import fit


class _TwoEpochs(SFTObjective):
    """Like PPO: each batch of data is optimised twice (two updates), the second on the micro-batches in
    reverse order; records the calls the loop makes."""

    updates_per_batch = 2

    def __init__(self):
        super().__init__()
        self.calls = []

    def prepare(self, module, micro_batches):
        self.calls.append(("prepare", len(micro_batches)))
        return [micro_batches, micro_batches[::-1]]

    def begin_update(self, module, micro_batches, autocast):
        self.calls.append(("begin", len(micro_batches)))

    def loss(self, module, batch):
        self.calls.append(("loss",))
        out = super().loss(module, batch)
        rows = batch["input_ids"].shape[0]
        # a per-row metric: its count is rows, not supervised tokens
        out.metrics["rows_seen"] = (float(rows), float(rows))
        out.metrics["tokens_per_row"] = (float(out.count), float(rows))
        return out


def _setup(tiny_model_dir, tmp_path, **kw):
    cfg = make_config(tiny_model_dir, write_chat_data(tmp_path / "c.jsonl"), tmp_path / "run", **kw)
    cfg.data.packing = False
    model, tok = load_causal_lm(str(tiny_model_dir))
    return cfg, model, tok, prepare(cfg, tok).train


def test_several_updates_from_one_batch_of_data(tiny_model_dir, tmp_path):
    cfg, model, tok, train = _setup(tiny_model_dir, tmp_path, max_steps=3, micro_batch_size=2, grad_accum=2,
                                    schedule="linear")
    objective = _TwoEpochs()
    res = fit(model, objective, train, lambda b: collate(b, tok.pad_token_id), cfg.train)
    assert res.steps == 3 and len(res.history) == 6  # 3 batches of data, 2 optimizer updates each
    per_step = [("prepare", 2)] + [("begin", 2), ("loss",), ("loss",)] * 2
    assert objective.calls == per_step * 3
    lrs = [row["lr"] for row in res.history]
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == 6  # one schedule over all 6 updates
    assert all(row["skipped"] == 0 and row["loss"] is not None for row in res.history)


def test_metrics_are_normalised_by_their_own_counts(tiny_model_dir, tmp_path):
    cfg, model, tok, train = _setup(tiny_model_dir, tmp_path, max_steps=1, micro_batch_size=3, grad_accum=2)
    objective = _TwoEpochs()
    res = fit(model, objective, train, lambda b: collate(b, tok.pad_token_id), cfg.train)
    row = res.history[0]
    supervised = row["count"]  # the loss's count: supervised tokens of the 6 examples
    assert row["rows_seen"] == 1.0  # (rows) / (rows), not rows / supervised tokens
    assert row["tokens_per_row"] == pytest.approx(supervised / 6)


class _Surrogate(SFTObjective):
    """A loss whose differentiable part is a surrogate (as cached contrastive gradients are): the loop
    reports `value`, and back-propagates `loss_sum`."""

    def loss(self, module, batch):
        out = super().loss(module, batch)
        return LossOutput(out.loss_sum * 2.0, out.count, value=float(out.loss_sum))


def test_a_surrogate_loss_reports_its_value(tiny_model_dir, tmp_path):
    cfg, model, tok, train = _setup(tiny_model_dir, tmp_path, max_steps=1)
    plain_model, _ = load_causal_lm(str(tiny_model_dir))
    collate_fn = lambda b: collate(b, tok.pad_token_id)  # noqa: E731
    a = fit(plain_model, SFTObjective(), train, collate_fn, cfg.train)
    cfg.train.output_dir = str(tmp_path / "run2")
    b = fit(model, _Surrogate(), train, collate_fn, cfg.train)
    assert b.history[0]["loss"] == pytest.approx(a.history[0]["loss"], rel=1e-6)
    assert b.history[0]["grad_norm"] == pytest.approx(2 * a.history[0]["grad_norm"], rel=1e-4)
    assert torch.isfinite(torch.tensor(b.history[0]["grad_norm"]))
