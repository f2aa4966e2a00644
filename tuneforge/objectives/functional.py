"""Shared tensor math for the objectives: hidden states from the model body, target selection, and the
masked next-token loss.

The output projection is applied only where a loss is needed: for SFT most positions are prompt tokens,
and a full (B, T, V) float32 logits tensor for a 49k vocabulary costs gigabytes (see logprobs.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.objectives.logprobs import fused_nll_sum


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


def masked_next_token_loss(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """(loss sum, supervised token count) of next-token prediction where batch['loss_mask'] is 1.

    Only supervised positions reach the output head, through the chunked fused path (logprobs.py).
    """
    hidden = hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
    select, targets = next_token_targets(batch["input_ids"], batch["loss_mask"])
    picked = hidden[:, :-1][select]  # (N, H)
    head = output_head(model)
    if getattr(head, "bias", None) is not None:  # rare; the fused path assumes a bias-free projection
        logits = head(picked).float()
        return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())
    return fused_nll_sum(picked, head.weight, targets, chunk_size), int(targets.numel())
