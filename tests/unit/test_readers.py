"""Readers: every format, every validation error names file, line (or record index) and field."""

from __future__ import annotations

import codecs
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.data.readers import iter_records, read_records
from tuneforge.data.records import (
    ChatRecord, InstructionRecord, Message, PairRecord, PreferenceRecord, PromptRecord, Source, TextRecord,
)
from tuneforge.errors import ConfigError, DataError

INSTR = {"instruction": "Add 2 and 2.", "output": "4"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(path, kind="auto", **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_records(path, kind, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------------------ formats

def test_jsonl_instruction_with_sources(tmp_path):
    path = jsonl(tmp_path, [INSTR, {**INSTR, "input": "x", "system": "Be terse."}])
    result = read_records(path, "instruction")
    assert result.skipped == 0 and result.kind == "instruction"
    first, second = result.records
    assert first == InstructionRecord("Add 2 and 2.", "4", "", None, Source(str(path), 1))
    assert second.input == "x" and second.system == "Be terse." and second.source.line == 2


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, [INSTR, INSTR, '{"instruction": "a", "output": }'])
    error = error_of(path, "instruction")
    assert "data.jsonl" in str(error) and "line 3" in str(error)
    assert "malformed JSON" in str(error) and "column" in str(error)
    assert error.line == 3 and error.path == str(path)


def test_blank_lines_and_bom_are_ignored(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(INSTR).encode() + b"\n\n   \n" + json.dumps(INSTR).encode())
    result = read_records(path, "instruction")
    assert [r.source.line for r in result.records] == [1, 4]


def test_json_array_and_data_object_use_record_index(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([INSTR, INSTR, {"instruction": "q"}]))
    error = error_of(array, "instruction")
    assert error.index_kind == "record" and error.line == 2 and error.field == "output"
    assert "record 2" in str(error) and "a.json" in str(error)
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"data": [INSTR, INSTR]}))
    records = read_records(wrapped, "instruction").records
    assert [r.source for r in records] == [Source(str(wrapped), 0, "record"), Source(str(wrapped), 1, "record")]


def test_json_file_holding_jsonl_gets_a_hint(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(INSTR) + "\n" + json.dumps(INSTR) + "\n")
    message = str(error_of(path))
    assert "line 2" in message and "jsonl" in message


