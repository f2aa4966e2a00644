"""bench/grpo_run.py's own pieces (no TRL needed): the arithmetic prompt set is deterministic and its references
are right, and TRL's reward-function signature gets tuneforge's number_match values."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def grpo_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its neighbours common.py and run.py
    import grpo_run
    yield grpo_run
    for name in ("grpo_run", "common", "run"):
        sys.modules.pop(name, None)


def test_prompts_are_deterministic_and_their_references_right(grpo_run):
    rows = grpo_run.arithmetic_prompts(60, seed=0)
    assert rows == grpo_run.arithmetic_prompts(60, seed=0)
    assert rows != grpo_run.arithmetic_prompts(60, seed=1)
    assert rows[:10] == grpo_run.arithmetic_prompts(10, seed=0)  # a longer run trains on the same first prompts
    ops = set()
    for r in rows:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\? Give the result as a number\.", r["prompt"]).groups()
        ops.add(op)
        assert int(r["reference"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert ops == {"+", "-", "*"}


def test_trl_signature_reward_equals_number_match(grpo_run):
    from tuneforge.rl.rewards import number_match
    texts = ["The answer is 42.", "It is 41", "no idea", "<answer>-7</answer>"]
    refs = ["42", "42", "42", "-7"]
    prompts = [[{"role": "user", "content": "What is 40 + 2?"}]] * 4
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    got = grpo_run.number_match_trl(prompts, conversational, completion_ids=None, reference=refs,
                                    trainer_state=None)
    assert got == number_match([p[0]["content"] for p in prompts], texts, refs) == [1.0, 0.0, 0.0, 1.0]
    assert grpo_run.number_match_trl(["What is 40 + 2?"] * 4, texts, reference=refs) == got  # plain-text prompts
