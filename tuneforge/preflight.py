"""Input paths checked before anything loads: one line naming the config key (or flag), the path and a hint.

Why up front: a mistyped `data.train` used to surface as a FileNotFoundError traceback after the model had
loaded (ten seconds and more on the embedded model). Every command lists the paths it will read (`Input`) and
calls `check_inputs` before it loads a model or a tokenizer; a problem is an `InputPathError`, which the
command line prints as one line with exit code 2.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import TuneforgeError

# What the shipped recipes and the README put where the user's data goes (configs/*.yaml headers).
PLACEHOLDERS = ("path/to/", "my_data.jsonl")


class InputPathError(TuneforgeError):
    """A path a command would read is missing, of the wrong kind, or unreadable."""


@dataclass(frozen=True)
class Input:
    """One path a command will read. `label` is what the user wrote it as: a config key or a flag."""

    label: str
    path: str
    kind: str = "any"  # "file", "folder" or "any"
    needs: str | None = None  # a file a folder must hold to be what the command expects
    what: str = ""  # what such a folder is, for the message ("a PEFT adapter folder")
    hint: str = ""  # said when the path is missing (e.g. which model names are embedded)


def config_inputs(cfg, data: bool = True) -> list[Input]:
    """The paths a run config makes a command read: data.train and data.eval (when `data`), a local model."""
    inputs = model_inputs("model.name", cfg.model.name)
    if data:
        for key in ("train", "eval"):
            value = getattr(cfg.data, key)
            inputs += [Input(f"data.{key}", str(p)) for p in (value if isinstance(value, list) else [value])
                       if p is not None]
        if cfg.eval.forgetting and cfg.eval.general_text:
            inputs.append(Input("eval.general_text", str(cfg.eval.general_text)))
    return inputs


def model_inputs(label: str, spec: str) -> list[Input]:
    """[Input] when the model spec names a local path; [] for an embedded name or a hub id."""
    from tuneforge.models import embedded
    from tuneforge.models.load import looks_like_path
    if not looks_like_path(spec):
        return []
    known = ", ".join(sorted([*embedded.EMBEDDED, *embedded.ALIASES]))
    return [Input(label, str(spec), hint=f"not an embedded model name either (known: {known})")]


def adapter_input(label: str, path: str) -> Input:
    return Input(label, path, kind="folder", needs="adapter_config.json", what="a PEFT adapter folder")


def run_input(label: str, path: str) -> Input:
    return Input(label, path, kind="folder", needs="config.yaml", what="a training output folder")


def file_input(label: str, path: str) -> Input:
    """A file the command reads whole (`tuneforge rank --prompts`, `generate --file`)."""
    return Input(label, path, kind="file")


def check_output_file(label: str, path: str) -> None:
    """Refuse, before anything loads, an output file that could not be appended to: the path is a folder, or a
    folder above it is a file. Missing folders are fine (the command creates them)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise InputPathError(f"{label}: {path}: is a folder; expected a file to write (say {target / 'prefs.jsonl'})")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputPathError(f"{label}: {path}: {parent} is a file, so no file can be written under it")
            if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
                raise InputPathError(f"{label}: {path}: is not writable (permissions)")
            return


def check_inputs(inputs: list[Input]) -> None:
    """Raise InputPathError for the first input that cannot be read as what its command expects."""
    for item in inputs:
        problem = _problem(item)
        if problem:
            raise InputPathError(f"{item.label}: {item.path}: {problem}")


def _problem(item: Input) -> str | None:
    path = Path(item.path).expanduser()
    if not path.exists():
        return "no such " + {"file": "file", "folder": "folder"}.get(item.kind, "file or folder") + _hint(item)
    if item.kind == "file" and not path.is_file():
        return "is a folder; expected a file"
    if item.kind == "folder" and not path.is_dir():
        return f"is a file; expected {item.what or 'a folder'}"
    if not os.access(path, os.R_OK):
        return "is not readable (permissions)"
    if item.needs and not (path / item.needs).is_file():
        return f"has no {item.needs}, so it is not {item.what or 'what this command reads'}"
    return None


def _hint(item: Input) -> str:
    text = item.path.replace("\\", "/")
    if any(text.startswith(p) or f"/{p}" in text for p in PLACEHOLDERS):
        return f"; replace the placeholder with your data ({item.label}=YOUR_FILE_OR_FOLDER)"
    near = _near_miss(Path(item.path).expanduser())
    if near:
        return f"; did you mean {near}?"
    if item.hint:
        return f"; {item.hint}"
    if not Path(item.path).expanduser().is_absolute():
        return f" (relative paths are read from the current folder, {Path.cwd()})"
    return ""


def _near_miss(path: Path) -> str | None:
    """A sibling whose name is close to the mistyped one (train.jsnol -> train.jsonl), if there is one."""
    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return None
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return str(parent / match[0]) if match and path.name else None


# --- the output folder: a finished run's record is never overwritten without an explicit choice -------------

# What a run writes into train.output_dir; --overwrite removes exactly these (nothing else the user keeps there).
RUN_RECORD = ("final", "results.json", "config.yaml", "checkpoints", "metrics.jsonl", "tensorboard",
              "reference_logps.safetensors", "eval_diff.jsonl", "report.html")


def finished_run_parts(out_dir: str | os.PathLike) -> list[str]:
    """The parts of a finished run in `out_dir` (final/, results.json); [] when there is none."""
    out = Path(out_dir)
    return [name for name, there in (("final/", (out / "final").is_dir()),
                                     ("results.json", (out / "results.json").is_file())) if there]


def check_output_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything loads, to train into a folder that holds a finished run, unless the user chose:
    `overwrite`, or `resume` (whose checks in the loop refuse a config that differs from the checkpoint's)."""
    if resume and overwrite:
        raise InputPathError("--resume and --overwrite contradict each other: --resume continues the run in "
                             "train.output_dir, --overwrite replaces it")
    parts = finished_run_parts(out_dir)
    if parts and not (overwrite or resume):
        raise InputPathError(
            f"train.output_dir: {out_dir} holds a finished run ({', '.join(parts)}), which is never overwritten "
            "without a choice: choose a new train.output_dir=..., --resume to continue a run that did not "
            "finish, or --overwrite to replace it")


def record_run_config(cfg, overwrite: bool = False) -> None:
    """Write output_dir/config.yaml, once the start-up checks passed; with `overwrite`, first remove the old
    run's record, so that no checkpoint of the old run is ever resumed as if it were the new one's."""
    import shutil

    import yaml

    from tuneforge.fsutil import atomic_write_text
    out = Path(cfg.train.output_dir)
    if overwrite:
        for name in RUN_RECORD:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False))
