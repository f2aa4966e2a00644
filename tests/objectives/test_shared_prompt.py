"""Preference pairs packed with their prompt once (data/packing.py, tuneforge_varlen attention): DPO and the
reward model get the same loss, metrics and gradients as the same pairs padded one sequence per row, under
LoRA and full fine-tuning; under any other attention the packing keeps whole sequences and still agrees."""

from __future__ import annotations

import pytest
import torch

from helpers.runs import method_config, method_module
from tuneforge.data.collate import collate
from tuneforge.errors import TuneforgeError
from tuneforge.models.attention import register
from tuneforge.models.load import load_causal_lm
from tuneforge.run import batching, make_objective, prepare, prompt_shared
from tuneforge.train.loop import make_autocast


def _setup(method, lora, tiny_model_dir, tmp_path, attn):
    """(module, objective, prepared data, tokenizer): the policy moved away from its reference (DPO's log-ratios
    and rewards are not all zero), full fine-tuning DPO with its precomputed reference attached."""
    cfg = method_config(method, tiny_model_dir, tmp_path, tmp_path / "run", lora=lora)
    cfg.data.packing = True
    model, tok = load_causal_lm(str(tiny_model_dir))
    model.set_attn_implementation(attn)
    torch.manual_seed(0)
    if lora:
        from tuneforge.adapters.lora import apply_lora
        model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    module = method_module(cfg, model)
    data = prepare(cfg, tok)
    if method == "dpo" and not lora:
        from tuneforge.objectives.dpo import WithReference, reference_logps_of
        ref = reference_logps_of(module, data.train, tok.pad_token_id, make_autocast("none", torch.device("cpu")),
                                 torch.device("cpu"))
        data.train = WithReference(data.train, ref)
    with torch.no_grad():  # away from the reference / the start, the same way for both layouts
        gen = torch.Generator().manual_seed(1)
        for name, p in module.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return cfg, module, make_objective(cfg), data, tok


def _loss_metrics_grads(module, objective, batch):
    module.zero_grad(set_to_none=True)
    out = objective.loss(module, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out, grads


def _compare(packed, padded):
    (out_p, grads_p), (out_u, grads_u) = packed, padded
    assert out_p.count == out_u.count
    torch.testing.assert_close(out_p.loss_sum, out_u.loss_sum, rtol=1e-5, atol=1e-6)
    assert out_p.metrics.keys() == out_u.metrics.keys()
    for key, (s, c) in out_u.metrics.items():
        assert out_p.metrics[key][1] == c
        assert out_p.metrics[key][0] == pytest.approx(s, rel=1e-5, abs=1e-5), key
    assert grads_p.keys() == grads_u.keys() and grads_u
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_shared_prompt_packing_equals_padded(method, lora, tiny_model_dir, tmp_path):
    cfg, module, objective, data, tok = _setup(method, lora, tiny_model_dir, tmp_path, register())
    share = prompt_shared(module, True)
    rows, _, collate_fn, _ = batching(cfg, data, tok, True, share)
    assert share and rows.share_prompt
    picked = [rows[i] for i in range(3)]
    examples = [ex for row in picked for ex in row]
    assert len(examples) >= 9  # several pairs per row (with whole sequences, two fit)
    batch = collate_fn(picked)
    assert "predictor_index" in batch
    assert ("ref_logps" in batch) == (method == "dpo" and not lora)  # full fine-tuning DPO: precomputed reference
    # the tokens computed: each pair's prompt once
    assert int(batch["num_real"]) == sum(ex.packed_length(True) for ex in examples) < sum(len(ex) for ex in examples)
    _compare(_loss_metrics_grads(module, objective, batch),
             _loss_metrics_grads(module, objective, collate(examples, tok.pad_token_id)))


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_other_attention_keeps_whole_sequences_and_equals_padded(method, tiny_model_dir, tmp_path):
    cfg, module, objective, data, tok = _setup(method, True, tiny_model_dir, tmp_path, "sdpa")
    share = prompt_shared(module, True)
    rows, _, collate_fn, _ = batching(cfg, data, tok, True, share)
    assert not share and not rows.share_prompt
    picked = [rows[i] for i in range(2)]
    examples = [ex for row in picked for ex in row]
    batch = collate_fn(picked)
    assert "predictor_index" not in batch
    # every sequence whole, from position 0: one position-0 start per sequence, plus each row's padding
    starts = int((batch["position_ids"] == 0).sum())
    assert starts - int((batch["sequence_ids"] == -1).any(1).sum()) == 2 * len(examples)
    assert int(batch["num_real"]) == sum(len(ex) for ex in examples)
    _compare(_loss_metrics_grads(module, objective, batch),
             _loss_metrics_grads(module, objective, collate(examples, tok.pad_token_id)))
    # a shared-prompt batch on this attention would be silently wrong: refused
    from tuneforge.data.packing import collate_packed
    shared = collate_packed(picked, tok.pad_token_id, share_prompt=True)
    with pytest.raises(TuneforgeError, match="tuneforge_varlen"):
        objective.loss(module, shared)
