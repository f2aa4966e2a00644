"""Read data files into typed records, with errors that name the file, the line (or record index) and the field.

Formats come from the extension, or `format=` for every file: JSONL/NDJSON, JSON (an array, or {"data": [...]}),
CSV/TSV, Parquet, and plain text (.txt/.md, kind "text" only). All are streamed record by record except JSON,
which has to be parsed whole: use JSONL or Parquet for corpora larger than memory.

There are two kinds of problem. A *record* problem (bad JSON on one line, a missing field, an empty assistant
turn) raises a DataError, or with on_error="skip" is counted and skipped. A *file* problem (a missing path, an
unreadable or empty file, a JSON file that does not parse) always raises: skipping a whole file would silently
change the data set.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

from tuneforge.data.records import RECORD_TYPES, ROLES, Record, Source, build_record
from tuneforge.errors import ConfigError, DataError

PathLike = Union[str, os.PathLike]

KINDS = tuple(RECORD_TYPES)
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "text")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "text", ".md": "text"}
# Canonical names a `fields` mapping may rename, per kind. "roles" maps role *values* (e.g. "human" -> "user").
FIELDS = {
    "text": ("text",),
    "chat": ("messages", "role", "content", "roles"),
    "instruction": ("instruction", "input", "output", "system"),
    "preference": ("prompt", "chosen", "rejected", "role", "content", "roles", "margin", "score_chosen",
                   "score_rejected"),
    "pair": ("anchor", "positive", "negatives", "negative", "score"),
    "prompt": ("prompt", "reference"),
}
# ShareGPT and Gemini spellings, so the common exports read without configuration; `fields["roles"]` adds more.
DEFAULT_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
# Order matters: a preference record also has "prompt", so it must be recognised before the prompt kind.
_DETECT = (("chat", ("messages",)), ("instruction", ("instruction", "output")), ("preference", ("chosen", "rejected")),
           ("pair", ("anchor", "positive")), ("prompt", ("prompt",)), ("text", ("text",)))
MAX_KEPT_ERRORS = 5
_KIND_OF = {cls: kind for kind, cls in RECORD_TYPES.items()}


@dataclass
class ReadResult:
    records: list = field(default_factory=list)
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_KEPT_ERRORS messages of skipped records
    kind: str | None = None  # the kind read, resolved when kind="auto"


def read_records(paths: PathLike | Sequence[PathLike], kind: str = "auto", fields: Mapping[str, Any] | None = None,
                 on_error: str = "raise", text_field: str = "text", format: str | None = None,
                 text_split: str = "document") -> ReadResult:
    """Read every record of `paths` into memory. Raises DataError if nothing valid is left after skipping."""
    result = ReadResult()

    def count_skip(error: DataError) -> None:
        result.skipped += 1
        if len(result.errors) < MAX_KEPT_ERRORS:
            result.errors.append(str(error))

    result.records.extend(iter_records(paths, kind, fields, on_error, text_field, format, text_split, count_skip))
    if not result.records:
        # Only reachable when skipping: training on nothing is never what was meant.
        raise DataError(f"no valid records: all {result.skipped} were skipped; first: {result.errors[0]}")
    result.kind = _KIND_OF[type(result.records[0])]
    return result


def iter_records(paths: PathLike | Sequence[PathLike], kind: str = "auto", fields: Mapping[str, Any] | None = None,
                 on_error: str = "raise", text_field: str = "text", format: str | None = None,
                 text_split: str = "document", on_skip: Callable[[DataError], None] | None = None,
                 ) -> Iterator[Record]:
    """Yield typed records one at a time. With on_error="skip", each bad record is passed to `on_skip` instead.

    Arguments, `fields` and the paths are checked now; each file is opened only when iteration reaches it.
    """
    _check_args(kind, on_error, format, text_split)
    fields = dict(fields or {})
    text_key = fields.get("text", text_field)
    if kind != "auto":
        _columns(kind, fields, text_key)
    files = _resolve_files(paths, kind, format)
    return _generate(files, kind, fields, text_key, on_error, text_split, on_skip)


def _generate(files: list[tuple[str, str]], kind: str, fields: dict, text_key: str, on_error: str,
              text_split: str, on_skip: Callable[[DataError], None] | None) -> Iterator[Record]:
    resolved = None if kind == "auto" else kind
    cols = _columns(resolved, fields, text_key) if resolved else {}
    for path, fmt in files:
        if fmt == "text":
            if resolved not in (None, "text"):
                raise DataError(f"plain-text files can only be read as kind 'text', not '{resolved}'", path)
            if resolved is None:
                resolved, cols = "text", _columns("text", fields, text_key)
        count = 0
        for src, obj in _rows(path, fmt, text_key, text_split):
            count += 1
            if resolved is None and isinstance(obj, dict):
                resolved = _detect(obj, fields, text_key, src)
                cols = _columns(resolved, fields, text_key)
            try:
                if isinstance(obj, DataError):
                    raise obj
                record = build_record(resolved, obj, src, cols, tabular=fmt in ("csv", "tsv"))
            except DataError as error:
                if on_error == "raise":
                    raise
                if on_skip is not None:
                    on_skip(error)
                continue
            yield record
        if count == 0:
            raise DataError("no records (the file is empty or holds only blank lines)", path)


# ---------------------------------------------------------------------------------------------- arguments, files

def _check_args(kind: str, on_error: str, format: str | None, text_split: str) -> None:
    for name, value, allowed in (("kind", kind, (*KINDS, "auto")), ("on_error", on_error, ("raise", "skip")),
                                 ("format", format, (None, *FORMATS)),
                                 ("text_split", text_split, ("document", "line"))):
        if value not in allowed:
            raise ConfigError(f"unknown value {value!r}; expected one of {', '.join(map(str, allowed))}", key=name)


def _columns(kind: str, fields: dict, text_key: str) -> dict:
    """Canonical name -> the file's column name, for one kind; refuses names that kind does not have (typos)."""
    unknown = sorted(set(fields) - set(FIELDS[kind]))
    if unknown:
        raise ConfigError(f"unknown name(s) {', '.join(unknown)} for kind '{kind}'; "
                          f"allowed: {', '.join(FIELDS[kind])}", key="fields")
    cols = {name: fields.get(name, name) for name in FIELDS[kind]}
    cols["text"] = text_key
    roles = fields.get("roles") or {}
    if not isinstance(roles, Mapping) or any(v not in ROLES for v in roles.values()):
        raise ConfigError(f"roles must map role names to one of {', '.join(ROLES)}", key="fields.roles")
    cols["roles"] = {**DEFAULT_ROLE_ALIASES, **roles}
    if "reference" not in fields:
        cols["reference"] = None  # look for "reference", then its alias "answer"
    return cols


