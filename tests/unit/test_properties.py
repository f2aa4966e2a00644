"""Property-based tests (hypothesis) of the readers and the chat rendering, on generated conversations and junk.

- rendering: for any conversation, the supervised text is exactly each assistant content plus its end-of-turn
  token, nothing of the prompt; truncation never cuts it;
- robustness: any JSON a user may write ends in typed records or a DataError/AuditError, nothing else;
- errors: one bad line anywhere in a valid file is reported with exactly that line, and skipping it keeps the
  others with their own line numbers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.data.audit import audit_example
from tuneforge.data.chat import tokenize_chat
from tuneforge.data.readers import read_records
from tuneforge.data.records import ChatRecord, Message
from tuneforge.errors import AuditError, DataError
from tuneforge.models.tiny import make_tiny_tokenizer

TOK = make_tiny_tokenizer()
EOT = "<|im_end|>"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any text a data file may hold, template markers included; blank content is refused by the readers earlier.
content = st.text(min_size=1, max_size=30).filter(str.strip) | st.sampled_from(
    ["<|im_end|>", "<|im_start|>user\nhi", "\n\nleading newlines", "trailing  ", "é😀\u200b", "{{ x }}"])


@st.composite
def conversations(draw) -> ChatRecord:
    """An optional system message, then user/assistant turns in any order, at least one assistant turn."""
    roles = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=5))
    if "assistant" not in roles:
        roles.append("assistant")
    if draw(st.booleans()):
        roles.insert(0, "system")
    return ChatRecord([Message(role, draw(content)) for role in roles])


def supervised(ex) -> str:
    return TOK.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])


@SETTINGS
@given(conversations())
def test_supervised_text_is_exactly_the_assistant_turns(record):
    answers = [m.content for m in record.messages if m.role == "assistant"]
    ex = tokenize_chat(TOK, record, max_length=100_000)
    assert supervised(ex) == "".join(a + EOT for a in answers)
    assert len(ex.eot_positions) == len(answers)
    audit_example(ex, expected_turns=len(answers))
    last = tokenize_chat(TOK, record, mask="last", max_length=100_000)
    assert supervised(last) == answers[-1] + EOT
    everything = tokenize_chat(TOK, record, mask="all", max_length=100_000)
    assert everything.input_ids == ex.input_ids and sum(everything.loss_mask) == len(ex) - 1


@SETTINGS
@given(conversations(), st.integers(min_value=9, max_value=200))
def test_truncation_never_cuts_a_response(record, max_length):
    full = tokenize_chat(TOK, record, max_length=100_000)
    dropped = tokenize_chat(TOK, record, max_length=max_length, truncation="drop")
    assert (dropped is None) == (len(full) > max_length)
    cut = tokenize_chat(TOK, record, max_length=max_length, truncation="left")
    if cut is not None:
        assert len(cut) <= max_length and supervised(cut) == supervised(full)
        assert all(cut.loss_mask[p] for p in cut.eot_positions)
        assert cut.input_ids == full.input_ids[len(full) - len(cut):]


# Messages as users write them: unknown, aliased and oddly cased roles, wrong types, missing keys, blanks.
raw_message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "USER", "gpt", "human", "narrator", "", 3, None]),
    "content": st.one_of(content, st.sampled_from(["", "  ", None, 7, ["x"], {"a": 1}])),
})
raw_record = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(raw_message, max_size=5)}),
    st.fixed_dictionaries({"messages": st.one_of(st.none(), st.text(max_size=5), st.integers())}),
    st.fixed_dictionaries({"instruction": st.one_of(content, st.none()), "output": st.one_of(content, st.just(""))}),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)


@SETTINGS
@given(st.lists(raw_record, min_size=1, max_size=4), st.sampled_from(["assistant", "last", "all"]),
       st.integers(min_value=9, max_value=120), st.sampled_from(["drop", "left"]))
def test_anything_users_write_ends_in_records_or_a_data_or_audit_error(rows, mask, max_length, truncation):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        try:
            records = read_records(path).records
            for record in records:
                chat = record.to_chat() if hasattr(record, "to_chat") else record
                if not isinstance(chat, ChatRecord):
                    continue  # another kind (text, prompt...) is not rendered as a conversation
                ex = tokenize_chat(TOK, chat, mask, max_length, truncation)
                if ex is not None:
                    turns = sum(m.role == "assistant" for m in chat.messages)
                    audit_example(ex, None if mask == "all" else (1 if mask == "last" else turns))
        except (DataError, AuditError) as error:
            assert str(error)


# ------------------------------------------------------------------------------------------------ reader errors

instruction_row = st.fixed_dictionaries({"instruction": content, "output": content})
BAD_LINES = [
    (b'{"instruction": "q", "output": }', "malformed JSON"),
    (b'{"instruction": "q", "output": 4}', "expected a string"),
    (b'{"instruction": "q"}', "missing required field"),
    (b'{"instruction": "q", "output": "   "}', "empty string"),
    (b'{"instruction": "caf\xe9", "output": "x"}', "not valid UTF-8"),
    (b'["instruction", "output"]', "expected a JSON object"),
    (b'"just text"', "expected a JSON object"),
]


@SETTINGS
@given(st.lists(instruction_row, min_size=1, max_size=8), st.data(), st.sampled_from(BAD_LINES))
def test_one_bad_line_anywhere_is_reported_with_exactly_that_line(rows, data, bad):
    at = data.draw(st.integers(min_value=0, max_value=len(rows)))
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(at, bad[0])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            read_records(path, "instruction")
            raise AssertionError("the bad line was accepted")
        except DataError as error:
            assert (error.path, error.line) == (str(path), at + 1) and bad[1] in str(error)
            assert f"d.jsonl, line {at + 1}" in str(error)
        result = read_records(path, "instruction", on_error="skip")
    assert result.skipped == 1 and f"line {at + 1}" in result.errors[0]
    assert [(r.instruction, r.output) for r in result.records] == [(r["instruction"], r["output"]) for r in rows]
    assert [r.source.line for r in result.records] == [n + 1 + (n >= at) for n in range(len(rows))]


@SETTINGS
@given(st.lists(conversations(), min_size=1, max_size=4))
def test_sharegpt_spelling_reads_back_the_same_conversations(records):
    alias = {"user": "human", "assistant": "gpt", "system": "system"}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_text("".join(json.dumps({"conversations": [{"from": alias[m.role], "value": m.content}
                                                              for m in r.messages]}) + "\n" for r in records))
        fields = {"messages": "conversations", "role": "from", "content": "value"}
        read = read_records(path, "chat", fields=fields).records
    assert [r.messages for r in read] == [r.messages for r in records]
