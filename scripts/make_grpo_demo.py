#!/usr/bin/env python3
"""Prompts with checkable answers for the GRPO demo: two-number additions, the reference answer their sum.

A rule decides every reward (tuneforge.rl.rewards:number_match: the last number of the answer equals the
sum), never a model. Held-out prompts are additions that never occur in training (neither order). The base
SmolLM2-135M-Instruct answers about a third of them right, greedy: room to improve, and enough right samples
per group of four for GRPO to learn from.

Deterministic: stdlib only, fixed seed, identical bytes every run.

    python scripts/make_grpo_demo.py                 # -> examples/grpo_demo/{train,eval}.jsonl
    python scripts/make_grpo_demo.py --out DIR --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Compute {a} + {b}. Reply with the number only."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "examples" / "grpo_demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=335)  # all the other pairs of 2..30
    ap.add_argument("--eval", type=int, default=100)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    pairs = [(a, b) for a in range(2, 31) for b in range(2, 31) if a <= b]
    rng.shuffle(pairs)
    held, train = pairs[:args.eval], pairs[args.eval:args.eval + args.train]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", held)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for a, b in rows:
                if rng.random() < 0.5:  # either order in the prompt; the pair itself stays in one split
                    a, b = b, a
                f.write(json.dumps({"prompt": TEMPLATE.format(a=a, b=b), "reference": str(a + b)}) + "\n")
        print(f"wrote {len(rows)} {name} prompts to {out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
