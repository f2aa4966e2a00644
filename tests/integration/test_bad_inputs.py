"""Bad input through the real entry point: `tuneforge train` exits with code 2 and one line naming the file,
the line (or record) and the field; over-long and skipped examples are counted and reported.

The reader-level catalogue (every kind, format and field) is in tests/unit/test_readers.py; a malformed JSON
line through the command line is tests/integration/test_cli.py::test_malformed_jsonl_line_reported_with_line_number.
"""

from __future__ import annotations

import json

import pytest

from helpers.runs import make_config, write_config_yaml
from tuneforge.cli import main

GOOD = {"instruction": "Add 2 and 2.", "output": "The sum is 4."}
USER = {"role": "user", "content": "Hi"}


def _run(tmp_path, model_dir, capsys, rows, name="d.jsonl", **data):
    """Write `rows` (objects, raw lines, or bytes) as the train file and run `tuneforge train` on it."""
    path = tmp_path / name
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cfg = make_config(model_dir, path, tmp_path / "run", max_steps=1)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    code = main(["train", str(write_config_yaml(cfg, tmp_path / "run.yaml"))])
    out, err = capsys.readouterr()
    return code, out, err, str(path)


@pytest.mark.parametrize("rows, where, words", [
    ([GOOD, {"instruction": "q", "output": 4}], "line 2, field 'output'", "expected a string, got number"),
    ([GOOD, {"instruction": ["q"], "output": "a"}], "line 2, field 'instruction'", "got list"),
    ([GOOD, GOOD, {"instruction": "q"}], "line 3, field 'output'", "missing required field"),
    ([{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     "line 1, field 'messages[0].role'", "unknown role 'narrator'"),
    ([{"messages": [USER, {"role": "assistant", "content": "  "}]}], "line 1, field 'messages[1].content'",
     "empty assistant turn"),
    ([{"messages": [USER]}], "line 1, field 'messages'", "no assistant turn"),
    ([{"prompt": "p", "chosen": "same answer", "rejected": "same answer"}], "line 1, field 'rejected'",
     "identical"),
    (json.dumps(GOOD).encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n', "line 2",
     "not valid UTF-8: byte 0xe9"),
    ([GOOD, "[1, 2]"], "line 2", "expected a JSON object, got list"),
    (b"", "", "no records (the file is empty"),
])
def test_bad_record_exits_2_naming_file_line_field(tmp_path, tiny_model_dir, capsys, rows, where, words):
    code, _, err, path = _run(tmp_path, tiny_model_dir, capsys, rows)
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line]  # one line (stderr also has progress bars)
    assert line.startswith(f"tuneforge: error: {path}") and where in line and words in line, err


def test_bad_record_in_a_json_array_is_named_by_record_index(tmp_path, tiny_model_dir, capsys):
    code, _, err, path = _run(tmp_path, tiny_model_dir, capsys, [json.dumps([GOOD, {"output": "x"}])],
                              name="d.json")
    assert code == 2 and f"{path}, record 1, field 'instruction'" in err


def test_bad_record_in_the_eval_file_names_the_eval_file(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "held_out.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"instruction": "q", "output": ""}) + "\n")
    code, _, err, _ = _run(tmp_path, tiny_model_dir, capsys, [GOOD] * 4, eval=str(bad))
    assert code == 2 and f"{bad}, line 2, field 'output': empty string" in err


def test_skipped_records_are_counted_and_reported(tmp_path, tiny_model_dir, capsys):
    rows = [GOOD, "{broken", {"instruction": "q"}, GOOD, GOOD, GOOD]
    code, out, _, path = _run(tmp_path, tiny_model_dir, capsys, rows, on_error="skip")
    assert code == 0
    stats = json.loads(next(line for line in out.splitlines() if line.startswith("data: "))[6:])
    assert stats["skipped_records"] == 2 and stats["train"]["examples"] == 4
    assert f"{path}, line 2" in stats["skipped_examples"][0] and "line 3, field 'output'" in stats["skipped_examples"][1]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data"]["skipped_records"] == 2


@pytest.mark.parametrize("truncation, kept, counter", [("drop", 2, "dropped_too_long"),
                                                       ("left", 3, "truncated_left")])
def test_over_long_examples_are_dropped_or_cut_counted_and_reported(tmp_path, tiny_model_dir, capsys,
                                                                    truncation, kept, counter):
    long = {"instruction": "word " * 200, "output": "The sum is 4."}
    code, out, _, _ = _run(tmp_path, tiny_model_dir, capsys, [GOOD, long, GOOD], max_length=64,
                           truncation=truncation)
    assert code == 0
    stats = json.loads(next(line for line in out.splitlines() if line.startswith("data: "))[6:])
    assert stats["train"]["examples"] == kept and stats["train"][counter] == 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["data"]["train"][counter] == 1


def test_every_example_too_long_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    long = {"instruction": "Q", "output": "word " * 200}  # the response itself is too long: never cut
    code, _, err, _ = _run(tmp_path, tiny_model_dir, capsys, [long, long], max_length=64, truncation="left")
    assert code == 2 and "no train examples left" in err and "2 dropped as longer than data.max_length" in err