def test_json_not_an_array(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('"just a string"')
    assert "JSON array" in str(error_of(path))


def test_csv_with_mapped_fields_and_line_numbers(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('question,answer\nWhat is 2+2?,4\n"multi\nline question",yes\nWho?,\n', encoding="utf-8")
    fields = {"instruction": "question", "output": "answer"}
    result = read_records(path, "instruction", fields=fields, on_error="skip")
    assert [(r.instruction, r.output, r.source.line) for r in result.records] == [
        ("What is 2+2?", "4", 2), ("multi\nline question", "yes", 3)]
    assert result.skipped == 1 and "line 5" in result.errors[0] and "field 'answer'" in result.errors[0]


def test_tsv_and_ragged_rows(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("text\textra\nhello\tx\nragged\n", encoding="utf-8")
    error = error_of(path, "text")
    assert error.line == 3 and "cells" in str(error)


def test_csv_chat_cell_is_json(tmp_path):
    path = tmp_path / "c.csv"
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert read_records(path).records[0].messages[1] == Message("assistant", "Hello!")


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "p.parquet"
    rows = [{"anchor": f"a{i}", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    result = read_records(path, "pair")
    assert len(result.records) == 2500
    last = result.records[-1]
    assert last == PairRecord("a2499", "p2499", ["n2499"], Source(str(path), 2499, "record"))


def test_parquet_bad_record_uses_index(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}]), path)
    error = error_of(path)
    assert "record 1" in str(error) and error.field == "prompt"
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"not parquet at all")
    assert "Parquet" in str(error_of(corrupt))


def test_text_documents_and_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond line\n")
    (tmp_path / "b.md").write_text("# title\n\nbody\n")
    docs = read_records(tmp_path, "text").records
    assert [d.text for d in docs] == ["first doc\nsecond line\n", "# title\n\nbody\n"]
    lines = read_records(tmp_path / "b.md", "text", text_split="line").records
    assert [(r.text, r.source.line) for r in lines] == [("# title", 1), ("body", 3)]


def test_text_file_refused_for_other_kinds(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    assert "kind 'text'" in str(error_of(path, "chat"))


def test_text_field_option(tmp_path):
    path = jsonl(tmp_path, [{"body": "abc"}])
    assert read_records(path, "text", text_field="body").records == [TextRecord("abc", Source(str(path), 1))]


def test_format_override(tmp_path):
    path = tmp_path / "data.log"
    path.write_text(json.dumps(INSTR) + "\n")
    assert "format=" in str(error_of(path))
    assert len(read_records(path, format="jsonl").records) == 1


def test_folder_reading_is_sorted_recursive_and_skips_docs(tmp_path):
    jsonl(tmp_path, [INSTR], "b.jsonl")
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub", [INSTR, INSTR], "a.jsonl")
    jsonl(tmp_path, [INSTR], "a.jsonl")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".cache").mkdir()
    jsonl(tmp_path / ".cache", [{"junk": 1}], "x.jsonl")
    records = read_records(tmp_path).records
    names = [Path(r.source.path).relative_to(tmp_path).as_posix() for r in records]
    assert names == ["a.jsonl", "b.jsonl", "sub/a.jsonl", "sub/a.jsonl"]


def test_several_paths_and_empty_folder(tmp_path):
    one, two = jsonl(tmp_path, [INSTR], "1.jsonl"), jsonl(tmp_path, [INSTR], "2.jsonl")
    assert len(read_records([two, one]).records) == 2
    (tmp_path / "empty").mkdir()
    assert "no data files" in str(error_of(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kind, row, field, words", [
    ("instruction", {"instruction": "q"}, "output", "missing required field"),
    ("instruction", {"instruction": "q", "output": 4}, "output", "expected a string, got number"),
    ("instruction", {"instruction": "q", "output": ["a"]}, "output", "expected a string, got list"),
    ("instruction", {"instruction": "q", "output": "  "}, "output", "empty string"),
    ("instruction", {"instruction": "q", "output": "a", "input": 3}, "input", "expected a string"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty assistant turn"),
    ("chat", {"messages": [{"role": "narrator", "content": "hi"}]}, "messages[0].role",
     "allowed: system, user, assistant"),
    ("chat", {"messages": []}, "messages", "non-empty list"),
    ("chat", {"messages": "hello"}, "messages", "non-empty list"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "a"}]}, "messages[1].role", "must be the first"),
    ("chat", {"messages": ["hi"]}, "messages[0]", "message object"),
    ("chat", {"conversation": []}, "messages", "present: conversation"),
    ("preference", {"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ("pair", {"anchor": "a", "positive": "p", "negatives": "n"}, "negatives", "list of strings"),
    ("pair", {"anchor": "a", "positive": "p", "negatives": ["n", 3]}, "negatives[1]", "non-empty string"),
    ("prompt", {"prompt": ""}, "prompt", "empty string"),
    ("text", {"text": None}, "text", "got null"),
])
def test_validation_errors_name_file_line_field(tmp_path, kind, row, field, words):
    path = jsonl(tmp_path, [row] if kind != "instruction" else [INSTR, row])
    error = error_of(path, kind)
    line = 2 if kind == "instruction" else 1
    assert error.field == field and error.line == line, str(error)
    assert words in str(error) and f"data.jsonl, line {line}, field '{field}'" in str(error)


def test_line_that_is_not_an_object(tmp_path):
    error = error_of(jsonl(tmp_path, [INSTR, [1, 2]]), "instruction")
    assert error.line == 2 and "expected a JSON object, got list" in str(error)


def test_non_utf8_line_is_reported_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(INSTR).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    error = error_of(path, "instruction")
    assert error.line == 2 and "UTF-8" in str(error) and "0xe9" in str(error)
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text\nok\nbad \xff\n")
    assert error_of(csv_path, "text").line == 3


def test_empty_file_and_missing_path(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    error = error_of(empty, on_error="skip")
    assert "empty.jsonl" in str(error) and "no records" in str(error)
    header_only = tmp_path / "h.csv"
    header_only.write_text("text\n")
    assert "no records" in str(error_of(header_only, "text"))
    missing = error_of(tmp_path / "nope.jsonl", on_error="skip")
    assert "nope.jsonl" in str(missing) and "no such file" in str(missing)


def test_chat_role_aliases_and_field_mapping(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}, {"from": "Critic", "value": "C"}]}
    path = jsonl(tmp_path, [row])
    fields = {"messages": "conversations", "role": "from", "content": "value", "roles": {"critic": "user"}}
    record = read_records(path, "chat", fields=fields).records[0]
    assert [m.role for m in record.messages] == ["system", "user", "assistant", "user"]


