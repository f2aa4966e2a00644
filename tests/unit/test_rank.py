"""`tuneforge rank` without a model: what typed input means, the pairs a ranking implies, the files it writes
(read back by the preference reader), resuming, and the repair of a torn tail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.data.readers import read_records
from tuneforge.errors import DataError
from tuneforge.rank import (BadInput, Session, implied_pairs, parse_decision, prompt_id, read_log, read_prompts,
                            run_session, shown, sidecar_path)


@pytest.mark.parametrize("typed, n, action, order", [
    ("1", 2, "order", (1,)), (" 2 1 3 ", 3, "order", (2, 1, 3)), ("2,1", 3, "order", (2, 1)),
    ("3>1>2>4", 4, "order", (3, 1, 2, 4)), ("213", 3, "order", (2, 1, 3)), ("=", 2, "tie", ()),
    ("S", 2, "skip", ()), ("q", 3, "quit", ()), ("?", 4, "help", ())])
def test_decisions(typed, n, action, order):
    assert parse_decision(typed, n) == type(parse_decision("q", 2))(action, order)


@pytest.mark.parametrize("typed, n, hint", [("", 2, "type the best answer (1-2)"), ("x", 3, "an order like 3 2 1"),
                                            ("3", 2, "no answer 3"), ("0", 2, "no answer 0"),
                                            ("1 1", 3, "answer 1 is listed twice"), ("1 -2", 3, "type the best")])
def test_bad_input_gives_a_one_line_hint(typed, n, hint):
    with pytest.raises(BadInput, match=hint.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_decision(typed, n)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_full_order_gives_every_pair_and_best_of_n_gives_n_minus_1(n):
    full = implied_pairs(tuple(range(n, 0, -1)), n)
    assert len(full) == n * (n - 1) // 2 == len(set(full))
    assert all(w > loser for w, loser in full)  # n beats everything after it, and so on
    assert implied_pairs((2,), n) == [(2, k) for k in range(1, n + 1) if k != 2]
    assert implied_pairs(tuple(range(n, 1, -1)), n) == full  # the last number may be left out


def test_a_partial_order_ranks_the_unlisted_below_unordered():
    assert implied_pairs((3, 1), 4) == [(3, 1), (3, 2), (3, 4), (1, 2), (1, 4)]  # no (2, 4) nor (4, 2)


def test_control_characters_are_shown_escaped():
    assert shown("a\x1b[2Jb\nc\td\x00") == "a\\x1b[2Jb\nc\td\\x00"


def test_prompts_from_lines_and_from_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n", encoding="utf-8")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb"}\n{"prompt": "c", "reference": "d"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a\nb", "c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"question": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field 'prompt': missing"):
        read_prompts(str(tmp_path / "bad.jsonl"))


def _session(tmp_path, typed: list[str], samples: dict[int, list[str]], prompts=("p0", "p1", "p2"), **kw):
    """A session whose answers are given and whose typing is `typed` (then the end of input)."""
    lines, said = iter(typed), []

    def read_line(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    s = Session(list(prompts), lambda i, p: (samples[i], 100 + i), tmp_path / "prefs.jsonl", {"model": "m"},
                read_line=read_line, say=said.append, **kw)
    return run_session(s), said


def test_session_records_read_back_as_preference_data_and_resume(tmp_path):
    answers = {0: ["a", "b", "c"], 1: ["x", "y", "x"], 2: ["same", "same", ""]}
    code, said = _session(tmp_path, ["3 1 2", "2"], answers)
    assert code == 0
    said = "\n".join(said)
    assert "1 of the 3 answers drawn repeated another" in said  # prompt 1: "x" twice, shown once
    assert "identical or empty" in said  # prompt 2: nothing to rank, nothing asked
    records = read_records(tmp_path / "prefs.jsonl").records  # kind detected: preference
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        ("p0", "c", "a"), ("p0", "c", "b"), ("p0", "a", "b"), ("p1", "y", "x")]
    first = json.loads((tmp_path / "prefs.jsonl").read_text().splitlines()[0])["rank"]
    assert first["order"] == [3, 1, 2] and first["pairs"] == 3 and first["seed"] == 100
    assert first["answers"] == ["a", "b", "c"] and first["id"] == prompt_id("p0")
    sidecar = [json.loads(line) for line in sidecar_path(tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["rank"]["decision"]) for r in sidecar] == [("p2", "identical")]
    code, said = _session(tmp_path, [], answers)  # all done: nothing asked
    assert code == 0 and not any("=== prompt" in line for line in said)


def test_ties_and_skips_are_done_unless_skips_are_asked_again(tmp_path):
    answers = {0: ["a", "b"], 1: ["c", "d"], 2: ["e", "f"]}
    _session(tmp_path, ["=", "s", "q"], answers)
    assert not (tmp_path / "prefs.jsonl").exists()  # neither gives a pair
    _, said = _session(tmp_path, ["q"], answers)
    assert "p2" in "\n".join(said) and "p0" not in "\n".join(said) and "p1" not in "\n".join(said)
    _, said = _session(tmp_path, ["q"], answers, ask_skipped=True)
    assert "p1" in "\n".join(said)


def test_a_torn_last_line_is_cut_and_its_prompt_asked_again(tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    answers = {0: ["a", "b"], 1: ["c", "d"], 2: ["e", "f"]}
    _session(tmp_path, ["1", "2"], answers)
    whole = out.read_bytes()
    out.write_bytes(whole[:-10])  # the second decision's line, cut by a kill mid-write
    _, said = _session(tmp_path, ["1", "q"], answers)
    assert "cut a torn last line" in capsys.readouterr().err
    assert "=== prompt 2/3" in said[0] and "p1" in said[0]
    assert [r.prompt for r in read_records(out, kind="preference").records] == ["p0", "p1"]


def test_a_ranking_missing_some_of_its_pairs_is_cut_whole(tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    _session(tmp_path, ["1", "3 2 1"], {0: ["a", "b"], 1: ["c", "d", "e"]}, prompts=("p0", "p1"))
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 3
    out.write_bytes(b"".join(lines[:3]))  # two of p1's three pairs made it to disk
    assert [r["prompt"] for r in read_log(out)] == ["p0"]
    assert "some of its pairs missing" in capsys.readouterr().err
    assert out.read_bytes() == lines[0]


def test_a_malformed_line_inside_the_file_is_an_error_naming_it(tmp_path):
    out = tmp_path / "prefs.jsonl"
    out.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n{"prompt": "d"}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl, line 2: malformed JSON"):
        read_log(out)
    assert Path(out).read_text().count("\n") == 3  # nothing cut


def test_an_out_path_that_cannot_be_a_file_is_refused_up_front(tmp_path):
    from tuneforge.preflight import InputPathError, check_output_file
    with pytest.raises(InputPathError, match="--out: .*: is a folder; expected a file to write"):
        check_output_file("--out", str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputPathError, match="notes.txt is a file, so no file can be written under it"):
        check_output_file("--out", str(tmp_path / "notes.txt" / "prefs.jsonl"))
    check_output_file("--out", str(tmp_path / "new" / "deeper" / "prefs.jsonl"))  # folders are made


def test_rank_section_defaults_and_bounds():
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    r = load_config(None, []).rank
    assert (r.num_answers, r.temperature, r.top_p, r.max_new_tokens) == (2, 0.8, 1.0, 128)
    assert load_config(None, ["method=clm", "rank.num_answers=4"]).rank.num_answers == 4  # read under any method
    for bad in ("rank.num_answers=5", "rank.num_answers=1", "rank.top_p=1.5", "rank.temperature=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
