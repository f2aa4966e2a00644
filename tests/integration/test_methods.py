"""Each method end to end on the tiny model: loss finite and falling, trainable weights change, frozen don't."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from helpers.runs import make_config, write_instruction_data, write_text_data
from tuneforge.run import train


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


CASES = [("sft", False), ("sft", True), ("clm", False), ("clm", True)]


@pytest.mark.parametrize("method,lora", CASES, ids=[f"{m}-{'lora' if l else 'full'}" for m, l in CASES])
def test_method_trains(tiny_model_dir, tmp_path, method, lora):
    data = write_text_data(tmp_path / "docs") if method == "clm" else write_instruction_data(tmp_path / "d.jsonl")
    cfg = make_config(tiny_model_dir, data, tmp_path / "run", method=method, lora=lora, max_steps=12)
    results = train(cfg)
    losses = [row["loss"] for row in _history(tmp_path / "run")]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    final = tmp_path / "run" / "final"
    if lora:
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(final))
        # the frozen base is untouched: the adapter is the only change, and disabling it gives the base back
        ids = torch.tensor([[1, 5, 9, 12, 40]])
        with tuned.disable_adapter():
            assert torch.equal(tuned(ids).logits, base(ids).logits)
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)
        assert not (final / "model.safetensors").exists()
    else:
        before, after = base.state_dict(), _weights(final)
        changed = [k for k in after if not torch.equal(after[k], before[k])]
        assert len(changed) == len(after), "every parameter is trainable in full fine-tuning"
    assert results["train"]["steps"] == 12


def _history(run):
    import json
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [r for r in rows if r["split"] == "train"]


def test_activation_checkpointing_gives_the_same_loss(tiny_model_dir, tmp_path):
    data = write_instruction_data(tmp_path / "d.jsonl")
    losses = []
    for ac in (False, True):
        cfg = make_config(tiny_model_dir, data, tmp_path / f"run{ac}", lora=True, max_steps=3,
                          activation_checkpointing=ac)
        train(cfg)
        losses.append([row["loss"] for row in _history(tmp_path / f"run{ac}")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_activation_checkpointing_wraps_every_layer(tiny_model_dir):
    """The switch routes each decoder layer through torch's checkpoint function (recomputed in backward)."""
    from tuneforge.config.load import config_from_dict
    from tuneforge.run import apply_speed_switches
    for on in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        apply_speed_switches(config_from_dict({"train": {"activation_checkpointing": on}}), model)
        layers = model.model.layers
        assert all(layer.gradient_checkpointing == on for layer in layers)
        if on:
            assert all("checkpoint" in repr(layer._gradient_checkpointing_func) for layer in layers)
