"""AdamW with per-parameter-kind weight decay, and the learning-rate schedule as a pure function of the step.

The schedule being a function of the step (not a stateful scheduler object) makes resume trivial: the step
counter is the whole schedule state.
"""

from __future__ import annotations

import math

import torch


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """LoRA matrices, biases and norm weights are never decayed (decay pulls LoRA towards the base)."""
    lname = name.lower()
    return param.ndim < 2 or "lora_" in lname or "norm" in lname or lname.endswith(".bias")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999)):
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # foreach=False: the same per-parameter kernels every run, so resumed runs are bit-identical on CPU.
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), foreach=False)


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine/linear decay or constant."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return base_lr * (min_ratio + (1.0 - min_ratio) * factor)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
