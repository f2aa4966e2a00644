"""The contract between the one training loop and a method.

- The loop hands a method one BATCH OF DATA at a time: the micro-batches of one training step, this rank's
  share of them under torchrun. `prepare(module, micro_batches)` turns it into one or more UPDATES, each a
  list of micro-batches (SFT: the batch as it is, one update; PPO later: rollouts, then epochs x mini-batches;
  GRPO: each prompt's group whole inside one update). Every rank must return the same number of updates with
  the same number of micro-batches each. `updates_per_batch` says how many, so the schedule is known ahead.
  Each micro-batch also carries `is_real` (False: a rank's padding micro-batch, weighed by zero) and
  `step_index`, its examples' places in the step's global batch (all ranks), for maths that must not depend on
  how the batch is split (online RL seeds each prompt's samples by it).
- For each update the loop calls `begin_update` once (a method that needs every micro-batch first, such as
  cached contrastive embeddings, does that pass here), then `loss` on each micro-batch and back-propagates
  its loss SUM; under data parallelism gradients are synchronised only on the last micro-batch.
- `loss` returns the loss sum, the COUNT it sums over (supervised tokens, pairs, sequences: the method says
  which, `unit`) and metrics as (sum, count) pairs. The loop adds sums and counts over the micro-batches and
  ranks of the update and divides once: the loss by the loss count (the one normalisation point, so gradient
  accumulation and the number of ranks never change it), each metric by its own count.
- The loop owns the rest: optimizer, schedule, clipping, the non-finite check, evaluation, checkpoints (only
  at the end of a batch of data, so a resume replays nothing), logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Metric = tuple  # (sum, count): reported as sum / count over the whole update


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar, differentiable
    count: float  # what loss_sum sums over
    metrics: dict[str, Metric] = field(default_factory=dict)  # detached (sum, count) pairs
    value: float | None = None  # the loss sum to report when loss_sum is a surrogate (cached gradients)

    def reported(self) -> float:
        return float(self.loss_sum.detach()) if self.value is None else float(self.value)


class Objective:
    """Base class. Subclasses set `unit` and implement `loss`; may override `prepare` and `begin_update`."""

    unit = "tokens"
    updates_per_batch = 1
    eval_key = "loss"  # the held-out metric whose count is reported (online RL: "reward", there is no loss)

    def start(self, module, resumed: bool, step: int = 0) -> None:
        """Called once when training starts (after a resume's restore), before the first batch of data;
        `step` is the number of batches of data already done."""

    def state_dict(self) -> dict:
        """What the method must carry across a resume besides weights, optimizer and RNG (an adaptive KL
        coefficient): JSON-able, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` from the checkpoint a run resumes from."""

    def prepare(self, module, micro_batches: list[dict]) -> list[list[dict]]:
        """One batch of data -> the updates it yields, each a list of micro-batches."""
        return [micro_batches]

    def begin_update(self, module, micro_batches: list[dict], autocast) -> None:
        """Called once before the micro-batches of an update are back-propagated."""

    def loss(self, module, batch: dict) -> LossOutput:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, module, batches, autocast) -> dict[str, Metric]:
        """Held-out (sum, count) pairs: "loss" over the same unit as training, plus the loss's metrics.
        The loop adds them across ranks and divides; methods with corpus-level metrics (retrieval) override."""
        totals: dict[str, list] = {"loss": [0.0, 0.0]}
        for batch in batches:
            with autocast():
                out = self.loss(module, batch)
            totals["loss"][0] += out.reported()
            totals["loss"][1] += out.count
            for k, (s, c) in out.metrics.items():
                acc = totals.setdefault(k, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(c)
        return {k: tuple(v) for k, v in totals.items()}
