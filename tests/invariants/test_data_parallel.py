"""Data parallelism: `torchrun --nproc_per_node 2 -m tuneforge train CONFIG` (DDP, gloo, this CPU) trains
exactly what one process trains with the same global batch, for every registered method: the same losses
step by step (to 1e-5 in float32) and the same final weights. Rank 0 alone writes the run folder. Online RL
also samples the same (each prompt's draws seeded by its place in the step's global batch, not by the rank):
the same rewards, and samples.jsonl holds the same rows, written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import method_config, read_metrics, write_config_yaml
from helpers.runs import all_methods, online_rl_methods


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


# rloo shares grpo's every data-parallel path (sampling, groups, statistics); only its advantages differ, checked
# against hand computations (tests/objectives/test_rl_math.py): 2 torchrun runs fewer
DP_METHODS = [m for m in all_methods() if m != "rloo"]


@pytest.mark.parametrize("method", DP_METHODS)
def test_two_ranks_train_what_one_rank_trains(method, tiny_model_dir, tmp_path):
    runs = {}
    for ranks, accum in ((1, 4), (2, 2)):  # the same global batch: 2 examples x 4 micro-batches
        out = tmp_path / f"ranks{ranks}"
        cfg = method_config(method, tiny_model_dir, tmp_path / "data", out, max_steps=4, micro_batch_size=2,
                            grad_accum=accum, threads=1, save_every=2)
        yaml_path = write_config_yaml(cfg, tmp_path / f"ranks{ranks}.yaml")
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tuneforge"]
                  if ranks == 2 else [sys.executable, "-m", "tuneforge"])
        done = _run(launch + ["train", str(yaml_path)], tmp_path)
        runs[ranks] = (out, done.stdout)
    (one, _), (two, out2) = runs[1], runs[2]
    assert "compute: cpu x 2" in out2 and out2.count("trained 4 steps") == 1  # rank 0 alone prints
    losses1, losses2 = _train_losses(one), _train_losses(two)
    assert len(losses1) == len(losses2) == 4
    for a, b in zip(losses1, losses2):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (losses1, losses2)
    rows1 = [r for r in read_metrics(one) if r["split"] == "train"]
    rows2 = [r for r in read_metrics(two) if r["split"] == "train"]
    assert [r["count"] for r in rows1] == [r["count"] for r in rows2]  # counts summed over ranks
    if method in online_rl_methods():
        for key in ("reward", "reward_std", "completion_length", "kl"):
            for a, b in zip([r[key] for r in rows1], [r[key] for r in rows2]):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (key, rows1, rows2)
        samples1 = (one / "samples.jsonl").read_text().splitlines()
        samples2 = (two / "samples.jsonl").read_text().splitlines()
        assert len(samples1) == 4 * 4 * (1 if method == "ppo" else 2)  # 4 steps x the first 4 prompts' samples
        assert samples2 == samples1
    name = "adapter_model.safetensors" if cfg.lora.enabled else "model.safetensors"
    w1, w2 = load_file(str(one / "final" / name)), load_file(str(two / "final" / name))
    assert w1.keys() == w2.keys()
    for name in w1:  # Adam divides by sqrt(v): a ~1e-7 gradient difference of a near-zero entry moves it ~1e-5
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert json.loads((two / "results.json").read_text())["train"]["steps"] == 4


def test_a_non_finite_step_on_one_rank_is_skipped_by_every_rank(tiny_model_dir, tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", worker,
                 str(tiny_model_dir), str(tmp_path)], tmp_path)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"skipped": [0, 1, 0, 0], "same_weights": True, "finite": True}
