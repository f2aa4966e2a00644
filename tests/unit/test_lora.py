"""LoRA via PEFT: merge == adapter, disabled == base, PEFT-format round trip, DoRA/rsLoRA switches, helpers."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tuneforge.adapters import (
    apply_lora,
    list_adapters,
    load_adapter,
    load_trainable_state_dict,
    merge_to_folder,
    save_adapter,
    set_adapter,
    trainable_state_dict,
)
from tuneforge.errors import ModelLoadError, TuneforgeError
from tuneforge.models.load import load_causal_lm

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _base(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def _perturb(model, seed: int = 1, adapter: str = "default"):
    """lora_B starts at zero (adapter == no-op); give it values so every check below means something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and f".{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def test_all_linear_targets_everything_but_the_head(tiny_model_dir):
    model, _ = _base(tiny_model_dir)
    peft_model = apply_lora(model, r=4, alpha=8)
    wrapped = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("lora" in n for n in trainable_state_dict(peft_model))
    only_qv = apply_lora(_base(tiny_model_dir)[0], r=4, target_modules=["q_proj", "v_proj"])
    assert {n.split(".")[-1] for n, m in only_qv.named_modules() if hasattr(m, "lora_A")} == {"q_proj", "v_proj"}
    with pytest.raises(TuneforgeError, match="cannot apply LoRA"):
        apply_lora(_base(tiny_model_dir)[0], target_modules=["no_such_proj"])


def test_merged_folder_matches_adapter_and_disabled_matches_base(tiny_model_dir, tmp_path):
    model, tok = _base(tiny_model_dir)
    base_logits = _logits(model)
    peft_model = _perturb(apply_lora(model, r=4, alpha=8))
    adapted = _logits(peft_model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # the adapter does something
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model), base_logits, atol=0, rtol=0)
    save_adapter(peft_model, tmp_path / "adapter")

    out = merge_to_folder(peft_model, None, tmp_path / "merged", tok)
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-5, rtol=0)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left

    # from a spec + adapter folder: same result
    out2 = merge_to_folder(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged2")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out2)), adapted, atol=1e-5, rtol=0)
    _, tok2 = load_causal_lm(str(out2))
    assert tok2.chat_template == tok.chat_template


def test_peft_round_trip_identical(tiny_model_dir, tmp_path):
    peft_model = _perturb(apply_lora(_base(tiny_model_dir)[0], r=4, alpha=8))
    expected = _logits(peft_model)
    out = save_adapter(peft_model, tmp_path / "adapter", base_model="tiny")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                      "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    plain = PeftModel.from_pretrained(_base(tiny_model_dir)[0], str(out))
    torch.testing.assert_close(_logits(plain), expected, atol=0, rtol=0)
    ours = load_adapter(_base(tiny_model_dir)[0], out)
    torch.testing.assert_close(_logits(ours), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = load_adapter(_base(tiny_model_dir)[0], out, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize("use_dora,use_rslora", [(True, False), (False, True), (True, True)])
def test_dora_rslora_switches(tiny_model_dir, tmp_path, use_dora, use_rslora):
    peft_model = apply_lora(_base(tiny_model_dir)[0], r=4, alpha=8, use_dora=use_dora, use_rslora=use_rslora)
    cfg = peft_model.peft_config["default"]
    assert (cfg.use_dora, cfg.use_rslora, cfg.r, cfg.lora_alpha) == (use_dora, use_rslora, 4, 8)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 2 if use_rslora else 8 / 4)
    assert bool(layer.lora_magnitude_vector) == use_dora
    _perturb(peft_model)
    expected = _logits(peft_model)
    saved = json.loads((save_adapter(peft_model, tmp_path / "a") / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["use_rslora"]) == (use_dora, use_rslora)
    merged = AutoModelForCausalLM.from_pretrained(
        merge_to_folder(peft_model, None, tmp_path / "m", load_causal_lm(tiny_model_dir)[1]))
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)


def test_named_adapters_switch(tiny_model_dir, tmp_path):
    base_logits = _logits(_base(tiny_model_dir)[0])
    model = _perturb(apply_lora(_base(tiny_model_dir)[0], r=4), seed=1)
    first = _logits(model)
    save_adapter(model, tmp_path / "first")
    model = apply_lora(model, r=2, adapter_name="second")
    _perturb(model, seed=2, adapter="second")
    assert list_adapters(model) == ["default", "second"]
    set_adapter(model, "second")
    second = _logits(model)
    assert not torch.allclose(first, second, atol=1e-3) and not torch.allclose(base_logits, second, atol=1e-3)
    set_adapter(model, "default")
    torch.testing.assert_close(_logits(model), first, atol=0, rtol=0)
    load_adapter(model, tmp_path / "first", adapter_name="reloaded")
    set_adapter(model, "reloaded")
    torch.testing.assert_close(_logits(model), first, atol=0, rtol=0)
    with pytest.raises(TuneforgeError, match="no adapter named 'third'"):
        set_adapter(model, "third")


def test_trainable_state_dict_round_trip(tiny_model_dir):
    model = _perturb(apply_lora(_base(tiny_model_dir)[0], r=4))
    sd = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    assert sd and all("lora_" in k for k in sd)
    fresh = apply_lora(_base(tiny_model_dir)[0], r=4)
    load_trainable_state_dict(fresh, sd)
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=0, rtol=0)
    with pytest.raises(TuneforgeError, match="missing names"):
        load_trainable_state_dict(fresh, dict(list(sd.items())[1:]))
    with pytest.raises(TuneforgeError, match="unknown names"):
        load_trainable_state_dict(fresh, {**sd, "nope.weight": torch.zeros(1)})
    full, _ = _base(tiny_model_dir)  # full fine-tuning: every parameter, tied ones once
    assert set(trainable_state_dict(full)) == {n for n, _ in full.named_parameters()}


def test_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter folder not found"):
        load_adapter(_base(tiny_model_dir)[0], tmp_path / "missing")
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text("{}")
    (bin_only / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="refused"):
        load_adapter(_base(tiny_model_dir)[0], bin_only)
    model, tok = _base(tiny_model_dir)
    peft_model = apply_lora(model, r=4)
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(TuneforgeError, match="quantized"):
        merge_to_folder(peft_model, None, tmp_path / "merged", tok)
    assert not (tmp_path / "merged").exists()
    with pytest.raises(TuneforgeError, match="needs a PeftModel"):
        save_adapter(_base(tiny_model_dir)[0], tmp_path / "x")
