"""Deterministic variable-length multi-turn chat data for the benchmarks, written as JSONL.

Real text, not random tokens: each conversation asks about functions and classes of installed Python
packages (torch, transformers, numpy, ...) and answers with their docstrings, cut at line/sentence/word
boundaries so that the whole rendered conversation (SmolLM2 chat template, including the default system
prompt the template injects) has a target length drawn uniformly from [--min-tokens, --max-tokens].
Docstrings are read from the packages' source files with `ast` (nothing is imported), in sorted file order,
and every choice comes from one seeded `random.Random`: the same installed package versions and seed give
the same bytes (the sha256 is printed).

    python bench/data.py --out bench/work/chat.jsonl [--n 1024] [--seed 0] [--min-tokens 40] [--max-tokens 500]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "numpy", "peft", "pydantic", "accelerate", "safetensors", "tqdm", "yaml")
MAX_FILES_PER_PACKAGE = 400  # sorted file order; bounds the parse time (about 10 s for all packages)

QUESTIONS = (
    "What does `{name}` in {pkg} do?",
    "Can you explain `{qual}` from the `{module}` module?",
    "I'm reading {pkg}'s source. What is `{name}` for?",
    "How do I use `{qual}`?",
    "Summarise the documentation of `{module}.{qual}` for me.",
    "What should I know before calling `{name}`?",
)
FOLLOW_UPS = (
    "Thanks. And what about `{qual}`?",
    "Related question: what does `{name}` do?",
    "Next one: `{module}.{qual}`. What is it?",
    "OK. How does `{name}` from {pkg} work?",
)


def package_root(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _clean(doc: str) -> str:
    doc = doc.replace("\r", "")
    doc = re.sub(r"\n{3,}", "\n\n", doc).strip()
    return doc


def docstrings(packages=PACKAGES) -> list[dict]:
    """(package, module, qualified name, docstring) of every documented function/class, deterministic order."""
    out: list[dict] = []
    for pkg in packages:
        root = package_root(pkg)
        if root is None:
            continue
        files = sorted(p for p in root.rglob("*.py") if "test" not in p.name and "tests" not in p.parts)
        for path in files[:MAX_FILES_PER_PACKAGE]:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            module = ".".join((pkg, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
            for qual, node in _walk(tree, ""):
                doc = ast.get_docstring(node)
                if not doc or len(doc) < 160 or not doc[0].isalpha():
                    continue
                out.append({"pkg": pkg, "module": module, "qual": qual, "name": qual.split(".")[-1],
                            "doc": _clean(doc)})
    return out


def _walk(node, prefix: str):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if child.name.startswith("_") and child.name != "__init__":
                continue
            qual = f"{prefix}{child.name}"
            yield qual, child
            if isinstance(child, ast.ClassDef):
                yield from _walk(child, qual + ".")


def _pieces(doc: str) -> list[str]:
    """The docstring split into pieces (lines, then sentences, then words) whose prefixes are answers."""
    out: list[str] = []
    for line in doc.split("\n"):
        if len(line) > 200:
            for sentence in re.split(r"(?<=[.!?])\s+", line):
                words = sentence.split(" ")
                out += [w + " " for w in words[:-1]] + [words[-1] + " "]
            out[-1] = out[-1].rstrip(" ") + "\n"
        else:
            out.append(line + "\n")
    return out


class Builder:
    def __init__(self, tokenizer, entries: list[dict], rng: random.Random):
        self.tok, self.entries, self.rng = tokenizer, entries, rng

    def length(self, messages: list[dict]) -> int:
        return len(self.tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])

    def answer(self, messages: list[dict], doc: str, budget: int) -> str | None:
        """The longest prefix of `doc` (at piece boundaries) that keeps the conversation within `budget`."""
        pieces = _pieces(doc)
        lo, hi, best = 1, len(pieces), None
        while lo <= hi:  # binary search on the number of pieces
            mid = (lo + hi) // 2
            text = "".join(pieces[:mid]).strip()
            if text and self.length(messages + [{"role": "assistant", "content": text}]) <= budget:
                best, lo = text, mid + 1
            else:
                hi = mid - 1
        return best

    def conversation(self, target: int) -> list[dict]:
        turns = 1 if target < 150 else self.rng.choice((1, 2, 2, 3) if target < 350 else (1, 2, 3, 3, 4))
        messages: list[dict] = []
        for t in range(turns):
            e = self.entries[self.rng.randrange(len(self.entries))]
            q = self.rng.choice(QUESTIONS if t == 0 else FOLLOW_UPS).format(**e)
            trial = messages + [{"role": "user", "content": q}]
            used = self.length(trial)
            remaining = turns - t
            budget = used + max(8, (target - used) // remaining) if remaining > 1 else target
            text = self.answer(trial, e["doc"], budget)
            if text is None:
                break
            messages = trial + [{"role": "assistant", "content": text}]
            if self.length(messages) >= target - 8:
                break
        return messages


def build(n: int, seed: int, min_tokens: int, max_tokens: int, tokenizer) -> list[dict]:
    rng = random.Random(seed)
    entries = docstrings()
    if not entries:
        raise SystemExit("no docstrings found in the installed packages " + ", ".join(PACKAGES))
    builder = Builder(tokenizer, entries, rng)
    out = []
    while len(out) < n:
        target = rng.randint(min_tokens, max_tokens)
        messages = builder.conversation(target)
        if len(messages) >= 2:
            out.append({"messages": messages})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/work/chat.jsonl")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-tokens", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=500)
    ap.add_argument("--model", default="smollm2", help="tokenizer that measures the lengths (tuneforge spec)")
    args = ap.parse_args(argv)
    from tuneforge.models.load import load_tokenizer
    tok = load_tokenizer(args.model)
    records = build(args.n, args.seed, args.min_tokens, args.max_tokens, tok)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out.write_text(text, encoding="utf-8")
    lengths = sorted(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                     for r in records)
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in records]
    print(json.dumps({"out": str(out), "n": len(records), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                      "tokens_min": lengths[0], "tokens_median": lengths[len(lengths) // 2],
                      "tokens_max": lengths[-1], "tokens_mean": round(sum(lengths) / len(lengths), 1),
                      "assistant_turns_mean": round(sum(turns) / len(turns), 2)}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
