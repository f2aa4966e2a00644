"""Preference data as public data sets have it: the plain and conversational forms (explicit and implicit
prompt), content parts, margin and scores, each bad row by file:line:field; the builder's masks for a multi-turn
prompt; the margin through the cache into padded and packed batches."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.runs import make_config

from tuneforge.data.builders import BuildStats, PreferenceBuilder
from tuneforge.data.chat import render
from tuneforge.data.collate import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.packing import PackedExamples, collate_packed
from tuneforge.data.readers import read_records
from tuneforge.data.records import Message, PreferenceRecord, Source
from tuneforge.data.split import record_key
from tuneforge.errors import DataError
from tuneforge.models.tiny import make_tiny_tokenizer


def U(content):
    return {"role": "user", "content": content}


def A(content):
    return {"role": "assistant", "content": content}


def S(content):
    return {"role": "system", "content": content}


def jsonl(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_one(tmp_path, row, **kw) -> PreferenceRecord:
    (record,) = read_records(jsonl(tmp_path, [row]), "preference", **kw).records
    return record


# ------------------------------------------------------------------------------------------------------ readers

def test_plain_form_is_unchanged(tmp_path):
    rec = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"})
    assert (rec.prompt, rec.chosen, rec.rejected, rec.prompt_messages, rec.margin) == ("p", "a", "b", None, None)
    assert rec.messages() == [Message("user", "p")]


def test_explicit_prompt_as_messages_with_answer_turns(tmp_path):
    """TRL's explicit conversational form: prompt messages, each answer its assistant turn; content parts read."""
    row = {"prompt": [S("Be brief."), U("Hi"), A("Hello."), U([{"type": "text", "text": "Add "},
                                                               {"type": "text", "text": "2 and 3."}])],
           "chosen": [A([{"type": "text", "text": "5"}])], "rejected": [A("6")]}
    rec = read_one(tmp_path, row)
    assert rec.prompt_messages == [Message("system", "Be brief."), Message("user", "Hi"),
                                   Message("assistant", "Hello."), Message("user", "Add 2 and 3.")]
    assert (rec.prompt, rec.chosen, rec.rejected) == ("Add 2 and 3.", "5", "6")


def test_explicit_string_prompt_with_whole_conversations(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: a string prompt, chosen/rejected repeating it as a user turn,
    scores per answer."""
    row = {"prompt": "Name a colour.", "chosen": [U("Name a colour."), A("Blue.")],
           "rejected": [U("Name a colour."), A("Seven.")], "score_chosen": 8.5, "score_rejected": 3}
    rec = read_one(tmp_path, row)
    assert rec.prompt_messages == [Message("user", "Name a colour.")]
    assert (rec.chosen, rec.rejected, rec.margin) == ("Blue.", "Seven.", 5.5)


def test_implicit_prompt_is_the_shared_prefix(tmp_path):
    """Anthropic HH's conversational form: no prompt field, two whole conversations; roles mapped by alias."""
    shared = [S("sys"), U("q1"), {"role": "gpt", "content": "a1"}, U("q2")]
    row = {"chosen": [*shared, A("good")], "rejected": [*shared, A("bad")], "margin": 2}
    rec = read_one(tmp_path, row)
    assert rec.prompt_messages == [Message("system", "sys"), Message("user", "q1"), Message("assistant", "a1"),
                                   Message("user", "q2")]
    assert (rec.prompt, rec.chosen, rec.rejected, rec.margin) == ("q2", "good", "bad", 2.0)


def test_conversational_columns_can_be_renamed(tmp_path):
    row = {"chosen": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "yes"}],
           "rejected": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "no"}], "delta": 0.25}
    rec = read_one(tmp_path, row, fields={"role": "from", "content": "value", "margin": "delta"})
    assert (rec.prompt_messages, rec.chosen, rec.rejected, rec.margin) == ([Message("user", "q")], "yes", "no", 0.25)


