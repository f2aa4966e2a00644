"""Batching: right padding for training, with masks carried by position (never by token id)."""

from __future__ import annotations

import torch

from tuneforge.data.chat import TokenizedExample


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Returns input_ids, attention_mask and loss_mask, all (B, T).

    Padding positions get attention 0 and loss 0 because of where they are, so a pad id equal to the
    end-of-turn id (SmolLM2) never hides a real end-of-turn token from the loss.
    """
    longest = max(len(ex.input_ids) for ex in examples)
    batch = len(examples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, longest), dtype=torch.long)
    loss_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(ex.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}
