"""Rule-judged comparison of the tuned model's answers with the base model's, answer by answer."""

from tuneforge.eval.task import score, win_rate


def test_win_rate_counts_each_prompt_once_with_ties_half():
    refs = ["BILLING", "TECH", "RETURNS", "ACCOUNT"]
    base = ["billing please", "TECH", "no idea", "ACCOUNT"]  # lenient, exact, wrong, exact
    tuned = ["BILLING", "the TECH team", "no idea", "ACCOUNT"]  # exact (win), lenient (loss), tie, tie
    b = {"per_example": [[score(o, r)["exact"], score(o, r)["lenient"]] for o, r in zip(base, refs)]}
    t = {"per_example": [[score(o, r)["exact"], score(o, r)["lenient"]] for o, r in zip(tuned, refs)]}
    assert win_rate(b, t) == {"win_rate": (1 + 2 / 2) / 4, "wins": 1, "ties": 2, "losses": 1}
    assert win_rate(t, b)["wins"] == 1 and win_rate(b, b)["win_rate"] == 0.5
