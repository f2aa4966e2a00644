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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tuneforge.errors import TuneforgeError
from tuneforge.fsutil import atomic_dir

PREFIX = "step-"
# safetensors reports I/O failures (a full disk included) as SafetensorError, not OSError.
WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointError(TuneforgeError):
    """A checkpoint folder that looks complete cannot be read (truncated or damaged after it was written)."""


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
    remove_leftovers(root)
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
    except WRITE_ERRORS as exc:
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise TuneforgeError(f"could not write checkpoint {final}: {exc}; {kept}. Free space (or fix the "
                             "folder) and continue with --resume") from exc
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _discard(old)
    return final


def _discard(folder: Path) -> None:
    """Rename, then delete: a kill during the delete leaves a dot-folder that no resume picks up."""
    trash = folder.with_name(f".{folder.name}.del-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(root: Path) -> list[str]:
    """Delete what killed writes and deletes left behind: `.step-N.tmp-*`, `.step-N.old-*`, `.step-N.del-*`.

    Safe because one run owns its checkpoint folder: nothing else writes there while this process saves.
    """
    removed = []
    for entry in root.iterdir():
        if entry.name.startswith(f".{PREFIX}") and any(m in entry.name for m in (".tmp-", ".old-", ".del-")):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


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
    """Returns (weights, optimizer tensors, rng tensors, state json); CheckpointError if a file is damaged."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return (load_file(path / "weights.safetensors"), load_file(path / "optimizer.safetensors"),
                load_file(path / "rng.safetensors"), state)
    except (OSError, ValueError, SafetensorError) as exc:  # ValueError covers malformed JSON
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc


def load_latest(run_dir: str | Path, warn) -> tuple[Path, tuple] | None:
    """The newest checkpoint that loads, falling back to older ones (with a warning) past damaged ones.

    None when there is no checkpoint; CheckpointError when there are some but none loads, since silently
    starting over would discard the run.
    """
    found = list_checkpoints(run_dir)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"{exc}; trying the one before")
    if found:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {Path(run_dir) / 'checkpoints'} is "
                              "readable; move them away to start over")
    return None


def trainable_state_dict(model) -> dict:
    """The trainable tensors by parameter name (LoRA weights; every parameter for full fine-tuning).

    Tensors are detached but share storage with the model: save them (safetensors) before the next step.
    Tied parameters appear once (named_parameters de-duplicates), which safetensors requires.
    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, state_dict: dict, strict: bool = True,
                              where: str = "trainable state dict") -> None:
    """Copy tensors from `trainable_state_dict` output back into `model`, in place.

    With `strict`, the names must match the model's trainable parameters exactly: a checkpoint of another
    adapter/target set must fail loudly, not half-load.
    """
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    unknown = sorted(set(state_dict) - set(params))
    missing = sorted(trainable - set(state_dict))
    if unknown or (strict and missing):
        raise TuneforgeError(
            f"{where} does not match the model: "
            + "; ".join(part for part in (
                f"unknown names {unknown[:5]}{'...' if len(unknown) > 5 else ''}" if unknown else "",
                f"missing names {missing[:5]}{'...' if len(missing) > 5 else ''}" if strict and missing else "",
            ) if part))
    with torch.no_grad():
        for name, tensor in state_dict.items():
            param = params[name]
            if param.shape != tensor.shape:
                raise TuneforgeError(f"shape mismatch for {name}: model {tuple(param.shape)}, "
                                     f"state dict {tuple(tensor.shape)}")
            param.copy_(tensor.to(dtype=param.dtype, device=param.device))
