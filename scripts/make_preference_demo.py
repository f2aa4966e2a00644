#!/usr/bin/env python3
"""Preference data for the DPO demo, from the quick-start routing task: the preference is checkable by a rule.

Each routing example of examples/demo/ (written by scripts/make_demo_data.py) becomes one preference pair:
the prompt is the customer message with its instruction, the chosen answer is the right team code, the
rejected answer is another team's code, drawn with a fixed seed. So "which answer is better" is decided by a
rule (the right code), never by a model, and the held-out pairs keep the held-out set's unseen phrasings.

Deterministic: stdlib only, fixed seed, identical bytes every run.

    python scripts/make_preference_demo.py                 # examples/demo/*.jsonl -> examples/demo_prefs/
    python scripts/make_preference_demo.py --src DIR --out DIR --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(ROOT / "examples" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "examples" / "demo_prefs"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    if not (src / "train.jsonl").exists():
        raise SystemExit(f"{src / 'train.jsonl'} not found: run scripts/make_demo_data.py first")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for split in ("train", "eval"):
        rows = pairs((src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(), rng)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} {split} pairs to {out / f'{split}.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
