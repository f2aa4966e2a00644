"""YAML loading with dotted overrides, and validation errors that name the key and the file."""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.schema import RunConfig
from tuneforge.errors import ConfigError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "lora.enabled=true"]` -> nested dict. Values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value", source="command line")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
            if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string; users mean a number
                value = _number(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse value {raw!r}: {exc}", key=key, source="command line") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("conflicting overrides", key=key, source="command line")
        node[parts[-1]] = value
    return out


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(text: str):
    return float(text) if _NUMBER.match(text.strip()) else text


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _resolve_paths(raw: dict, base_dir: Path) -> None:
    """Data and model paths in a YAML file are relative to the current directory if they exist there,
    else to the YAML file's folder (so recipes run from anywhere)."""
    def fix(p):
        if isinstance(p, list):
            return [fix(x) for x in p]
        if not isinstance(p, str) or Path(p).is_absolute() or Path(p).exists():
            return p
        cand = base_dir / p
        return str(cand) if cand.exists() else p

    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if key in data:
                data[key] = fix(data[key])


def _section_model(annotation) -> type[BaseModel] | None:
    """The config section a field holds: the model itself, or inside Optional[...], list[...] and the like."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_section_model, typing.get_args(annotation)) if m is not None), None)


def _section_keys(loc: tuple) -> list[str]:
    """The keys the config section at `loc` (a key path without its last part) accepts; [] if not a section."""
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int):  # a list's item: the same section
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return []
        model = _section_model(field.annotation)
    return list(model.model_fields) if model is not None else []


def _unknown_key(loc: tuple) -> str:
    """'unknown key' with the nearest accepted key of its section, and the section's keys."""
    known = _section_keys(loc[:-1])
    if not known:
        return "unknown key"
    near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f" (did you mean {'.'.join(map(str, loc[:-1] + (near[0],)))}?)" if near else ""
    return f"unknown key{hint}; {'.'.join(map(str, loc[:-1])) or 'the top level'} takes: {', '.join(known)}"


_ABSENT = object()


def _reaches(tree, loc: tuple):
    """The node of the nested `tree` (dicts and lists) at the key path `loc`, or _ABSENT if it has none there."""
    for part in loc:
        if isinstance(tree, dict) and str(part) in tree:
            tree = tree[str(part)]
        elif isinstance(tree, list) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        else:
            return _ABSENT
    return tree


def config_from_dict(raw: dict, source: str = "config", overrides: dict | None = None) -> RunConfig:
    """`overrides`: what the command line set (parse_overrides), merged into `raw` already; an error at a key it
    set names the command line as its source, not the file."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        message = err["msg"].removeprefix("Value error, ")  # pydantic's wrapper around our own checks
        if err["type"] == "extra_forbidden":
            message = _unknown_key(tuple(err["loc"]))
        node = _reaches(overrides or {}, tuple(err["loc"]))
        if node is not _ABSENT and (err["type"] == "extra_forbidden" or not isinstance(node, dict)):
            source = "command line"  # a value it set, or a key it made up (a section's own checks stay the file's)
        raise ConfigError(f"{message}{more}", key=key or None, source=source) from None


def load_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (or defaults if path is None) and apply dotted overrides."""
    raw: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        source = str(p)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", source=source) from None
        if not isinstance(raw, dict):
            raise ConfigError("top level must be a mapping", source=source)
        _resolve_paths(raw, p.parent)
    given = parse_overrides(overrides) if overrides else {}
    if given:
        raw = _merge(raw, given)
    return config_from_dict(raw, source, given)
