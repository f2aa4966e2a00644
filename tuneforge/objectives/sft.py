"""Supervised (and instruction) fine-tuning: next-token loss on the supervised tokens only.

Which tokens are supervised is decided by the data (chat rendering: assistant turns with their end-of-turn
token by default); the loss averages over supervised tokens of the whole optimizer step.
"""

from __future__ import annotations

from tuneforge.objectives.base import LossOutput, Objective
from tuneforge.objectives.functional import masked_next_token_loss


class SFTObjective(Objective):
    unit = "tokens"

    def __init__(self, chunk_size: int = 1024):
        self.chunk_size = chunk_size

    def loss(self, module, batch: dict) -> LossOutput:
        loss_sum, count = masked_next_token_loss(module, batch, self.chunk_size)
        return LossOutput(loss_sum, count)
