"""Error types. Every error a user can cause says where: file, line (or record index) and field, or config key."""

from __future__ import annotations


class TuneforgeError(Exception):
    """Base class: the CLI prints these as one clear message, without a traceback."""


class ConfigError(TuneforgeError):
    """A config value is missing or invalid. `key` is the dotted key, e.g. `train.lr`."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        self.key, self.source = key, source
        where = ", ".join(p for p in (source, f"key {key}" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(TuneforgeError):
    """A record of a data file is unreadable or invalid.

    `line` is the 1-based line for line-oriented formats (JSONL, CSV, text), or the 0-based record index for
    formats without lines (JSON arrays, Parquet), in which case `index_kind` is "record".
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None, index_kind: str = "line"):
        self.path, self.line, self.field, self.index_kind = path, line, field, index_kind
        self.reason = message
        parts = []
        if path is not None:
            parts.append(str(path))
        if line is not None:
            parts.append(f"{index_kind} {line}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(parts), message]) if parts else message}")


class ModelLoadError(TuneforgeError):
    """A model path is missing, or the architecture is not supported."""


class AuditError(TuneforgeError):
    """The rendered training data would train the wrong thing (nothing supervised, end-of-turn unsupervised...)."""
