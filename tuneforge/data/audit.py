"""Audit of rendered training data, run before any training step, and the `data inspect` view.

Training on a wrong mask fails silently (a model that never learns to stop, or learns to write prompts), so
these checks refuse to start with a message that names the record.
"""

from __future__ import annotations

from tuneforge.data.chat import RenderStats, TokenizedExample
from tuneforge.errors import AuditError


def audit_example(ex: TokenizedExample, expected_turns: int | None) -> None:
    """Every supervised assistant turn must end with a supervised end-of-turn token."""
    where = ex.source or "an example"
    if expected_turns is not None and len(ex.eot_positions) < expected_turns:
        raise AuditError(f"{where}: the chat template adds no end-of-turn marker after an assistant turn, so "
                         "the model would never learn to stop; fix the template (data.chat_template)")
    for pos in ex.eot_positions:
        if not ex.loss_mask[pos]:
            raise AuditError(f"{where}: the end-of-turn token at position {pos} is not supervised")


def audit_totals(stats: RenderStats, split: str = "train") -> None:
    if stats.examples == 0:
        raise AuditError(f"no {split} examples left after reading and length filtering "
                         f"({stats.dropped_too_long} dropped as longer than data.max_length)")
    if stats.supervised == 0:
        raise AuditError(f"no token of the {split} data is supervised: check data.mask and the data kind")


def format_example(tokenizer, ex: TokenizedExample, color: bool = False) -> str:
    """The rendered example with supervised spans marked: [[...]] (or green when color=True)."""
    parts, current, run = [], None, []
    for tok_id, m in zip(ex.input_ids, ex.loss_mask):
        if m != current and run:
            parts.append((current, tokenizer.decode(run)))
            run = []
        current = m
        run.append(tok_id)
    if run:
        parts.append((current, tokenizer.decode(run)))
    if color:
        return "".join(f"\033[32m{t}\033[0m" if m else t for m, t in parts)
    return "".join(f"[[{t}]]" if m else t for m, t in parts)


def summary(stats: RenderStats) -> dict:
    return {
        "examples": stats.examples,
        "tokens": stats.tokens,
        "supervised_tokens": stats.supervised,
        "supervised_share": round(stats.supervised / max(stats.tokens, 1), 4),
        "truncated_left": stats.truncated_left,
        "dropped_too_long": stats.dropped_too_long,
    }
