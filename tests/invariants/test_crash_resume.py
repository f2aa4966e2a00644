"""Killed without warning (SIGKILL), resumed, killed again...: the end result is bit-identical to a straight run.

The runs are real `python -m tuneforge train` processes on CPU with one thread, so nothing in the process
survives a kill: only what the checkpoints on disk hold. Kills are aimed at seeded random checkpoints, some
while a checkpoint is being written, so the resumed run must also find the last complete one and clean up the
temporary folder the killed write left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers.runs import make_config, write_config_yaml, write_instruction_data
from tuneforge.run import train
from tuneforge.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
TOTAL = 16
KILLS = 3
SEED = 20240607


def _config(tmp_path: Path, model_dir: str, data: Path, name: str):
    # LoRA with dropout and a warm-up + cosine schedule: the RNG stream, the schedule position and the data
    # order all have to be restored exactly for the weights to match.
    return make_config(model_dir, data, tmp_path / name, lora=True, lora_dropout=0.1, max_steps=TOTAL,
                       save_every=1, keep_last=2, warmup_steps=3, threads=1)


def _straight_run(cfg) -> None:
    """The uninterrupted run, in this process (saves a start-up); one thread like the killed runs."""
    threads = torch.get_num_threads()
    try:
        train(cfg)
    finally:
        torch.set_num_threads(threads)


def _launch(config: Path, log: Path, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "tuneforge", "train", str(config)] + (["--resume"] if resume else [])
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _progress(root: Path, step: int) -> tuple[int, bool]:
    """(newest complete checkpoint step, whether checkpoint `step` is being written right now)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0, False
    done = [int(n[5:]) for n in names if n.startswith("step-")]
    return max(done, default=0), any(n.startswith(f".step-{step:08d}.tmp-") for n in names)


def _kill_at(proc: subprocess.Popen, root: Path, step: int, phase: str, delay: float, log: Path) -> dict:
    """SIGKILL `proc` while checkpoint `step` is written ("writing"), once it is complete ("written"), or
    `delay` seconds after it is complete ("delay"). Polls every millisecond."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before the planned kill:\n{log.read_text()[-3000:]}"
        newest, writing = _progress(root, step)
        if (phase == "writing" and (writing or newest >= step)) or (phase != "writing" and newest >= step):
            break
        time.sleep(0.001)
    else:
        raise AssertionError(f"checkpoint {step} never appeared:\n{log.read_text()[-3000:]}")
    if phase == "delay":
        time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(n for n in os.listdir(root) if n.startswith("."))
    return {"step": step, "phase": phase, "newest": _progress(root, step)[0], "leftovers": leftovers}


def test_sigkill_at_random_points_then_resume_is_bit_identical(tiny_model_dir, tmp_path):
    data = write_instruction_data(tmp_path / "d.jsonl")
    _straight_run(_config(tmp_path, tiny_model_dir, data, "straight"))
    killed_cfg = write_config_yaml(_config(tmp_path, tiny_model_dir, data, "killed"), tmp_path / "killed.yaml")
    rng = random.Random(SEED)
    # each kill: 1-3 checkpoints after the one the run resumes from; each of the three moments once, in
    # seeded order
    plan = [(rng.randint(1, 3), phase, rng.uniform(0.0, 0.1))
            for phase in rng.sample(["writing", "written", "delay"], KILLS)]
    root, log = tmp_path / "killed" / "checkpoints", tmp_path / "killed.log"
    kills, proc = [], None
    try:
        for i, (ahead, phase, delay) in enumerate(plan):
            step = _progress(root, 0)[0] + ahead
            assert step < TOTAL, f"kill plan runs past the end: {kills}"
            proc = _launch(killed_cfg, log, resume=i > 0)
            kills.append(_kill_at(proc, root, step, phase, delay, log))
        proc = _launch(killed_cfg, log, resume=True)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:  # a failed assertion must not leave a training process
            proc.kill()
            proc.wait()
    print("kills:", kills)  # with -s: which kills landed mid-write (a .tmp- leftover)

    # every kill left a complete checkpoint at least as new as the one it aimed at (or the one before, when it
    # landed while that was written): nothing was lost but the steps since
    assert all(k["newest"] >= k["step"] - (k["phase"] == "writing") for k in kills)
    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # leftovers of killed writes are gone, and keep_last holds
    assert [n for n in os.listdir(root) if n.startswith(".")] == []
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == [f"step-{TOTAL - 1:08d}", f"step-{TOTAL:08d}"]