def test_pair_single_negative_and_prompt_answer_alias(tmp_path):
    pair = read_records(jsonl(tmp_path, [{"anchor": "a", "positive": "p", "negative": "n"}]), "pair").records[0]
    assert pair.negatives == ["n"]
    prompt = read_records(jsonl(tmp_path, [{"prompt": "2+2?", "answer": "4"}], "p.jsonl"), "prompt").records[0]
    assert prompt == PromptRecord("2+2?", "4", prompt.source)


def test_unknown_fields_and_arguments_are_config_errors(tmp_path):
    path = jsonl(tmp_path, [INSTR])
    with pytest.raises(ConfigError, match="outptu"):
        read_records(path, "instruction", fields={"outptu": "answer"})
    with pytest.raises(ConfigError, match="kind"):
        read_records(path, "sft")
    with pytest.raises(ConfigError, match="on_error"):
        read_records(path, on_error="ignore")


# ------------------------------------------------------------------------------------------ skip mode, auto kind

def test_skip_mode_counts_and_keeps_five_messages(tmp_path):
    rows = [INSTR] + ["{bad"] * 7 + [{"instruction": "q"}, INSTR]
    result = read_records(jsonl(tmp_path, rows), "instruction", on_error="skip")
    assert len(result.records) == 2 and result.skipped == 8 and len(result.errors) == 5
    assert "line 2" in result.errors[0]


def test_skip_mode_with_nothing_valid_raises(tmp_path):
    error = error_of(jsonl(tmp_path, ["{bad", "{bad"]), "instruction", on_error="skip")
    assert "all 2 were skipped" in str(error)


def test_iter_records_streams_and_reports_skips(tmp_path):
    skipped = []
    records = iter_records(jsonl(tmp_path, [INSTR, "nope", INSTR]), "instruction", on_error="skip",
                           on_skip=skipped.append)
    assert next(records).source.line == 1 and skipped == []
    assert next(records).source.line == 3 and len(skipped) == 1 and skipped[0].line == 2


def test_iter_records_checks_paths_before_iterating(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        iter_records(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("row, kind, cls", [
    (CHAT, "chat", ChatRecord), (INSTR, "instruction", InstructionRecord),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference", PreferenceRecord),
    ({"anchor": "a", "positive": "p"}, "pair", PairRecord), ({"prompt": "p"}, "prompt", PromptRecord),
    ({"text": "t"}, "text", TextRecord),
])
def test_auto_kind_detection(tmp_path, row, kind, cls):
    result = read_records(jsonl(tmp_path, [row]))
    assert result.kind == kind and isinstance(result.records[0], cls)


def test_auto_kind_with_mapped_fields_and_failure(tmp_path):
    path = jsonl(tmp_path, [{"question": "q", "answer": "a"}])
    assert read_records(path, fields={"instruction": "question", "output": "answer"}).kind == "instruction"
    error = error_of(path)
    assert "data.jsonl" in str(error) and "line 1" in str(error) and "kind" in str(error)


def test_auto_kind_skips_a_malformed_first_line(tmp_path):
    result = read_records(jsonl(tmp_path, ["{oops", INSTR]), on_error="skip")
    assert result.kind == "instruction" and result.skipped == 1


# ----------------------------------------------------------------------------------------------------- properties

nonblank = st.text(min_size=1).filter(lambda s: s.strip() != "")
instruction_rows = st.fixed_dictionaries(
    {"instruction": nonblank, "output": nonblank},
    optional={"input": st.text(), "system": nonblank})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(instruction_rows, min_size=1, max_size=8), st.booleans())
def test_property_instruction_jsonl_round_trip(rows, ascii_only):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows), encoding="utf-8")
        records = read_records(path, "instruction").records
    expected = [(r["instruction"], r["output"], r.get("input", ""), r.get("system")) for r in rows]
    assert [(r.instruction, r.output, r.input, r.system) for r in records] == expected
    assert [r.source.line for r in records] == list(range(1, len(rows) + 1))


