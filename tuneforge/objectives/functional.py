"""Shared tensor math for the objectives: pure functions on named tensors.

The output projection is applied only where a loss is needed: for SFT most positions are prompt tokens,
and a full (B, T, V) float32 logits tensor for a 49k vocabulary costs gigabytes. Selected positions are
projected in chunks so the logits memory is bounded by `chunk_size * V`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unwrap(model):
    """The transformers model under a PEFT wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (B, T, H) from the decoder body, without computing any logits."""
    body = unwrap(model).get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def output_head(model) -> torch.nn.Module:
    return unwrap(model).get_output_embeddings()


def next_token_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Boolean (B, T-1) selector of positions whose NEXT token is supervised, and those targets (N,)."""
    select = loss_mask[:, 1:].bool()  # (B, T-1)
    return select, input_ids[:, 1:][select]


def selected_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                               chunk_size: int = 2048) -> torch.Tensor:
    """Sum of next-token cross-entropy over N selected positions: hidden (N, H), targets (N,).

    Logits are computed per chunk of positions in float32 (stable log-softmax under autocast).
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start:start + chunk_size]).float()  # (n, V)
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total


def masked_next_token_loss(model, batch: dict, chunk_size: int = 2048) -> tuple[torch.Tensor, int]:
    """(loss sum, supervised token count) of next-token prediction where batch['loss_mask'] is 1."""
    hidden = hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    select, targets = next_token_targets(batch["input_ids"], batch["loss_mask"])
    picked = hidden[:, :-1][select]  # (N, H)
    return selected_cross_entropy_sum(picked, output_head(model), targets, chunk_size), int(targets.numel())
