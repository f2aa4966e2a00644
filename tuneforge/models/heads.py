"""The one top-level module that training runs through: the model body, its output head and any extra heads.

Why a module of our own: a loss computed from hidden states must read the output head's weight. Read outside
the top-level module's forward, that weight skips DDP's gradient reducer (its hooks fire only for work done
inside the wrapped forward) and, under FSDP2, is still a sharded tensor. `TrainModule.forward` runs the body
and then the method's `head_fn` on the final hidden states, all inside one forward, so a data-parallel
wrapper (DDP now, FSDP2 later) wraps exactly one module and sees every parameter a loss touches. Logits are
still computed only where a loss needs them, in chunks (objectives/logprobs.py), by `head_fn`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def unwrap(model):
    """The transformers model under a TrainModule, a DDP wrapper and/or a PEFT wrapper (LoRA layers stay
    injected and active)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, TrainModule):
            model = model.model
        elif hasattr(model, "get_base_model"):
            return model.get_base_model()
        else:
            return model


def train_module(module) -> "TrainModule":
    """The TrainModule itself, under a DDP wrapper if there is one."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class TrainModule(nn.Module):
    """Wraps a causal LM (or a PeftModel of one) and extra heads (`heads`, e.g. a value or reward head).

    `forward(input_ids, attention_mask, position_ids, head_fn=f)` returns `f(hidden (B, T, H), self)`;
    `f` reads `self.output_head` (the LM head) or `self.heads[name]` from inside this forward.
    """

    def __init__(self, model: nn.Module, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads or {})

    @property
    def base(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def output_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def body(self) -> nn.Module:
        base = self.base
        return base.get_decoder() if hasattr(base, "get_decoder") else base

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, head_fn: Callable | None = None,
                row_chunks: list[tuple[torch.Tensor, int]] | None = None):
        """`row_chunks` [(row indices, length), ...] covering every row once: the body runs on each chunk's rows
        cut to `length` columns (right-padded rows of similar lengths: less padding computed), and the hidden
        states are laid back as one (B, T, H) tensor (zeros past each chunk's length), all in this one forward."""
        if row_chunks is None:
            hidden = self._body_states(input_ids, attention_mask, position_ids)  # (B, T, H)
        else:
            width = input_ids.shape[1]
            parts, order = [], []
            for rows, length in row_chunks:
                h = self._body_states(input_ids[rows, :length], attention_mask[rows, :length], None)
                parts.append(torch.nn.functional.pad(h, (0, 0, 0, width - length)))
                order.append(rows)
            inverse = torch.empty_like(torch.cat(order))
            inverse[torch.cat(order)] = torch.arange(inverse.shape[0], device=inverse.device)
            hidden = torch.cat(parts)[inverse]
        return hidden if head_fn is None else head_fn(hidden, self)

    def _body_states(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        return self.body()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state


def as_train_module(model) -> nn.Module:
    """`model` ready for an objective: a TrainModule (or a DDP of one) as it is, anything else wrapped."""
    if isinstance(model, (TrainModule, nn.parallel.DistributedDataParallel)):
        return model
    return TrainModule(model)
