"""The contract between the one training loop and a method.

A method turns loader batches into training batches (`prepare`: identity for SFT, rollout generation for
PPO/GRPO later) and computes a loss SUM with the COUNT it sums over (supervised tokens, pairs, sequences) and
detached metrics (`loss`). The loop divides by the global count of one optimizer step, summed over all
micro-batches (and, under torchrun, all ranks) -- the single normalisation point, so gradient accumulation
never changes the loss.

Losses that do not split into independent micro-batches (cached contrastive, GRPO group normalisation, PPO
epochs) override `step`, which owns forward and backward for one optimizer step and returns the count; the
loop keeps the optimizer, schedule, clipping, checkpoints and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tuneforge.data.packing import real_tokens


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, differentiable
    count: int  # what loss_sum sums over
    metrics: dict[str, float] = field(default_factory=dict)  # sums, detached, normalised by the loop


@dataclass
class StepOutput:
    loss_sum: float
    count: int
    tokens: int  # real (non-pad) tokens processed, for throughput
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """Base class. Subclasses set `unit` and implement `loss`; may override `prepare` and `step`."""

    unit = "tokens"

    def prepare(self, model, batch: dict) -> dict:
        return batch

    def loss(self, model, batch: dict) -> LossOutput:
        raise NotImplementedError

    def step(self, model, micro_batches: list[dict], autocast) -> StepOutput:
        """Forward and backward over the micro-batches of one optimizer step; gradients of loss SUMS."""
        total, count, tokens, metrics = 0.0, 0, 0, {}
        for batch in micro_batches:
            batch = self.prepare(model, batch)
            with autocast():
                out = self.loss(model, batch)
            out.loss_sum.backward()
            total += out.loss_sum.item()
            count += out.count
            tokens += real_tokens(batch)
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        return StepOutput(total, count, tokens, metrics)

    @torch.no_grad()
    def evaluate(self, model, batches, autocast) -> dict[str, float]:
        """Held-out loss averaged over the same unit as training."""
        total, count = 0.0, 0
        for batch in batches:
            with autocast():
                out = self.loss(model, batch)
            total += out.loss_sum.item()
            count += out.count
        return {"loss": total / max(count, 1), "count": count}
