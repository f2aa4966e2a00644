"""Typed records: what a reader yields, before tokenisation, and `build_record`, which validates one raw row
(a dict from any file format) into one.

Each record carries its `source` (file and line or record index) so that any later error, even one found at
tokenisation or audit time, can still say where the record came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Union

from tuneforge.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Source:
    path: str
    line: int  # 1-based line, or 0-based record index when index_kind == "record"
    index_kind: str = "line"

    def __str__(self) -> str:
        return f"{self.path}, {self.index_kind} {self.line}"


@dataclass
class TextRecord:
    """Raw text for continued pre-training."""
    text: str
    source: Source | None = None


@dataclass
class Message:
    role: str
    content: str


@dataclass
class ChatRecord:
    """An OpenAI-style conversation: several turns, an optional leading system message."""
    messages: list[Message]
    source: Source | None = None


@dataclass
class InstructionRecord:
    """Alpaca-style: instruction, optional input, output."""
    instruction: str
    output: str
    input: str = ""
    system: str | None = None
    source: Source | None = None

    def to_chat(self) -> ChatRecord:
        user = self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"
        messages = [Message("system", self.system)] if self.system else []
        messages += [Message("user", user), Message("assistant", self.output)]
        return ChatRecord(messages, self.source)


@dataclass
class PreferenceRecord:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) answer: each answer one assistant turn.

    Plain form: `prompt` is the user's message. Conversational form (message lists): `prompt_messages` is the
    whole shared prompt (an optional system message, earlier turns, ending with a user turn) and `prompt` its
    last user turn, for display. `margin` (>= 0) says how much better the chosen answer is, when the data says.
    """
    prompt: str
    chosen: str
    rejected: str
    source: Source | None = None
    prompt_messages: list[Message] | None = None
    margin: float | None = None

    def messages(self) -> list[Message]:
        """The prompt as messages, whichever form the record was read from."""
        return list(self.prompt_messages) if self.prompt_messages else [Message("user", self.prompt)]


@dataclass
class PairRecord:
    """Contrastive: an anchor, its positive, and optional hard negatives."""
    anchor: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    source: Source | None = None
    score: float | None = None  # a graded similarity label (e.g. STS 0-5): held-out Spearman correlation


@dataclass
class PromptRecord:
    """A prompt alone (for RL rollouts and generation), with an optional reference answer."""
    prompt: str
    reference: str | None = None
    source: Source | None = None


def as_chat(record) -> ChatRecord:
    """The conversation form of an instruction or chat record (what SFT renders and generation continues)."""
    if isinstance(record, InstructionRecord):
        return record.to_chat()
    if isinstance(record, ChatRecord):
        return record
    raise DataError(f"a {type(record).__name__} record cannot be used for chat fine-tuning; use instruction or "
                    "chat data", path=getattr(record.source, "path", None), line=getattr(record.source, "line", None))


RECORD_TYPES = {
    "text": TextRecord,
    "chat": ChatRecord,
    "instruction": InstructionRecord,
    "preference": PreferenceRecord,
    "pair": PairRecord,
    "prompt": PromptRecord,
}
Record = Union[TextRecord, ChatRecord, InstructionRecord, PreferenceRecord, PairRecord, PromptRecord]


# ------------------------------------------------------------------ from a raw row to a typed record, validated

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


def number_field(obj: dict, key: str, src: Source, tabular: bool) -> float | None:
    value: Any = obj.get(key)
    if isinstance(value, str) and tabular:  # CSV/TSV cells are text
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise _err(src, key, f"expected a number, got {value!r}") from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(src, key, f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise _err(src, key, f"expected a finite number, got {value}")
    return float(value)


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


def build_record(kind: str | None, obj: Any, src: Source, cols: dict, tabular: bool) -> Record:
    """The typed record of one raw row (a dict from any format), or a DataError naming file, line and field.

    `cols` maps each canonical field name of `kind` to the row's column name (and "roles" to role aliases);
    `tabular` rows (CSV/TSV) hold lists as JSON text.
    """
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
        # its own module (three forms, many checks), imported here: it imports this one
        from tuneforge.data.preference import preference_record

        return preference_record(obj, src, cols, tabular)
    if kind == "prompt":
        ref_key = cols["reference"] or ("answer" if "reference" not in obj and "answer" in obj else "reference")
        return PromptRecord(_string(obj, cols["prompt"], src),
                            _nonblank(_string(obj, ref_key, src, required=False)), src)
    return TextRecord(_string(obj, cols["text"], src), src)


def _chat(obj: dict, src: Source, cols: dict, tabular: bool) -> ChatRecord:
    key = cols["messages"]
    if key not in obj:
        raise _missing(obj, src, key)
    turns = _list_cell(obj, key, src, tabular)
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _type_name(turns)
        raise _err(src, key, f"expected a non-empty list of messages, got {got}")
    messages = message_list(turns, key, src, cols)
    if not any(m.role == "assistant" for m in messages):
        raise _err(src, key, "no assistant turn, so there is nothing to train on")
    return ChatRecord(messages, src)


def message_list(turns: list, key: str, src: Source, cols: dict) -> list[Message]:
    """The messages of a non-empty list of message objects at field `key` (roles mapped, content parts
    joined, no blank turn, a system message only first)."""
    role_key, content_key = cols["role"], cols["content"]
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
    return messages


def _content(turn: dict, key: str, src: Source, label: str) -> str:
    """A message's text: a string, or OpenAI-style content parts (`[{"type": "text", "text": ...}, ...]`).

    Text parts are concatenated in order with nothing added between them, which loses nothing: a part
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
    if anchor.strip() == positive.strip():  # the loss would be near its minimum already: nothing to learn
        raise _err(src, cols["positive"], "the positive is the same text as the anchor")
    named = [(f"{cols['negatives']}[{i}]", text) for i, text in enumerate(negatives)]
    for where, negative in named + ([(cols["negative"], single)] if single else []):
        if negative.strip() == positive.strip():  # it would be pushed away from the anchor and pulled to it
            raise _err(src, where, "a negative is the same text as the positive")
    score = number_field(obj, cols["score"], src, tabular)
    return PairRecord(anchor, positive, [*negatives, *([single] if single else [])], src, score)
