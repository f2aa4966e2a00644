"""Train/eval split by content: a streaming seeded split, and the content key that removes train/eval duplicates
so that held-out scores measure generalisation, not recall (used by data/dataset.py)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tuneforge.data.records import (
    ChatRecord, InstructionRecord, PairRecord, PreferenceRecord, PromptRecord, TextRecord,
)


def record_key(record: Any) -> str:
    """A canonical content string: equal for records with the same content, whatever their source.

    An instruction record keys as its chat form, so the same example written as Alpaca in one file and as a
    conversation in another is still seen as a duplicate.
    """
    if isinstance(record, InstructionRecord):
        record = record.to_chat()
    if isinstance(record, ChatRecord):
        content: list = ["chat", [[m.role, m.content] for m in record.messages]]
    elif isinstance(record, TextRecord):
        content = ["text", record.text]
    elif isinstance(record, PreferenceRecord):
        content = ["preference", record.prompt, record.chosen, record.rejected]
        if record.prompt_messages:  # the whole prompt, not only its last user turn (plain records key as before)
            content.append([[m.role, m.content] for m in record.prompt_messages])
    elif isinstance(record, PairRecord):
        content = ["pair", record.anchor, record.positive, list(record.negatives)]
        if record.score is not None:  # records without a score key as before
            content.append(record.score)
    elif isinstance(record, PromptRecord):
        content = ["prompt", record.prompt, record.reference]
    else:
        raise TypeError(f"no content key for {type(record).__name__}")
    return json.dumps(content, ensure_ascii=False, separators=(",", ":"))


def in_eval_split(key: str, fraction: float, seed: int) -> bool:
    """Streaming split: a record goes to eval when a seeded hash of its content falls below `fraction`.

    Decided per record without seeing the others, so a corpus larger than memory splits in one pass, and
    identical records always land on the same side (no train/eval duplicates by construction).
    """
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction
