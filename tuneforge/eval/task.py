"""Task accuracy: generate an answer for each held-out prompt and score it against the reference with the
metrics eval.metrics names; then base against tuned, answer by answer.

A metric is a function with the contract of online RL's reward functions (tuneforge.rl.rewards),

    fn(prompts: list[str], completions: list[str], references: list[str | None], **args) -> list[float]

one number per answer, so one scoring function serves both evaluation and training, and its output is checked
the same way (one finite number per answer, or an error naming the metric and the answer).
"""

from __future__ import annotations

from tuneforge.data.chat import prompt_messages
from tuneforge.eval.generation import generate

CHANGES = ("improved", "regressed", "unchanged")


def _norm(text: str) -> str:
    return " ".join(text.strip().split())


def exact(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 where the answer equals the reference once surrounding and repeated whitespace is normalised."""
    return [float(_norm(c) == _norm(r or "")) for c, r in zip(completions, references)]


def contains(prompts: list[str], completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 where the (whitespace-normalised) reference appears in the answer, case-insensitive."""
    return [float(_norm(r or "").lower() in _norm(c).lower()) for c, r in zip(completions, references)]


def metric_scorer(specs):
    """The eval.metrics entries as one scorer (tuneforge.rl.rewards.Rewards: imports checked now, outputs
    checked on every call)."""
    from tuneforge.rl.rewards import Rewards, load_reward_functions
    return Rewards(load_reward_functions(specs, key="eval.metrics", what="metric"))


def score_answers(scorer, prompts: list[str], outputs: list[str], references: list[str]) -> list[list[float]]:
    """Per answer, its value under each metric, in the scorer's order."""
    batch = scorer(prompts, outputs, references)
    columns = [batch.per_source[name].tolist() for name in scorer.names]
    return [list(row) for row in zip(*columns)] if columns else []


def task_accuracy(model, tokenizer, records, max_new_tokens: int = 32, batch_size: int = 16,
                  system_prompt: str | None = None, limit: int | None = None, metrics=None) -> dict:
    """Score chat records (their last assistant turn is the reference) by greedy generation. Returns
    {"metrics": {name: mean}, "n", "names", "per_example": [[value per metric]], "examples": [{prompt,
    reference, output}]}. `metrics`: eval.metrics specs (default exact and contains)."""
    if metrics is None:
        from tuneforge.config.schema import EvalSection
        metrics = EvalSection().metrics
    scorer = metric_scorer(metrics)
    records = records[:limit] if limit else records
    prompts = [prompt_messages(r) for r in records]
    refs = [[m.content for m in r.messages if m.role == "assistant"][-1] for r in records]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, system_prompt)
    texts = [p[-1]["content"] for p in prompts]
    per_example = score_answers(scorer, texts, outputs, refs)
    n = max(len(per_example), 1)
    means = {name: sum(row[j] for row in per_example) / n for j, name in enumerate(scorer.names)}
    return {"metrics": means, "n": len(per_example), "names": list(scorer.names), "per_example": per_example,
            "examples": [{"prompt": t, "reference": r, "output": o} for t, r, o in zip(texts, refs, outputs)]}


def change(base_scores, tuned_scores) -> str:
    """improved / regressed / unchanged: the scores compared in metric order (the first metric decides, the
    next break ties: an exact answer beats one that only contains the reference)."""
    b, t = tuple(base_scores), tuple(tuned_scores)
    return "improved" if t > b else "regressed" if t < b else "unchanged"


def win_rate(base: dict, tuned: dict) -> dict:
    """Rule-judged head-to-head of the tuned model's answers against the base model's on the same prompts
    (`change` per answer); an unchanged answer is a tie, counted half. `win_rate` = (wins + ties / 2) / n."""
    changes = [change(b, t) for b, t in zip(base["per_example"], tuned["per_example"])]
    wins, losses = changes.count("improved"), changes.count("regressed")
    ties = len(changes) - wins - losses
    return {"win_rate": (wins + ties / 2) / max(len(changes), 1), "wins": wins, "ties": ties, "losses": losses}


def answer_diff(base: dict, tuned: dict) -> list[dict]:
    """Per held-out example, what tuning changed: the prompt, reference, both answers, both models' scores
    (by metric name) and the change. Both results must come from the same records and metrics."""
    if base["names"] != tuned["names"] or base["n"] != tuned["n"]:
        raise ValueError(f"base and tuned were scored differently ({base['n']} answers by {base['names']}, "
                         f"{tuned['n']} by {tuned['names']}): compare results of the same records and metrics")
    names = base["names"]
    rows = []
    for i, (eb, et, sb, st) in enumerate(zip(base["examples"], tuned["examples"], base["per_example"],
                                             tuned["per_example"])):
        if eb["prompt"] != et["prompt"]:
            raise ValueError(f"example {i}: base and tuned answered different prompts")
        rows.append({"index": i, "change": change(sb, st), "prompt": eb["prompt"], "reference": eb["reference"],
                     "base": eb["output"], "tuned": et["output"], "base_scores": dict(zip(names, sb)),
                     "tuned_scores": dict(zip(names, st))})
    return rows


def diff_summary(rows: list[dict]) -> dict:
    return {c: sum(r["change"] == c for r in rows) for c in CHANGES}
