"""Checkpoints: safetensors for tensors, JSON for the rest; written to a temp folder, fsynced, renamed.

A checkpoint holds the trainable weights (the adapter only, for LoRA), the optimizer moments, the RNG
states and the trainer state (step = data position = schedule position). Nothing is pickled, so a
checkpoint received from someone else cannot run code when loaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneforge.errors import TuneforgeError
from tuneforge.fsutil import atomic_dir

PREFIX = "step-"


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"state.{idx}.{key}"] = value.detach().clone().contiguous() if torch.is_tensor(value) \
                else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_flat(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer,
                    trainer_state: dict, keep_last: int = 2, extra_writer=None) -> Path:
    """Write `run_dir/checkpoints/step-N` atomically; then prune to the newest `keep_last` complete ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    try:
        with atomic_dir(final) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "weights.safetensors")
            opt_tensors, opt_meta = optimizer_to_flat(optimizer)
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            rng_tensors, rng_meta = rng_state()
            save_file(rng_tensors, tmp / "rng.safetensors")
            _write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_meta, **trainer_state})
            if extra_writer is not None:
                extra_writer(tmp)  # e.g. the adapter in PEFT format, usable directly
    except OSError as exc:
        raise TuneforgeError(f"could not write checkpoint {final}: {exc}; earlier checkpoints are intact") from exc
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path):
    """Returns (weights, optimizer tensors, rng tensors, state json)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return (load_file(path / "weights.safetensors"), load_file(path / "optimizer.safetensors"),
            load_file(path / "rng.safetensors"), state)