def _detect(obj: dict, fields: dict, text_key: str, src: Source) -> str:
    for kind, names in _DETECT:
        if all((text_key if n == "text" else fields.get(n, n)) in obj for n in names):
            return kind
    keys = ", ".join(map(str, list(obj)[:10])) or "none"
    raise DataError(f"cannot tell the record kind from its keys ({keys}); expected messages (chat), "
                    "instruction+output, chosen+rejected (preference), anchor+positive (pair), prompt or text; "
                    "pass kind=..., or fields=... to map the column names", src.path, src.line,
                    index_kind=src.index_kind)


def _resolve_files(paths: PathLike | Sequence[PathLike], kind: str, format: str | None) -> list[tuple[str, str]]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += _scan_folder(path, kind, format)
        elif path.exists():
            files.append((str(path), format or _format_of(path, kind)))
        else:
            raise DataError("no such file or folder", str(p))
    if not files:
        raise DataError("no data paths given")
    return files


def _format_of(path: Path, kind: str) -> str:
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt:
        return fmt
    if kind == "text":
        return "text"  # any other file is plain text when text is all that is asked for
    raise DataError(f"unknown file type '{path.suffix}' (known: {', '.join(EXTENSIONS)}); pass format=...", str(path))


def _scan_folder(folder: Path, kind: str, format: str | None) -> list[tuple[str, str]]:
    """Supported files under `folder`, recursively, in sorted order; hidden files and folders (.git, caches) skipped."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            fmt = format or EXTENSIONS.get(Path(name).suffix.lower())
            if fmt and not name.startswith("."):
                found.append((str(Path(root) / name), fmt))
    found.sort()
    if kind != "text" and not format:
        # A README.md next to chat files is documentation, not data; text files count only if nothing else is there.
        structured = [f for f in found if f[1] != "text"]
        if structured or kind != "auto":
            found = structured
    if not found:
        raise DataError(f"no data files for kind '{kind}' in folder (known: {', '.join(EXTENSIONS)})", str(folder))
    return found


# ------------------------------------------------------------------------------------- format readers (raw rows)
# Each yields (Source, obj): obj is the parsed row, or a DataError for a record-level problem so that skip mode
# can go on with the next row. File-level problems are raised instead.

def _rows(path: str, fmt: str, text_key: str, text_split: str) -> Iterator[tuple[Source, Any]]:
    if fmt in ("csv", "tsv"):
        return _csv_rows(path, "," if fmt == "csv" else "\t")
    if fmt == "text":
        return _text_rows(path, text_key, text_split)
    return {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows}[fmt](path)


# UTF-32 first: its little-endian mark starts with UTF-16's.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
              (codecs.BOM_UTF16_BE, "UTF-16"))


def _open(path: str):
    """The file, opened binary; refused whole when it is UTF-16/32. Read as UTF-8, such a file fails only at its
    byte-order mark, and the rest decodes as text full of NUL characters that skip mode would keep as records."""
    try:
        fh = open(path, "rb")
        head = fh.read(4)
        fh.seek(0)
    except OSError as error:
        raise DataError(f"cannot read file: {error.strerror or error}", path) from error
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            fh.close()
            raise DataError(f"the file starts with a {encoding} byte-order mark (PowerShell's > and Notepad's "
                            "'Unicode' write such files); tuneforge reads UTF-8: save it as UTF-8", path)
    return fh


def _read_bytes(path: str) -> bytes:
    """The whole file, without a UTF-8 byte-order mark (some Windows editors write one)."""
    with _open(path) as fh:
        data = fh.read()
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _utf8_reason(error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8: byte 0x{error.object[error.start]:02x} at byte {error.start + 1} of the line"


def _decoded_lines(path: str) -> Iterator[tuple[int, str, UnicodeDecodeError | None]]:
    """(1-based line, text, decode error). Decoding line by line is what lets a bad byte be reported by line."""
    with _open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text, problem = raw.decode("utf-8"), None
            except UnicodeDecodeError as error:
                text, problem = raw.decode("utf-8", "replace"), error
            yield lineno, text, problem


def _jsonl_rows(path: str) -> Iterator[tuple[Source, Any]]:
    for lineno, text, problem in _decoded_lines(path):
        src = Source(path, lineno)
        if problem is not None:
            yield src, DataError(_utf8_reason(problem), path, lineno)
        elif text.strip():  # blank lines (a trailing newline, spacing) are not records
            yield src, _parse_json(text, path, lineno)


def _parse_json(text: str, path: str, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return DataError(f"malformed JSON: {error.msg} (column {error.colno})", path, lineno)
    except (ValueError, RecursionError) as error:  # over-long integers, absurd nesting
        return DataError(f"malformed JSON: {error}", path, lineno)


def _json_rows(path: str) -> Iterator[tuple[Source, Any]]:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError("not valid UTF-8", path, data[:error.start].count(b"\n") + 1) from error
    if not text.strip():
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        hint = "; one JSON object per line is JSONL: name it .jsonl or pass format='jsonl'" \
            if error.msg == "Extra data" else ""
        raise DataError(f"malformed JSON: {error.msg} (column {error.colno}){hint}", path, error.lineno) from error
    except (ValueError, RecursionError) as error:
        raise DataError(f"malformed JSON: {error}", path) from error
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError("expected a JSON array of records, or an object with a \"data\" array", path)
    for index, item in enumerate(obj):
        yield Source(path, index, "record"), item


def _csv_rows(path: str, delimiter: str) -> Iterator[tuple[Source, Any]]:
    # The default 128 KiB cell limit rejects ordinary long documents; 2**31 - 1 is the largest every platform takes.
    csv.field_size_limit(2**31 - 1)
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        for lineno, text, problem in _decoded_lines(path):
            if problem is not None:
                bad_lines[lineno] = _utf8_reason(problem)
            yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    header: list[str] = []
    while not header:  # blank lines before the header
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DataError(f"malformed header: {error}", path, reader.line_num) from error
    if bad_lines:
        line = min(bad_lines)
        raise DataError(f"header: {bad_lines[line]}", path, line)
    header = [name.strip() for name in header]
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: a record is named by its first line
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield Source(path, start), DataError(f"malformed row: {error}", path, start)
            continue
        if not row:
            continue
        broken = [n for n in range(start, reader.line_num + 1) if n in bad_lines]
        if broken:
            yield Source(path, start), DataError(bad_lines[broken[0]], path, broken[0])
        elif len(row) != len(header):
            yield Source(path, start), DataError(f"row has {len(row)} cells but the header has {len(header)}",
                                                 path, start)
        else:
            yield Source(path, start), dict(zip(header, row))


def _parquet_rows(path: str, batch_size: int = 1024) -> Iterator[tuple[Source, Any]]:
    import pyarrow.parquet as pq  # imported here: only Parquet users pay for it

    # pyarrow raises several unrelated types (ArrowInvalid, OSError, ...) for a corrupt file; all are file-level.
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size)
    except Exception as error:
        raise DataError(f"cannot read Parquet file: {error}", path) from error
    index = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:
            raise DataError(f"cannot read Parquet file: {error}", path, index, index_kind="record") from error
        for row in batch.to_pylist():
            yield Source(path, index, "record"), row
            index += 1


def _text_rows(path: str, text_key: str, text_split: str) -> Iterator[tuple[Source, Any]]:
    if text_split == "line":
        for lineno, text, problem in _decoded_lines(path):
            if problem is not None:
                yield Source(path, lineno), DataError(_utf8_reason(problem), path, lineno)
            elif text.strip():
                yield Source(path, lineno), {text_key: text.rstrip("\r\n")}
        return
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        yield Source(path, 1), DataError("not valid UTF-8", path, data[:error.start].count(b"\n") + 1)
        return
    if text.strip():
        yield Source(path, 1), {text_key: text}
