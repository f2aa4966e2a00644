#!/usr/bin/env python3
"""Preference data for the DPO demo, from the quick-start routing task: the preference is checkable by a rule.

Each routing example of examples/demo/ (written by scripts/make_demo_data.py) becomes one preference pair:
the prompt is the customer message with its instruction, the chosen answer is the right team code, the
rejected answer is another team's code, drawn with a fixed seed. So "which answer is better" is decided by a
rule (the right code), never by a model, and the held-out pairs keep the held-out set's unseen phrasings.

Deterministic: stdlib only, fixed seed, identical bytes every run.

`--rejected base` (the DPO demo's data, examples/demo_prefs_base/): every other pair's rejected answer is what
the base model itself writes for the prompt (SmolLM2-135M-Instruct, greedy, so the same text every run on the
same software), the others keep a wrong code. A base model that answers in prose is then shown, on its own
outputs, that the code is preferred to what it would say: on-policy negatives, as pairs from `tuneforge rank`
would be, with a rule in place of the person. Still judged by the rule: the base's prose never is the right code.

    python scripts/make_preference_demo.py                 # examples/demo/*.jsonl -> examples/demo_prefs/
    python scripts/make_preference_demo.py --rejected base # -> examples/demo_prefs_base/ (loads the model)
    python scripts/make_preference_demo.py --src DIR --out DIR --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODES = ("BILLING", "SHIPPING", "RETURNS", "ACCOUNT", "TECH")


def pairs(lines: list[str], rng: random.Random) -> list[dict]:
    out = []
    for line in lines:
        rec = json.loads(line)
        prompt = f"{rec['instruction']}\n\n{rec['input']}" if rec.get("input") else rec["instruction"]
        wrong = rng.choice([c for c in CODES if c != rec["output"]])
        out.append({"prompt": prompt, "chosen": rec["output"], "rejected": wrong})
    return out


def base_answers(prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """The embedded base model's own greedy answers (rendered as tuneforge trains and generates)."""
    sys.path.insert(0, str(ROOT))
    from tuneforge.eval.generation import generate
    from tuneforge.models.load import load_causal_lm
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    return generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens, 50)


def with_base_rejected(rows: list[dict], answers: list[str]) -> list[dict]:
    """Even rows: the base model's answer is the rejected one (kept only where the rule says it is wrong, which
    for prose is always); odd rows keep their wrong code."""
    out = []
    for i, (row, answer) in enumerate(zip(rows, answers)):
        if i % 2 == 0 and answer.strip() and answer.strip() != row["chosen"]:
            row = {**row, "rejected": answer}
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(ROOT / "examples" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "examples" / "demo_prefs"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rejected", choices=("code", "base"), default="code",
                    help="rejected answers: a wrong code (default), or on every other pair the base model's own")
    args = ap.parse_args(argv)
    if args.rejected == "base" and args.out == str(ROOT / "examples" / "demo_prefs"):
        args.out = str(ROOT / "examples" / "demo_prefs_base")
    src, out = Path(args.src), Path(args.out)
    if not (src / "train.jsonl").exists():
        raise SystemExit(f"{src / 'train.jsonl'} not found: run scripts/make_demo_data.py first")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for split in ("train", "eval"):
        rows = pairs((src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), rng)
        if args.rejected == "base":
            rows = with_base_rejected(rows, base_answers([r["prompt"] for r in rows]))
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} {split} pairs to {out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