junk_lines = st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                                st.sampled_from([b'{"text": "x"}', b"[]", b"{}", b"null", b'{"messages": [1]}'])),
                      max_size=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk_lines, st.sampled_from(["jsonl", "json", "csv", "tsv", "txt", "parquet"]),
       st.sampled_from(["auto", "chat", "text"]), st.sampled_from(["raise", "skip"]))
def test_property_junk_only_ever_raises_data_error(lines, extension, kind, on_error):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"junk.{extension}"
        path.write_bytes(b"\n".join(lines))
        try:
            result = read_records(path, kind, on_error=on_error,
                                  text_split="line" if extension == "txt" else "document")
        except DataError:
            return
        assert result.records and result.skipped >= 0


# ------------------------------------------------------------------------------ byte-order marks, other encodings

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name, body, kind, split, expected", [
    ("d.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n', "auto", "document", [("a", 1), ("b", 3)]),
    ("d.json", b'[\n{"text": "a"},\n{"text": "b"}]', "auto", "document", [("a", 0), ("b", 1)]),
    ("d.csv", b'text,n\n"a",1\nb,2\n', "auto", "document", [("a", 2), ("b", 3)]),
    ("d.csv", b'"text"\r\n"multi\r\nline"\r\nb\r\n', "text", "document", [("multi\r\nline", 2), ("b", 4)]),
    ("d.tsv", b"text\tn\na\t1\nb\t2\n", "auto", "document", [("a", 2), ("b", 3)]),
    ("d.txt", b"first\nsecond\n", "text", "document", [("first\nsecond\n", 1)]),
    ("d.md", b"first\n\nthird\n", "text", "line", [("first", 1), ("third", 3)]),
])
def test_utf8_bom_at_file_start_is_dropped_in_every_text_format(tmp_path, name, body, kind, split, expected):
    """Windows editors save UTF-8 with a byte-order mark; it is no part of the first record or header."""
    path = tmp_path / name
    path.write_bytes(BOM + body)
    records = read_records(path, kind, text_split=split).records
    assert [(r.text, r.source.line) for r in records] == expected


