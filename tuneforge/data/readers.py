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

from tuneforge.data.records import (
    RECORD_TYPES, ROLES, ChatRecord, InstructionRecord, Message, PairRecord, PreferenceRecord, PromptRecord, Source,
    TextRecord,
)
from tuneforge.errors import ConfigError, DataError

Record = Union[TextRecord, ChatRecord, InstructionRecord, PreferenceRecord, PairRecord, PromptRecord]
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
    "preference": ("prompt", "chosen", "rejected"),
    "pair": ("anchor", "positive", "negatives", "negative"),
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
                record = _build(resolved, obj, src, cols, tabular=fmt in ("csv", "tsv"))
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


# -------------------------------------------------------------------------------------- validation, typed records

def _err(src: Source, field_name: str | None, message: str) -> DataError:
    return DataError(message, src.path, src.line, field_name, src.index_kind)


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list",
             dict: "object"}
    return names.get(type(value), type(value).__name__)


def _string(obj: dict, key: str, src: Source, label: str | None = None, required: bool = True) -> str | None:
    """The string at obj[key]. Optional: None when absent or null. Required: present, a string, not blank."""
    label = label or key
    value = obj.get(key)
    if value is None:
        if not required:
            return None
        if key in obj:
            raise _err(src, label, "expected a string, got null")
        raise _missing(obj, src, label)
    if not isinstance(value, str):
        raise _err(src, label, f"expected a string, got {_type_name(value)}")
    if required and not value.strip():
        raise _err(src, label, "empty string")
    return value


def _missing(obj: dict, src: Source, label: str) -> DataError:
    present = ", ".join(map(str, list(obj)[:10])) or "none"  # usually a column-name mismatch: show what is there
    return _err(src, label, f"missing required field (present: {present})")


def _nonblank(value: str | None) -> str | None:
    return value if value and value.strip() else None


def _list_cell(obj: dict, key: str, src: Source, tabular: bool) -> Any:
    """CSV/TSV cells are strings, so a list (messages, negatives) is written there as JSON text."""
    value = obj.get(key)
    if not tabular or not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as error:
        raise _err(src, key, f"expected a JSON list in this cell: {error}") from error


def _build(kind: str | None, obj: Any, src: Source, cols: dict, tabular: bool) -> Record:
    if not isinstance(obj, dict):
        raise _err(src, None, f"expected a JSON object, got {_type_name(obj)}")
    if kind == "chat":
        return _chat(obj, src, cols, tabular)
    if kind == "pair":
        return _pair(obj, src, cols, tabular)
    if kind == "instruction":
        return InstructionRecord(
            instruction=_string(obj, cols["instruction"], src), output=_string(obj, cols["output"], src),
            input=_string(obj, cols["input"], src, required=False) or "",
            system=_nonblank(_string(obj, cols["system"], src, required=False)), source=src)
    if kind == "preference":
        prompt, chosen, rejected = (_preference_text(obj, cols[n], src) for n in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise _err(src, cols["rejected"], "chosen and rejected are identical, so the pair teaches nothing")
        return PreferenceRecord(prompt, chosen, rejected, src)
    if kind == "prompt":
        ref_key = cols["reference"] or ("answer" if "reference" not in obj and "answer" in obj else "reference")
        return PromptRecord(_string(obj, cols["prompt"], src),
                            _nonblank(_string(obj, ref_key, src, required=False)), src)
    return TextRecord(_string(obj, cols["text"], src), src)


def _preference_text(obj: dict, key: str, src: Source) -> str:
    if isinstance(obj.get(key), list):  # TRL's conversational form; say so rather than only "got list"
        raise _err(src, key, "expected a string, got list (lists of messages are not supported yet for "
                   "preference data: give the prompt and answers as strings)")
    return _string(obj, key, src)


def _chat(obj: dict, src: Source, cols: dict, tabular: bool) -> ChatRecord:
    key, role_key, content_key = cols["messages"], cols["role"], cols["content"]
    if key not in obj:
        raise _missing(obj, src, key)
    turns = _list_cell(obj, key, src, tabular)
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _type_name(turns)
        raise _err(src, key, f"expected a non-empty list of messages, got {got}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _err(src, where, f"expected a message object, got {_type_name(turn)}")
        raw_role = _string(turn, role_key, src, f"{where}.{role_key}")
        role = cols["roles"].get(raw_role.strip().lower(), raw_role.strip().lower())
        if role not in ROLES:
            raise _err(src, f"{where}.{role_key}", f"unknown role '{raw_role}' (allowed: {', '.join(ROLES)}; "
                       "map others with fields={'roles': {...}})")
        if role == "system" and i != 0:
            raise _err(src, f"{where}.{role_key}", "a system message must be the first message")
        content = _content(turn, content_key, src, f"{where}.{content_key}")
        if not content.strip():
            raise _err(src, f"{where}.{content_key}", f"empty {role} turn")
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise _err(src, key, "no assistant turn, so there is nothing to train on")
    return ChatRecord(messages, src)


def _content(turn: dict, key: str, src: Source, label: str) -> str:
    """A message's text: a string, or OpenAI-style content parts (`[{"type": "text", "text": ...}, ...]`).

    Text parts are concatenated in order with nothing added between them, as the OpenAI API does: a part
    boundary is not a word or line boundary, and a writer who wanted a newline there wrote one. Any other part
    (image_url, input_audio, ...) is an error naming that part: dropping it would train on half a message.
    """
    value = turn.get(key)
    if value is None:
        raise _missing(turn, src, label) if key not in turn else _err(src, label, "expected a string, got null")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _err(src, label, f"expected a string or a list of content parts, got {_type_name(value)}")
    texts = []
    for j, part in enumerate(value):
        where = f"{label}[{j}]"
        if not isinstance(part, dict):
            raise _err(src, where, f"expected a content part object, got {_type_name(part)}")
        part_type = _string(part, "type", src, f"{where}.type")
        if part_type != "text":
            raise _err(src, f"{where}.type", f"unsupported '{part_type}' content part: only text parts are read")
        text = part.get("text")
        if not isinstance(text, str):  # a blank part is fine: only the joined message must not be blank
            raise _missing(part, src, f"{where}.text") if "text" not in part else \
                _err(src, f"{where}.text", f"expected a string, got {_type_name(text)}")
        texts.append(text)
    return "".join(texts)


def _pair(obj: dict, src: Source, cols: dict, tabular: bool) -> PairRecord:
    anchor, positive = _string(obj, cols["anchor"], src), _string(obj, cols["positive"], src)
    negatives = _list_cell(obj, cols["negatives"], src, tabular)
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list):
        raise _err(src, cols["negatives"], f"expected a list of strings, got {_type_name(negatives)}")
    for i, negative in enumerate(negatives):
        if not isinstance(negative, str) or not negative.strip():
            got = "an empty string" if isinstance(negative, str) else _type_name(negative)
            raise _err(src, f"{cols['negatives']}[{i}]", f"expected a non-empty string, got {got}")
    single = _nonblank(_string(obj, cols["negative"], src, required=False))
    return PairRecord(anchor, positive, [*negatives, *([single] if single else [])], src)