def test_parquet_message_lists_and_csv_scores(tmp_path):
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([{"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}]), path)
    (rec,) = read_records(path, "preference").records
    assert (rec.prompt_messages, rec.chosen, rec.rejected) == ([Message("user", "q")], "a", "b")
    csv = tmp_path / "prefs.csv"
    csv.write_text("prompt,chosen,rejected,score_chosen,score_rejected\np,a,b,4,1.5\np,c,d,,\n")
    first, second = read_records(csv, "preference").records
    assert first.margin == 2.5 and second.margin is None


def test_margin_wins_over_scores_and_ties_are_zero(tmp_path):
    both = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5, "score_chosen": 9,
                               "score_rejected": 1})
    tie = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 3, "score_rejected": 3})
    assert both.margin == 0.5 and tie.margin == 0.0


def test_the_whole_prompt_is_in_the_content_key():
    """Two pairs that differ only in their system message are not duplicates (the train/eval split)."""
    a = PreferenceRecord("q", "x", "y", prompt_messages=[Message("system", "s1"), Message("user", "q")])
    b = PreferenceRecord("q", "x", "y", prompt_messages=[Message("system", "s2"), Message("user", "q")])
    assert record_key(a) != record_key(b)
    assert record_key(PreferenceRecord("q", "x", "y")) == json.dumps(["preference", "q", "x", "y"],
                                                                     separators=(",", ":"))


BAD_ROWS = [
    ({"prompt": "p", "chosen": [A("same")], "rejected": [A("same")]}, "rejected", "identical"),
    ({"chosen": [U("q"), A("same")], "rejected": [U("q"), A("same")]}, "rejected", "identical"),
    ({"prompt": "p", "chosen": [A("a")], "rejected": [A("  ")]}, "rejected[0].content", "empty assistant turn"),
    ({"prompt": "p", "chosen": [A("a")], "rejected": ""}, "rejected", "empty string"),
    ({"prompt": "p", "chosen": [A("a")], "rejected": []}, "rejected", "got an empty list"),
    ({"chosen": [S("one"), U("q"), A("a")], "rejected": [S("two"), U("q"), A("b")]}, "rejected[0].content",
     "differs from chosen[0]"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("other q"), A("b")]}, "rejected[0].content",
     "differs from chosen[0]"),
    ({"chosen": [S("s"), U("q"), A("a")], "rejected": [U("q"), A("b")]}, "rejected[0].role",
     "differs from chosen[0]"),
    ({"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("not q"), A("b")]}, "rejected[0].content",
     "differs from prompt[0]"),
    ({"prompt": [S("s"), U("q")], "chosen": [S("t"), U("q"), A("a")], "rejected": [A("b")]},
     "chosen[0].content", "differs from prompt[0]"),
    ({"prompt": "p", "chosen": [A("a")], "rejected": [U("b")]}, "rejected[0].role",
     "must end with an assistant turn"),
    ({"chosen": [U("q"), A("a"), U("more")], "rejected": [U("q"), A("b")]}, "chosen[2].role",
     "must end with an assistant turn"),
    ({"chosen": [U("q"), A("a"), U("q2"), A("c")], "rejected": [U("q"), A("b")]}, "chosen",
     "only one assistant turn per answer"),
    ({"prompt": "q", "chosen": [A("a")], "rejected": [U("q"), A("b"), U("q2"), A("c")]}, "rejected",
     "only one assistant turn per answer"),
    ({"chosen": [A("a")], "rejected": [A("b")]}, "chosen", "no prompt"),
    ({"prompt": [U("q"), A("a")], "chosen": [A("b")], "rejected": [A("c")]}, "prompt[1].role",
     "must end with a user turn"),
    ({"chosen": "a", "rejected": [U("q"), A("b")]}, "chosen", "whole conversations"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": -0.5}, "margin", "negative margin"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2}, "score_rejected",
     "a margin needs both scores"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": 2}, "score_rejected",
     "prefer the rejected answer"),
]


