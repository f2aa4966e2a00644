"""Sparse dropout on the CPU: the same Bernoulli dropout as PyTorch's, drawn as the positions it drops.

PyTorch's CPU dropout draws one Bernoulli value per element from its sequential generator (`bernoulli_`), then
multiplies by a float32 noise tensor it keeps for the backward pass. On an encoder with dropout those draws are
a large share of a step: one contrastive step of all-MiniLM-L6-v2 (64 pairs, 128 sequences up to
128 tokens, float32, 2-core CPU, torch profiler) spent 1.74 s of 7.97 s in `bernoulli_`, over the 19 dropouts
of each forward (embeddings, and per layer the attention probabilities and two hidden-state dropouts).

Here the dropped positions are drawn with geometric gaps between them (adapters/fused_dropout.py
`dropped_positions`): one generator draw per *dropped* element, 10x fewer at p = 0.1, each element still
dropped independently with probability p (to about 2^-24) and the kept ones scaled by 1/(1-p). The backward
pass keeps the positions (int32: 0.4 bytes per element at p = 0.1) instead of a float32 noise tensor (4 bytes).
The draws come from torch's default generator, so `torch.manual_seed`, activation checkpointing's recompute
and cached mini-batching's replay (objectives/contrastive.py) see the same masks as with PyTorch's dropout.

- `SparseDropout` is an `nn.Dropout` subclass: in eval mode, at p = 0 or off the CPU (where PyTorch's fused
  per-element kernel is the fast one) it is PyTorch's dropout unchanged. `sparse_dropouts(model)` switches a
  model's plain `nn.Dropout` modules to it in place (no parameters, nothing saved changes), `torch_dropouts`
  switches them back.
- `sparse_dropout(x, p)` is the function; `sparse_dropout_matmul(probs, value, p)` the attention's dropped
  probabilities times its values (models/attention.py "tuneforge_sdpa"), which keeps the probabilities and the
  positions for the backward pass, not a dropped copy of the probabilities as well (one (..., L, L) tensor per
  layer fewer).

On by default (`train.sparse_dropout`), off under `train.compile` (its kernels draw their own masks); false
runs PyTorch's own dropout.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tuneforge.adapters.fused_dropout import _draw_dropped, _zero_dropped_


class _SparseDropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        dropped = _draw_dropped(x, p)
        scale = 1.0 / (1.0 - p)
        out = _zero_dropped_(torch.mul(x.contiguous(), scale), dropped)
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (dropped,) = ctx.saved_tensors
        return _zero_dropped_(torch.mul(grad_out.contiguous(), ctx.scale), dropped), None


@torch.compiler.disable  # the draw count depends on the random values: traced, it would recompile every step
def _sparse(x: torch.Tensor, p: float) -> torch.Tensor:
    return _SparseDropoutFn.apply(x, p)


def sparse_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the dropped positions drawn sparsely on the CPU (module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or x.numel() == 0:
        return F.dropout(x, p, training)
    return _sparse(x, float(p))


class _DroppedMatmulFn(torch.autograd.Function):
    """dropout(probs, p) @ value that keeps `probs` (which the softmax before it keeps for its own backward
    anyway: no copy) and the dropped positions instead of the dropped copy, rebuilt in the backward pass."""

    @staticmethod
    def forward(ctx, probs, value, p):
        dropped = _draw_dropped(probs, p)  # the draws of `sparse_dropout(probs, p)`: the same masks
        scale = 1.0 / (1.0 - p)
        out = torch.matmul(_zero_dropped_(torch.mul(probs.contiguous(), scale), dropped), value)
        ctx.save_for_backward(probs, value, dropped)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        probs, value, dropped = ctx.saved_tensors
        g_probs = g_value = None
        if ctx.needs_input_grad[1]:
            kept = _zero_dropped_(torch.mul(probs.contiguous(), ctx.scale), dropped)
            g_value = torch.matmul(kept.transpose(-2, -1), grad_out)
        if ctx.needs_input_grad[0]:
            g_probs = _zero_dropped_(torch.matmul(grad_out, value.transpose(-2, -1)).mul_(ctx.scale), dropped)
        return g_probs, g_value, None


@torch.compiler.disable
def _dropped_matmul(probs: torch.Tensor, value: torch.Tensor, p: float) -> torch.Tensor:
    return _DroppedMatmulFn.apply(probs, value, p)


def sparse_dropout_matmul(probs: torch.Tensor, value: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`sparse_dropout(probs, p, training) @ value` (attention: probabilities times values), which in training on
    the CPU keeps one (..., L, L) tensor fewer for the backward pass: per attention layer, the dropped copy of the
    probabilities, rebuilt from them and the dropped positions when the gradients are computed."""
    if not training or p == 0.0 or probs.device.type != "cpu" or p >= 1.0 or probs.numel() == 0:
        return torch.matmul(sparse_dropout(probs, p, training), value)
    return _dropped_matmul(probs, value, float(p))


class SparseDropout(nn.Dropout):
    """`nn.Dropout` whose training-time draws on the CPU are sparse (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_dropout(x, self.p, self.training)


def sparse_dropouts(model: nn.Module) -> int:
    """Switch every plain `nn.Dropout` with p > 0 in `model` to `SparseDropout`, in place; returns how many."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0.0:
            module.__class__ = SparseDropout
            switched += 1
    return switched


def torch_dropouts(model: nn.Module) -> int:
    """Undo `sparse_dropouts`: PyTorch's `nn.Dropout` again; returns how many."""
    restored = 0
    for module in model.modules():
        if type(module) is SparseDropout:
            module.__class__ = nn.Dropout
            restored += 1
    return restored
