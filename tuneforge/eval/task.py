"""Task accuracy: generate an answer for each held-out prompt and score it against the reference."""

from __future__ import annotations

from tuneforge.data.chat import prompt_messages
from tuneforge.eval.generation import generate


def _norm(text: str) -> str:
    return " ".join(text.strip().split())


def score(prediction: str, reference: str) -> dict[str, float]:
    """exact: whitespace-normalised equality; lenient: the reference contained in the output (case-insensitive)."""
    p, r = _norm(prediction), _norm(reference)
    return {"exact": float(p == r), "lenient": float(r.lower() in p.lower())}


def task_accuracy(model, tokenizer, records, max_new_tokens: int = 32, batch_size: int = 16,
                  system_prompt: str | None = None, limit: int | None = None) -> dict:
    """Score chat records (their last assistant turn is the reference). Returns means and the samples."""
    records = records[:limit] if limit else records
    prompts = [prompt_messages(r) for r in records]
    refs = [[m.content for m in r.messages if m.role == "assistant"][-1] for r in records]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, system_prompt)
    scores = [score(o, ref) for o, ref in zip(outputs, refs)]
    n = max(len(scores), 1)
    return {
        "exact": sum(s["exact"] for s in scores) / n,
        "lenient": sum(s["lenient"] for s in scores) / n,
        "n": len(scores),
        "per_example": [[s["exact"], s["lenient"]] for s in scores],
        "samples": [{"prompt": p[-1]["content"], "reference": r, "output": o}
                    for p, r, o in list(zip(prompts, refs, outputs))[:5]],
    }


def win_rate(base: dict, tuned: dict) -> dict:
    """Rule-judged head-to-head of the tuned model's answers against the base model's on the same prompts: an
    answer beats the other when its (exact, lenient) score is higher (an exact answer beats a lenient one, a
    lenient one beats neither); equal scores are a tie, counted half. `win_rate` = (wins + ties / 2) / n."""
    pairs = list(zip(base["per_example"], tuned["per_example"]))
    wins = sum(tuple(t) > tuple(b) for b, t in pairs)
    losses = sum(tuple(t) < tuple(b) for b, t in pairs)
    ties = len(pairs) - wins - losses
    return {"win_rate": (wins + ties / 2) / max(len(pairs), 1), "wins": wins, "ties": ties, "losses": losses}
