"""A tiny LoRA model whose adapter changes the output: lora_B starts at zero in PEFT, so a fresh adapter would
make every LoRA-versus-base comparison trivially equal."""

from __future__ import annotations

import torch

from tuneforge.adapters.lora import apply_lora
from tuneforge.models.load import load_causal_lm


def lora_model_with_nonzero_b(model_dir: str, seed: int = 0):
    torch.manual_seed(seed)
    model = apply_lora(load_causal_lm(model_dir)[0], r=4, alpha=8, dropout=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    return model