def test_utf8_bom_inside_a_file_is_not_dropped(tmp_path):
    """Only the file's first bytes can be a byte-order mark; elsewhere U+FEFF is content, or a broken line."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n' + BOM + b'{"text": "b"}\n')
    error = error_of(path, "text")
    assert error.line == 2 and "malformed JSON" in str(error)
    text = tmp_path / "d.txt"
    text.write_bytes(b"a" + BOM + b"b")
    assert read_records(text, "text").records[0].text == "a\ufeffb"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-32"])
@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.txt"])
def test_utf16_and_utf32_files_are_refused_as_a_whole(tmp_path, codec, name):
    """PowerShell's `>` and Notepad's "Unicode" write UTF-16. Decoded as UTF-8, only the byte-order mark fails:
    the rest reads as text full of NUL characters, which skip mode used to keep as records."""
    path = tmp_path / name
    bom = {"utf-16-le": codecs.BOM_UTF16_LE}.get(codec, b"")
    path.write_bytes(bom + "text\nhello\nworld\n".encode(codec))
    error = error_of(path, "text", on_error="skip", text_split="line")
    assert error.path == str(path) and error.line is None, str(error)
    assert f"{codec[:6].upper()} byte-order mark" in str(error) and "save it as UTF-8" in str(error)


# ------------------------------------------------------------------------------------- content as a list of parts

def text_parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


def test_chat_content_as_text_parts_is_joined_in_order(tmp_path):
    """OpenAI-style content parts, as many public chat data sets store them; text parts are concatenated as
    written (no separator added), mixed freely with plain-string content."""
    row = {"messages": [{"role": "system", "content": text_parts("Be terse.")},
                        {"role": "user", "content": text_parts("Line one.\n", "Line two.")},
                        {"role": "assistant", "content": "Plain string."},
                        {"role": "user", "content": [{"type": "text", "text": "Tagged", "cache_control": None}]},
                        {"role": "assistant", "content": text_parts("Hel", "lo", " world.")}]}
    record = read_records(jsonl(tmp_path, [row])).records[0]
    assert [m.content for m in record.messages] == ["Be terse.", "Line one.\nLine two.", "Plain string.", "Tagged",
                                                    "Hello world."]


def test_chat_content_parts_with_mapped_fields_csv_and_parquet(tmp_path):
    row = {"conversations": [{"from": "human", "value": text_parts("Q")}, {"from": "gpt", "value": text_parts("A")}]}
    fields = {"messages": "conversations", "role": "from", "content": "value"}
    record = read_records(jsonl(tmp_path, [row]), "chat", fields=fields).records[0]
    assert record.messages == [Message("user", "Q"), Message("assistant", "A")]
    csv_path = tmp_path / "c.csv"
    cell = json.dumps([{"role": "user", "content": text_parts("Q")},
                       {"role": "assistant", "content": text_parts("A")}]).replace('"', '""')
    csv_path.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert read_records(csv_path).records[0].messages[1] == Message("assistant", "A")
    # Arrow gives every part of a column the union of the parts' keys, so a text part carries image_url: None.
    parquet = tmp_path / "p.parquet"
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]},
                          {"role": "assistant", "content": text_parts("A", "!")}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": text_parts("B")}]}]
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    result = read_records(parquet, on_error="skip")
    assert result.records[0].messages[1].content == "A!" and result.skipped == 1
    assert "record 1, field 'messages[0].content[0].type'" in result.errors[0] and "image_url" in result.errors[0]


def message_rows(content, role="assistant"):
    user = {"role": "user", "content": "Hi"}
    return {"messages": [user, {"role": role, "content": content}] if role == "assistant" else
            [{"role": role, "content": content}, {"role": "assistant", "content": "A"}]}


@pytest.mark.parametrize("row, field, words", [
    (message_rows([{"type": "image_url", "image_url": {"url": "https://x/y.png"}}], role="user"),
     "messages[0].content[0].type", "'image_url' content part"),
    (message_rows(text_parts("Look:") + [{"type": "input_audio", "input_audio": {"data": "..."}}]),
     "messages[1].content[1].type", "'input_audio' content part"),
    (message_rows([{"type": "refusal", "refusal": "No."}]), "messages[1].content[0].type", "'refusal'"),
    (message_rows(["just a string"]), "messages[1].content[0]", "expected a content part object, got string"),
    (message_rows([{"text": "no type"}]), "messages[1].content[0].type", "missing required field"),
    (message_rows([{"type": 3}]), "messages[1].content[0].type", "expected a string, got number"),
    (message_rows([{"type": "text"}]), "messages[1].content[0].text", "missing required field"),
    (message_rows([{"type": "text", "text": None}]), "messages[1].content[0].text", "got null"),
    (message_rows([{"type": "text", "text": ["a"]}]), "messages[1].content[0].text", "expected a string, got list"),
    (message_rows([]), "messages[1].content", "empty assistant turn"),
    (message_rows(text_parts(" ", "\n")), "messages[1].content", "empty assistant turn"),
    (message_rows({"type": "text", "text": "a dict"}), "messages[1].content",
     "expected a string or a list of content parts, got object"),
    (message_rows(7), "messages[1].content", "expected a string or a list of content parts, got number"),
])
def test_chat_content_part_errors_name_the_part(tmp_path, row, field, words):
    error = error_of(jsonl(tmp_path, [CHAT, row]), "chat")
    assert error.field == field and error.line == 2, str(error)
    assert words in str(error) and f"data.jsonl, line 2, field '{field}'" in str(error)


def test_image_part_error_says_only_text_is_read(tmp_path):
    error = error_of(jsonl(tmp_path, [message_rows([{"type": "image_url", "image_url": {"url": "u"}}], "user")]))
    assert "only text parts" in str(error)