@pytest.mark.parametrize("row, field, words", BAD_ROWS)
def test_bad_preference_rows_name_file_line_and_field(tmp_path, row, field, words):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = jsonl(tmp_path, [good, row])
    with pytest.raises(DataError) as info:
        read_records(path, "preference")
    error = info.value
    assert error.field == field and error.line == 2, str(error)
    assert f"prefs.jsonl, line 2, field '{field}'" in str(error) and words in str(error)


# ------------------------------------------------------------------------------------------------------ builder

@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


class ListWriter(list):
    add = list.append


def build(tok, records, **kw):
    base = dict(max_length=256, truncation="drop", system_prompt=None, mask="assistant", doc_separator=None)
    writer = ListWriter()
    builder = PreferenceBuilder(tok, SimpleNamespace(**{**base, **kw}), writer, BuildStats())
    for rec in records:
        builder.add(rec)
    return writer


def prompt_ids(tok, msgs):
    return tok(render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def test_multi_turn_prompt_masks_exactly_each_answer_and_its_end_of_turn(tmp_path, tok):
    shared = [U("What is 2 + 3?"), A("It is 5."), U("And times 3?")]
    (rec,) = read_records(jsonl(tmp_path, [{"chosen": [*shared, A("Fifteen.")],
                                            "rejected": [*shared, A("Eight, I think.")], "margin": 1.5}]),
                          "preference").records
    (ex,) = build(tok, [rec], system_prompt="Answer with numbers.")
    for role, answer in (("chosen", "Fifteen."), ("rejected", "Eight, I think.")):
        seq = ex[role]
        assert tok.decode([t for t, m in zip(seq.input_ids, seq.loss_mask) if m]) == answer + "<|im_end|>"
        assert len(seq.eot_positions) == 1 and seq.loss_mask[seq.eot_positions[0]] == 1
    # the prompt (configured system prompt first, as for sft) is rendered once: the same prefix of both
    expected = prompt_ids(tok, [{"role": "system", "content": "Answer with numbers."}, *shared])
    starts = [s.loss_mask.index(1) for s in ex.sequences]
    assert [s.input_ids[:at] for s, at in zip(ex.sequences, starts)] == [expected, expected]
    assert ex.texts == {"margin": 1.5}


def test_a_prompt_with_its_own_system_message_keeps_it(tok):
    msgs = [Message("system", "Own rules."), Message("user", "Hi")]
    (ex,) = build(tok, [PreferenceRecord("Hi", "Hello.", "Go.", prompt_messages=msgs)], system_prompt="Config.")
    own = prompt_ids(tok, [{"role": "system", "content": "Own rules."}, {"role": "user", "content": "Hi"}])
    assert ex["chosen"].input_ids[:len(own)] == own and "Config." not in tok.decode(ex["chosen"].input_ids)
    assert ex.texts is None  # no margin in the data: nothing kept


def test_a_conversational_prompt_longer_than_max_length_is_dropped_and_counted(tok):
    msgs = [Message("user", "word " * 40), Message("assistant", "ok"), Message("user", "word " * 40)]
    writer, stats = ListWriter(), BuildStats()
    data = SimpleNamespace(max_length=64, truncation="left", system_prompt=None, mask="assistant",
                           doc_separator=None)
    PreferenceBuilder(tok, data, writer, stats).add(PreferenceRecord("x", "a", "b", Source("p.jsonl", 3), msgs))
    assert not writer and stats.dropped_too_long == 1


# ------------------------------------------------------------------------------------------ margin in batches

def _rows(n=8):
    # every other pair without a margin; the others with scores or a margin, all different
    rows = []
    for i in range(n):
        row = {"chosen": [U(f"Add {i} and {i + 1}."), A(f"The sum is {2 * i + 1}.")],
               "rejected": [U(f"Add {i} and {i + 1}."), A("I do not know" + "!" * (i % 4))]}
        if i % 2:
            row.update({"score_chosen": 10.0, "score_rejected": 10.0 - i} if i % 4 == 1 else {"margin": i / 4})
        rows.append(row)
    return rows


def _expected_margin(tok, seq) -> float:
    """The margin of the row a chosen sequence came from, found by its answer text (not through the cache)."""
    answer = tok.decode([t for t, m in zip(seq.input_ids, seq.loss_mask) if m])
    i = next(i for i in range(8) if answer == f"The sum is {2 * i + 1}.<|im_end|>")
    return 0.0 if i % 2 == 0 else (float(i) if i % 4 == 1 else i / 4)


def test_margin_reaches_padded_and_packed_batches(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = jsonl(tmp_path, _rows())
    cfg = make_config(tiny_model_dir, path, tmp_path / "run")
    cfg.data.eval_fraction = 0.0
    data = prepare_data(cfg, tiny_tokenizer, "preference")
    examples = [data.train[i] for i in range(len(data.train))]
    assert len(examples) == 8
    pad = tiny_tokenizer.pad_token_id
    padded = collate(examples, pad)
    assert padded["margin"].shape == (8,) and padded["margin"].dtype.is_floating_point
    packed_rows = PackedExamples(data.train, 3 * max(len(ex) for ex in examples))
    rows = [packed_rows[i] for i in range(len(packed_rows))]
    packed = collate_packed(rows, pad)
    assert len(rows) < len(examples) and packed["margin"].shape == (8,)
    for batch, order in ((padded, examples), (packed, [ex for row in rows for ex in row])):
        chosen = [s for s in range(len(batch["sequence_role"])) if batch["sequence_role"][s] == 0]
        for s in chosen:
            e = int(batch["sequence_example"][s])
            assert float(batch["margin"][e]) == pytest.approx(_expected_margin(tiny_tokenizer, order[e]["chosen"]))
    assert sorted(padded["margin"].tolist()) == sorted(packed["margin"].tolist()) == sorted(
        [0.0] * 4 + [1.0, 0.75, 5.0, 1.75])


def test_pair_batches_carry_no_margin(tmp_path, tiny_model_dir, tiny_tokenizer):
    path = jsonl(tmp_path, [{"anchor": f"q {i}", "positive": f"a {i}"} for i in range(3)], "pairs.jsonl")
    data = prepare_data(make_config(tiny_model_dir, path, tmp_path / "run"), tiny_tokenizer, "pair")
    assert "margin" not in collate([data.train[i] for i in range(len(data.train))], tiny_tokenizer.pad_token_id)


def test_shared_prefix_through_the_cache_and_packed_lengths(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Each pair's prompt length is kept in the token cache (prefix.bin), and the packed length with the prompt
    once (p + c + r) is read for all examples from arrays, as packing budgets need it."""
    rows = [{"prompt": "word " * (i + 1), "chosen": "Yes." * (i % 3 + 1), "rejected": "No."} for i in range(6)]
    cfg = make_config(tiny_model_dir, jsonl(tmp_path, rows), tmp_path / "run")
    cfg.data.eval_fraction = 0.0
    data = prepare_data(cfg, tiny_tokenizer, "preference")
    examples = [data.train[i] for i in range(len(data.train))]
    prefixes = [ex.shared_prefix for ex in examples]
    assert prefixes == [ex["chosen"].loss_mask.index(1) for ex in examples]
    assert prefixes == [ex["rejected"].loss_mask.index(1) for ex in examples] and len(set(prefixes)) == 6
    assert all(ex["chosen"].input_ids[:p] == ex["rejected"].input_ids[:p] for ex, p in zip(examples, prefixes))
    shared = data.train.lengths(share_prompt=True)
    assert shared == [ex.packed_length(True) for ex in examples] == [len(ex) - p for ex, p in zip(examples, prefixes)]
    assert data.train.lengths() == [len(ex) for ex in examples]
    packed = PackedExamples(data.train, max(shared), share_prompt=True)  # the budget counts what is laid out
    batch = collate_packed([packed[i] for i in range(len(packed))], tiny_tokenizer.pad_token_id, share_prompt=True)
    assert int(batch["num_real"]) == sum(shared) and batch["input_ids"].shape[1] <= max(shared)
