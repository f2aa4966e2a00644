"""Typed records: what a reader yields, before tokenisation.

Each record carries its `source` (file and line or record index) so that any later error, even one found at
tokenisation or audit time, can still say where the record came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    """A prompt with a preferred (chosen) and a dispreferred (rejected) answer."""
    prompt: str
    chosen: str
    rejected: str
    source: Source | None = None


@dataclass
class PairRecord:
    """Contrastive: an anchor, its positive, and optional hard negatives."""
    anchor: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    source: Source | None = None


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
    from tuneforge.errors import DataError
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
