"""Decoding on oneDNN-packed bf16 weights (eval/generation.py packed_bf16_linears): where the CPU has native bf16,
rollouts run every linear of the body on a weight packed once per call, a LoRA layer on its merged weight.
The numbers must be those of the unpacked paths they replace."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.lora import lora_model_with_nonzero_b

import tuneforge.eval.generation as generation
from tuneforge.adapters.lora import frozen_linears_to
from tuneforge.eval.generation import native_bf16_packing, packed_bf16_linears, sample_completions
from tuneforge.models.heads import TrainModule

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)
needs_bf16 = pytest.mark.skipif(not native_bf16_packing(),
                                reason="this CPU has no native bf16: decoding never packs here")
PROMPTS = [[5, 17, 42], [5, 17, 42], [1, 2, 3, 4, 5], [9]]


def _decode(model, packed: bool, monkeypatch, greedy=False):
    monkeypatch.setattr(generation, "_can_pack", generation._can_pack if packed else (lambda device: False))
    with BF16:
        return sample_completions(TrainModule(model), PROMPTS, 6, [], 0, temperature=1.0, do_sample=not greedy,
                                  seeds=[1, 2, 3, 4])


def _same(a, b):
    return a.tokens == b.tokens and all(torch.equal(x, y) for x, y in zip(a.logps, b.logps))


@needs_bf16
def test_packed_linear_is_autocast_linear_bit_for_bit():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    body = torch.nn.Sequential(layer)
    for rows in (1, 7, 16, 130):
        x = torch.randn(rows, 64)
        with BF16:
            plain = layer(x)
            with packed_bf16_linears(body, torch.device("cpu"), 16):
                assert "forward" in layer.__dict__  # packed inside the context
                packed = layer(x)
        assert packed.dtype == plain.dtype == torch.bfloat16 and torch.equal(packed, plain)
    assert "forward" not in layer.__dict__  # restored on exit


@needs_bf16
def test_packed_lora_decoding_equals_the_merged_model_unpacked(tiny_model_dir, monkeypatch):
    """The merged weight is the bf16 base + B A x scale in float32, rounded to bf16 once: what autocast does with
    PEFT's merge_and_unload of a base already in bf16 values. So packed decoding of the adapter == unpacked
    decoding of the merged model, bit for bit."""
    model = lora_model_with_nonzero_b(tiny_model_dir)
    for name, p in model.named_parameters():
        if "base_layer" in name:  # a base autocast reads unrounded: the merge adds the delta to the bf16 base
            p.data = p.data.bfloat16().float()
    merged = copy.deepcopy(model).merge_and_unload()
    packed = _decode(model, True, monkeypatch)
    assert _same(packed, _decode(merged, False, monkeypatch))
    unmerged = _decode(model, False, monkeypatch)  # the unmerged LoRA path: equal up to bf16 rounding
    assert packed.tokens[0][:2] == unmerged.tokens[0][:2]
    assert torch.allclose(packed.logps[0][:2], unmerged.logps[0][:2], atol=0.05)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every layer restored


@needs_bf16
def test_frozen_bf16_storage_and_disabled_adapter(tiny_model_dir, monkeypatch):
    """With the base stored in bf16 the merge reads the same weights; the reference (adapter disabled) packs the
    base weight alone and decodes exactly as the unpacked base does."""
    model = lora_model_with_nonzero_b(tiny_model_dir)
    assert frozen_linears_to(model, torch.bfloat16) > 0
    merged = copy.deepcopy(model)
    for name, p in merged.named_parameters():
        if "base_layer" in name:  # the bf16 base, read in float32: merged as float32, rounded to bf16 by autocast
            p.data = p.data.float()
    merged = merged.merge_and_unload()
    assert _same(_decode(model, True, monkeypatch), _decode(merged, False, monkeypatch))
    with model.disable_adapter():
        assert _same(_decode(model, True, monkeypatch), _decode(model, False, monkeypatch))
        assert _same(_decode(model, True, monkeypatch, greedy=True), _decode(model, False, monkeypatch, greedy=True))


def test_no_packing_without_bf16_autocast(tiny_model_dir, monkeypatch):
    """Float32 decoding (and any CPU without native bf16) keeps every layer's own forward."""
    model = lora_model_with_nonzero_b(tiny_model_dir)
    body = TrainModule(model).body()
    with packed_bf16_linears(body, torch.device("cpu"), 4):
        assert not any("forward" in m.__dict__ for m in model.modules())
