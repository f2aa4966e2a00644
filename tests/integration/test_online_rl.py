"""Online RL (grpo, rloo, ppo) end to end on the tiny model: the reward rises on a trivially learnable reward,
the first update of a batch of rollouts has ratio exactly 1, the held-out evaluation reports reward, the
reference's reward and KL, and bad rewards stop the run naming the function."""

from __future__ import annotations

import json
import sys

import pytest

from helpers.runs import method_config, read_metrics
from tuneforge.errors import TuneforgeError
from tuneforge.run import train

REWARD_MODULE = '''
def letters(prompts, completions, references):
    """The share of ASCII letters in the completion: the tiny model's random tokens differ widely in it."""
    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(len(c), 1) for c in completions]


def not_a_number(prompts, completions, references):
    return [float("nan")] * len(completions)
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "tiny_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny_rewards"
    sys.modules.pop("tiny_rewards", None)


def rl_config(method, model_dir, tmp_path, reward, lora=False, **kw):
    cfg = method_config(method, model_dir, tmp_path / "data", tmp_path / "run", lora=lora,
                        **{"max_steps": 16, "micro_batch_size": 4, "lr": 1e-2, **kw})
    cfg.rl.reward_functions = [{"name": reward}]
    cfg.rl.max_new_tokens, cfg.rl.num_generations, cfg.rl.temperature = 8, 4, 1.0
    return cfg


# ppo: known open (issue 11). With the sampler's streams of the main branch this passed for train.seed 0 by 0.001
# and failed for seeds 1 and 3; with per-row seeds it fails for 0, 1 and passes for 3: per-batch reward noise
# (16 samples: +-0.06) is as large as what ppo learns here; a run at lr 1e-12 shows the same spread. Not strict, so
# a pass is reported (XPASS) rather than hidden; the fix is a ppo setting that learns this reward for every seed.
PPO_NOT_ROBUST = pytest.mark.xfail(reason="ppo's rise on the tiny model is within batch noise (see comment)",
                                   strict=False)


@pytest.mark.parametrize("method", ["grpo", "rloo", pytest.param("ppo", marks=PPO_NOT_ROBUST)])
def test_reward_rises(method, tiny_model_dir, tmp_path, reward_module):
    """Full fine-tuning of the tiny model (its LoRA adapter is too small to move it in a few steps), the
    reference a frozen copy of the starting model."""
    # ppo samples each prompt once (no group): 4x the prompts per step for as many samples, two epochs each
    extra = {"micro_batch_size": 16} if method == "ppo" else {}
    cfg = rl_config(method, tiny_model_dir, tmp_path, f"{reward_module}:letters", **extra)
    if method == "ppo":
        cfg.rl.epochs = 2
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    rows = rows[::cfg.rl.epochs]  # the first update of each batch: rewards of its rollouts
    assert len(rows) == 16
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.08, rewards
    assert all(r["kl"] is not None for r in rows) and rows[-1]["kl"] > 0


def test_first_update_of_each_batch_has_ratio_one_and_eval_reports_the_baseline(tiny_model_dir, tmp_path,
                                                                               reward_module):
    """LoRA (the reference is the base with the adapter disabled), two epochs over each batch of rollouts."""
    cfg = rl_config("grpo", tiny_model_dir, tmp_path, f"{reward_module}:letters", lora=True, max_steps=3,
                    lr=5e-2)
    cfg.rl.epochs = 2
    cfg.data.eval_fraction, cfg.eval.loss = 0.25, True
    res = train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(rows) == 2 * 3  # epochs x batches: each an optimizer update of the loop
    first, second = rows[0::2], rows[1::2]
    # the policy that sampled is the policy of the first update: ratio exactly 1 (same numbers, two paths)
    assert all(abs(r["ratio_mean"] - 1.0) < 1e-5 and r["clip_fraction"] == 0.0 for r in first)
    assert all(abs(r["ratio_mean"] - 1.0) > 1e-6 for r in second)
    assert all(r["reward"] is not None and r["gen_tokens_per_s"] > 0 for r in first)
    # where each batch's wall time went, on its first update's row: generation, the method's whole prepare
    # (generation, rewards, reference numbers) and the optimizer updates, shares of the batch's seconds
    for r in first:
        assert r["time/batch_seconds"] > 0
        assert 0 < r["time/generation_share"] <= r["time/prepare_share"] < 1 and 0 < r["time/update_share"] < 1
        assert r["time/prepare_share"] + r["time/update_share"] <= 1 + 1e-9
        assert r["time/generation_share"] == pytest.approx(r["gen_seconds"] / r["time/batch_seconds"])
    assert not any("time/generation_share" in r for r in second)  # once per batch of data
    before, after = res["eval_before"], res["train"]["eval"]
    assert {"reward", "reward_reference", "kl", "completion_length"} <= set(after)
    assert before["reward"] == pytest.approx(before["reward_reference"], abs=1e-6) and before["kl"] == 0.0
    assert after["reward_reference"] == pytest.approx(before["reward_reference"], abs=1e-6)
    assert after["kl"] > 0
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert samples and {"prompt", "completion", "reward", "reference"} <= set(json.loads(samples[0]))
    assert (tmp_path / "run" / "final" / "adapter_config.json").exists()


def test_a_nan_reward_stops_the_run_naming_the_function(tiny_model_dir, tmp_path, reward_module):
    cfg = rl_config("grpo", tiny_model_dir, tmp_path, f"{reward_module}:not_a_number", max_steps=2)
    with pytest.raises(TuneforgeError, match="not_a_number"):
        train(cfg)
