"""lora.frozen_dtype: frozen base weights stored in the autocast dtype give the numbers autocast gives with
float32 storage (it casts them to that dtype at every call), in training and in decoding, with half the memory."""

from __future__ import annotations

import pytest
import torch
from helpers.lora import lora_model_with_nonzero_b

from tuneforge.adapters.lora import frozen_linears_to
from tuneforge.eval.generation import sample_completions
from tuneforge.models.heads import TrainModule
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.functional import token_logps  # noqa: F401  (the path RL trains on)


def test_only_frozen_linear_weights_change(tiny_model_dir):
    model = lora_model_with_nonzero_b(tiny_model_dir)
    before = {n: p.dtype for n, p in model.named_parameters()}
    changed = frozen_linears_to(model, torch.bfloat16)
    after = {n: p.dtype for n, p in model.named_parameters()}
    assert changed > 0
    for name, dtype in after.items():
        frozen_linear = ("base_layer" in name or "lm_head" in name) and name.endswith("weight")  # untied head: frozen
        assert dtype == (torch.bfloat16 if frozen_linear else before[name]), name
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.float32  # the residual stream starts float32, a tied head stays float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_tied_head_is_left_alone(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)[0]
    model.lm_head.weight = model.get_input_embeddings().weight  # tie them
    for p in model.parameters():
        p.requires_grad_(False)
    frozen_linears_to(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_training_numbers_equal_autocast_with_float32_storage(tiny_model_dir):
    """Loss and every LoRA gradient under bf16 autocast: bitwise equal with the base stored float32 or bf16."""
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    results = []
    for convert in (False, True):
        model = lora_model_with_nonzero_b(tiny_model_dir)
        if convert:
            frozen_linears_to(model, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)


def test_decoding_equals_autocast_with_float32_storage(tiny_model_dir):
    prompts = [[5, 17, 42], [1, 2, 3, 4, 5], [9]]
    outs = []
    for convert in (False, True):
        model = lora_model_with_nonzero_b(tiny_model_dir)
        if convert:
            frozen_linears_to(model, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(sample_completions(TrainModule(model), prompts, 6, [], 0, temperature=1.0, seeds=[1, 2, 3]))
    assert outs[0].tokens == outs[1].tokens
    assert all(torch.equal(a, b) for a, b in zip(outs[0].logps, outs[1].logps))


@pytest.mark.parametrize("case, expected", [
    ({}, torch.bfloat16),
    ({"train": {"autocast": "none"}}, None),
    ({"lora": {"frozen_dtype": "model"}}, None),
    ({"lora": {"use_dora": True}}, None),
    ({"method": "reward"}, None),  # its saved classifier merges the adapter into the base as loaded
    ({"lora": {"enabled": False}}, None),
])
def test_resolution(case, expected):
    from tuneforge.config.schema import RunConfig
    from tuneforge.run import frozen_dtype
    raw = {"method": case.get("method", "sft"), "lora": {"enabled": True, **case.get("lora", {})},
           "train": {"autocast": "bf16", **case.get("train", {})}}
    assert frozen_dtype(RunConfig.model_validate(raw), torch.device("cpu")) == expected
