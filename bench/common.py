"""What run.py and gpu.py share: one child process per measured run, and the TRL side's token counting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spawn(script: str, spec: dict, spec_file: Path, result_file: Path, log: Path,
          extra_env: dict | None = None, timeout: float | None = None, tail: int = 3) -> dict:
    """Run `script --child spec_file --result result_file` (offline, this checkout first on the path, output
    to `log`) and return its result with `wall_seconds`, or {"error": exit code + last `tail` log lines}."""
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_CACHE": str(Path(spec["workdir"]) / "hf-datasets"),
           **(extra_env or {})}
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, script, "--child", str(spec_file), "--result", str(result_file)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0 or not result_file.exists():
        lines = log.read_text(errors="replace").strip().splitlines()[-tail:]
        return {"error": f"exit {rc}: " + " | ".join(lines), "wall_seconds": wall}
    return {**json.loads(result_file.read_text()), "wall_seconds": wall}


def serve(args, child_trl, child_tuneforge) -> bool:
    """In a child (`--child` given): run the spec's side, write its result, return True; else False."""
    if not args.child:
        return False
    spec = json.loads(Path(args.child).read_text())
    res = child_trl(spec) if spec["side"].startswith("trl") else child_tuneforge(spec)
    Path(args.result).write_text(json.dumps(res, default=str))
    return True


def count_batches(trainer) -> list[tuple[int, int]]:
    """Wrap `trainer.data_collator` so that each batch it builds appends (real tokens, supervised next-token
    targets) to the returned list: real = ones of the attention mask (every token of a padding-free packed
    batch), supervised = labels other than -100 after the first position."""
    batches: list[tuple[int, int]] = []
    inner = trainer.data_collator

    def counting(examples):
        out = inner(examples)
        labels = out["labels"]
        real = int(out["attention_mask"].sum()) if "attention_mask" in out else int(labels.numel())
        batches.append((real, int((labels[:, 1:] != -100).sum())))
        return out

    trainer.data_collator = counting
    return batches


def trl_child_start(spec: dict, model_name: str):
    """A TRL child's common start: torch threads as the spec says, datasets' progress bars off, seed 0, and the
    model with its tokenizer in float32 as tuneforge loads it (the same weights on both sides)."""
    import datasets
    import torch

    from tuneforge.models.load import load_causal_lm
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    return load_causal_lm(model_name, dtype="float32")
