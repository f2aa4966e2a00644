#!/usr/bin/env python3
"""Generate the quick-start demo data set: route short customer messages to team codes.

The task: a customer writes a short message; the model must answer with the code of the team that should
handle it: BILLING, SHIPPING, RETURNS, ACCOUNT or TECH. The codes are never named in the prompt, so the
model has to learn them from the training data, and which one is right depends on what the message is
about. The base SmolLM2-135M-Instruct answers with chatty prose (0-1% of held-out answers even contain the
right code); a minute or two of LoRA brings it to 95-100% exact match.

Messages are built from templates and slots (product, device, username, order number, amount, time,
greeting, sign-off). The held-out set (eval.jsonl) tests generalisation, not recall:
  * half of it uses templates that never appear in training (new sentences about the same kinds of
    problem: "The courier never delivered my {p}." is SHIPPING, "I can't reset my password on my {d}." is
    ACCOUNT);
  * the other half uses training templates, but only those with a product, device or username slot, filled
    from value pools that never appear in training (unseen products, devices and usernames);
  * no prompt occurs twice, within a file or across the two files.

Deterministic: stdlib only, fixed seed, so running it twice writes identical bytes.

    python scripts/make_demo_data.py            # writes examples/demo/train.jsonl and eval.jsonl
    python scripts/make_demo_data.py --out DIR --seed 7
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 300
N_EVAL = 100

INSTRUCTION = "Route this customer message to the right team."

# Slots: {p} product, {d} device, {u} username (these three have disjoint train/eval pools),
# {o} order number, {a} amount, {t} time phrase, {s} "since ..." phrase.
# Per team: (training templates, held-out templates used only in eval.jsonl).
TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "BILLING": (
        [
            "I was charged twice for order {o}.",
            "My card was billed {a} but the {p} cost less.",
            "Please send me an invoice for order {o}.",
            "There is a fee of {a} on my statement I don't recognise.",
            "My payment for the {p} was declined but the money left my account.",
            "I cancelled my plan {t} and you still took {a}.",
            "Can I change the card you charge every month?",
            "The discount code was not applied, I paid {a} too much.",
            "I need a receipt for the {p} with my company's tax number.",
            "Why was I charged {a} {t}?",
        ],
        [
            "My bank shows two payments of {a} for the {p}.",
            "Can you send the invoice for my {p} again?",
            "You billed me {a} for a plan I cancelled.",
        ],
    ),
    "SHIPPING": (
        [
            "My {p} still hasn't arrived, I ordered it {t}.",
            "The tracking for order {o} has not updated since {s}.",
            "Order {o} says delivered but there is nothing at my door.",
            "The courier left my {p} at the wrong address.",
            "When will order {o} be dispatched?",
            "Can I change the delivery address for my {p}?",
            "My parcel is stuck at the depot since {s}.",
            "The {p} was supposed to be delivered {t} and it is still not here.",
            "Where is my package? Order {o}.",
            "How long does delivery take for the {p}?",
        ],
        [
            "The parcel with my {p} has not arrived yet.",
            "Tracking says order {o} is lost somewhere.",
            "The courier never delivered my {p}.",
        ],
    ),
    "RETURNS": (
        [
            "The {p} arrived broken, I want to send it back.",
            "I got the wrong {p}, how do I return it?",
            "The {p} is too small, can I exchange it for a bigger one?",
            "I would like to return the {p} from order {o}.",
            "The {p} stopped working after one day, I want a replacement.",
            "Please send me a return label for order {o}.",
            "The box was crushed and the {p} inside is cracked.",
            "I changed my mind about the {p}, can I send it back?",
            "How many days do I have to return the {p}?",
            "The {p} is the wrong colour, I want to exchange it.",
        ],
        [
            "The {p} I received is damaged, can I return it?",
            "I want to exchange the {p} from order {o}.",
            "Can I get a return label for the {p}?",
        ],
    ),
    "ACCOUNT": (
        [
            "I forgot my password and the reset email never comes.",
            "I can't log in to my account {u} since {s}.",
            "Please delete my account {u} and all my data.",
            "How do I change the email address on my profile?",
            "My account {u} was locked after too many attempts.",
            "Someone else logged into my account {t}.",
            "The two-factor code never reaches my {d}.",
            "I want to change my username from {u} to something else.",
            "Can I merge my two accounts into one?",
            "My password reset link has expired.",
        ],
        [
            "I can't reset my password on my {d}.",
            "Please change the email on my account {u}.",
            "My account is locked since {s}.",
        ],
    ),
    "TECH": (
        [
            "Your app crashes every time I open it on my {d}.",
            "The website shows an error 500 when I click checkout.",
            "The page with the {p} will not load on my {d}.",
            "The search bar returns nothing, even for the {p}.",
            "Since the update {t} the app freezes on my {d}.",
            "Images on your site are broken on my {d}.",
            "The add to cart button does nothing on my {d}.",
            "Your app drains my {d} battery in an hour.",
            "Notifications from the app stopped working {t}.",
            "The website is very slow on my {d}.",
        ],
        [
            "The app crashes when I open the page for the {p}.",
            "Your website will not load on my {d}.",
            "The app shows an error when I search for the {p}.",
        ],
    ),
}

# Value pools: (train, eval). Eval values never appear in training.
PRODUCTS = (
    ["lamp", "jacket", "headphones", "coffee maker", "backpack", "kettle", "desk chair", "blender",
     "sneakers", "phone case", "rug", "toaster", "winter coat", "bike helmet", "frying pan", "mirror"],
    ["umbrella", "speaker", "yoga mat", "water bottle", "sofa cushion", "watch"],
)
DEVICES = (["phone", "laptop", "tablet", "PC"], ["iPad", "Android phone", "Chromebook"])
USERS = (["anna.k", "mike88", "j.smith", "lucy_w", "tom.b", "sara_22", "dave.m", "emma_r"],
         ["kim.l", "oscar_9", "nina.p"])
NOVEL_SLOTS = ("{p}", "{d}", "{u}")  # a training template is reused in eval only if it has one of these

TIMES = ["last week", "yesterday", "on Monday", "two weeks ago", "three days ago", "on Friday"]
SINCES = ["Monday", "yesterday", "last week", "this morning", "Friday", "the weekend"]
OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hey, ", "Good morning. "]
CLOSERS = ["", "", "", " Thanks.", " Please help.", " Thank you!"]


def _message(rng: random.Random, template: str, split: int) -> str:
    """Fill `template`; `split` 0 draws products/devices/usernames from the train pools, 1 from eval."""
    body = template.format(
        p=rng.choice(PRODUCTS[split]),
        d=rng.choice(DEVICES[split]),
        u=rng.choice(USERS[split]),
        o="#" + str(rng.randint(10000, 99999)),
        a="$" + str(rng.randint(5, 250)) + rng.choice(["", ".99", ".50"]),
        t=rng.choice(TIMES),
        s=rng.choice(SINCES),
    )
    opener = rng.choice(OPENERS)
    if opener.endswith(", ") and not body.startswith("I "):
        body = body[0].lower() + body[1:]
    return opener + body + rng.choice(CLOSERS)


def _draw(rng: random.Random, pool: list[str], split: int, seen: set[str]) -> str:
    for _ in range(10_000):
        msg = _message(rng, rng.choice(pool), split)
        if msg not in seen:
            seen.add(msg)
            return msg
    raise RuntimeError("could not draw a new message: template pool too small")


def _record(message: str, team: str) -> dict:
    return {"instruction": INSTRUCTION, "input": message, "output": team}


def generate(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[dict], list[dict]]:
    """Return (train, eval) records; classes are balanced (same count per team) and shuffled."""
    rng = random.Random(seed)
    teams = sorted(TEMPLATES)
    seen: set[str] = set()

    train = []
    for i in range(n_train):
        team = teams[i % len(teams)]
        train.append(_record(_draw(rng, TEMPLATES[team][0], 0, seen), team))
    rng.shuffle(train)

    evals = []
    for i in range(n_eval):
        team = teams[i % len(teams)]
        seen_templates, held_out = TEMPLATES[team]
        if (i // len(teams)) % 2 == 0:
            pool = held_out  # new phrasing
        else:
            pool = [t for t in seen_templates if any(s in t for s in NOVEL_SLOTS)]  # unseen nouns
        evals.append(_record(_draw(rng, pool, 1, seen), team))
    rng.shuffle(evals)

    assert not {r["input"] for r in train} & {r["input"] for r in evals}
    return train, evals


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=root / "examples" / "demo", help="output folder")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    train, evals = generate(args.seed)
    _write(args.out / "train.jsonl", train)
    _write(args.out / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
