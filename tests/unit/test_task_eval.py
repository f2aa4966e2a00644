"""Task metrics (eval.metrics) on hand-computed answers, and base against tuned answer by answer."""

from __future__ import annotations

import json

import pytest

from tuneforge.config.schema import EvalSection
from tuneforge.errors import ConfigError
from tuneforge.eval.task import answer_diff, change, diff_summary, metric_scorer, score_answers, win_rate
from tuneforge.rl.rewards import RewardError

REFS = ["BILLING", "TECH", "RETURNS", "ACCOUNT"]


def scored(outputs, metrics=("exact", "contains")):
    scorer = metric_scorer(EvalSection(metrics=list(metrics)).metrics)
    rows = score_answers(scorer, ["p"] * len(outputs), outputs, REFS[:len(outputs)])
    return {"names": scorer.names, "n": len(rows), "per_example": rows,
            "examples": [{"prompt": f"q{i}", "reference": r, "output": o}
                         for i, (o, r) in enumerate(zip(outputs, REFS))]}


def test_exact_and_contains_by_hand():
    res = scored([" BILLING ", "It is tech.", "SHIPPING", "ACCOUNT\n  "])
    assert res["names"] == ["exact", "contains"]
    # exact: whitespace-normalised equality (case kept); contains: reference inside, any case
    assert res["per_example"] == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]


def test_regex_metric_with_args_and_a_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def first_word(prompts, completions, references, *, bonus=0.0):\n"
        "    return [float(c.split()[:1] == r.split()[:1]) + bonus for c, r in zip(completions, references)]\n")
    monkeypatch.chdir(tmp_path)
    metrics = [{"name": "regex", "args": {"pattern": "^[A-Z]+$"}}, "regex",
               {"name": "my_scores:first_word", "args": {"bonus": 0.5}}]
    with pytest.raises(ConfigError, match="regex.*bad args|pattern"):  # regex without its pattern
        metric_scorer(EvalSection(metrics=metrics).metrics)
    metrics[1] = {"name": "regex", "args": {"pattern": "billing", "ignore_case": True}}
    res = scored(["BILLING", "tech support", "RETURNS now"], metrics)
    assert res["names"] == ["regex", "regex_2", "first_word"]
    assert res["per_example"] == [[1.0, 1.0, 1.5], [0.0, 0.0, 0.5], [0.0, 0.0, 1.5]]


def test_metric_names_are_checked_in_the_config():
    with pytest.raises(ValueError, match="unknown metric 'exakt' \\(did you mean 'exact'\\?\\)"):
        EvalSection(metrics=["exakt"])
    with pytest.raises(ValueError):
        EvalSection(metrics=[])
    assert EvalSection(metrics="contains").metrics[0].name == "tuneforge.eval.task:contains"
    with pytest.raises(ConfigError, match="eval.metrics.0.*no module named 'nowhere'"):
        metric_scorer(EvalSection(metrics=["nowhere:fn"]).metrics)


def test_a_metric_that_returns_the_wrong_count_names_itself(tmp_path, monkeypatch):
    (tmp_path / "bad_scores.py").write_text("def short(prompts, completions, references):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError, match="metric bad_scores:short \\(eval.metrics.0\\) returned 1 values for 2"):
        scored(["a", "b"], ["bad_scores:short"])


def test_change_compares_metrics_in_order():
    assert change([0, 1], [1, 1]) == "improved"
    assert change([1, 1], [0, 1]) == "regressed"
    assert change([0, 0], [0, 1]) == "improved"  # the second metric breaks the tie
    assert change([1, 0], [0, 1]) == "regressed"  # the first metric decides
    assert change([0.5, 1], [0.5, 1]) == "unchanged"


def test_win_rate_and_diff_count_each_prompt_once_with_ties_half():
    base = scored(["billing please", "TECH", "no idea", "ACCOUNT"])  # contains, exact, wrong, exact
    tuned = scored(["BILLING", "the TECH team", "no idea", "ACCOUNT"])  # exact (win), contains (loss), ties
    assert win_rate(base, tuned) == {"win_rate": (1 + 2 / 2) / 4, "wins": 1, "ties": 2, "losses": 1}
    assert win_rate(tuned, base)["wins"] == 1 and win_rate(base, base)["win_rate"] == 0.5
    rows = answer_diff(base, tuned)
    assert [r["change"] for r in rows] == ["improved", "regressed", "unchanged", "unchanged"]
    assert rows[0] == {"index": 0, "change": "improved", "prompt": "q0", "reference": "BILLING",
                       "base": "billing please", "tuned": "BILLING", "base_scores": {"exact": 0.0, "contains": 1.0},
                       "tuned_scores": {"exact": 1.0, "contains": 1.0}}
    json.dumps(rows)  # the rows go to a JSON-lines file as they are
    assert diff_summary(rows) == {"improved": 1, "regressed": 1, "unchanged": 2}


def test_diff_refuses_results_scored_differently():
    with pytest.raises(ValueError, match="scored differently"):
        answer_diff(scored(["a", "b"]), scored(["a", "b"], ["exact"]))
    other = scored(["a", "b"])
    other["examples"][1]["prompt"] = "another"
    with pytest.raises(ValueError, match="example 1: base and tuned answered different prompts"):
        answer_diff(scored(["a", "b"]), other)
