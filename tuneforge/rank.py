"""`tuneforge rank`: a person ranks sampled answers in the terminal; each decision becomes preference records.

Why it writes at once: ranking is slow human work, so every decision is appended and fsynced before the next
prompt is shown. Ctrl-C, Ctrl-D, `q`, a kill or a crash loses nothing already answered, and a rerun of the same
command asks only the prompts not done yet (identified by a hash of their text).

Two files:
- OUT (e.g. prefs.jsonl) holds preference records only, `{"prompt", "chosen", "rejected", "rank": {...}}`, so
  that it is `data.train` as it is (`data.kind: preference`; the reader ignores the `rank` metadata). A ranking
  of n answers gives every pair it implies: best of n gives n-1 pairs, a full order n(n-1)/2.
- OUT.ties-skips holds the decisions that give no pair (a tie, a skip, answers all identical), so that a rerun
  does not ask them again. Its name has no data extension: a folder scan of data.train passes it by.
One decision is one write: a write cut short (a torn last line, a ranking with some of its pairs missing) is
cut off the file at the next start, and that prompt is asked again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tuneforge.errors import DataError, TuneforgeError
from tuneforge.repl import terminal_input

SIDECAR_SUFFIX = ".ties-skips"
HELP = """\
  1        answer 1 is the best (it beats every other answer: n-1 pairs)
  2 1 3    a full order, best first (every pair it implies; the last number may be left out)
  2 1      with 3-4 answers: 2 beats 1, and both beat the answers not listed (not ordered among themselves)
  =        a tie: no preference, no pair written; the prompt counts as done
  s        skip: no pair written; recorded, so a rerun does not ask it again (--ask-skipped asks again)
  q        quit (Ctrl-D and Ctrl-C too): everything answered is already on disk; rerun to continue
  ?        this help"""


class BadInput(ValueError):
    """What the person typed is not a decision; the message is the one-line hint re-asked with."""


@dataclass(frozen=True)
class Decision:
    action: str  # "order", "tie", "skip", "quit", "help"
    order: tuple[int, ...] = ()  # answer numbers (1-based), best first


def parse_decision(text: str, n: int) -> Decision:
    """The decision typed for n answers, or BadInput with a one-line hint."""
    text = text.strip().lower()
    words = {"?": "help", "h": "help", "help": "help", "q": "quit", "quit": "quit", "s": "skip",
             "skip": "skip", "=": "tie", "tie": "tie"}
    if text in words:
        return Decision(words[text])
    tokens = text.replace(",", " ").replace(">", " ").split()
    if len(tokens) == 1 and tokens[0].isdigit() and len(tokens[0]) > 1:
        tokens = list(tokens[0])  # "213" for "2 1 3": answers are numbered 1-4, one digit each
    if not tokens or not all(t.isdigit() for t in tokens):
        raise BadInput(f"type the best answer (1-{n}), an order like {' '.join(map(str, range(n, 0, -1)))}, "
                       "= for a tie, s to skip, q to quit, ? for help")
    order = tuple(int(t) for t in tokens)
    wrong = [k for k in order if not 1 <= k <= n]
    if wrong:
        raise BadInput(f"there is no answer {wrong[0]}: the answers are numbered 1 to {n}")
    twice = [k for k in order if order.count(k) > 1]
    if twice:
        raise BadInput(f"answer {twice[0]} is listed twice: list each answer once, best first")
    return Decision("order", order)


def implied_pairs(order: tuple[int, ...], n: int) -> list[tuple[int, int]]:
    """(winner, loser) pairs of a best-first order of some of the n answers; those not listed rank below all
    listed ones, unordered among themselves. Best of n: n-1 pairs; a full order: n(n-1)/2."""
    below = [k for k in range(1, n + 1) if k not in order]
    return [(w, loser) for i, w in enumerate(order) for loser in (*order[i + 1:], *below)]


def prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ prompts, out files

def read_prompts(path: str) -> list[str]:
    """The prompts of a file: JSONL/JSON/CSV/TSV/Parquet records with a `prompt` field (the prompt reader), or
    any other file as plain text, one prompt per line (blank lines skipped)."""
    from tuneforge.data.readers import EXTENSIONS, read_records
    fmt = EXTENSIONS.get(Path(path).suffix.lower())
    if fmt in (None, "text"):
        records = read_records(path, kind="text", format="text", text_split="line").records
        return [r.text.strip() for r in records]
    return [r.prompt for r in read_records(path, kind="prompt").records]


def read_log(path: Path) -> list[dict]:
    """The records of an append-only JSONL file this command writes. A torn tail (a last line without its
    newline, or an incomplete ranking: fewer pairs than its `rank.pairs`) is cut off the file, with a note."""
    if not path.exists():
        return []
    data = path.read_bytes()
    entries, offset = [], 0  # (byte offset, record)
    for lineno, raw in enumerate(data.splitlines(keepends=True), 1):
        start, offset = offset, offset + len(raw)
        if not raw.endswith(b"\n"):
            return _cut(path, entries, start, "a torn last line")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as error:
            raise DataError(f"malformed JSON ({error}); this file is written by tuneforge rank: fix or remove "
                            "the line", str(path), lineno) from None
        entries.append((start, obj if isinstance(obj, dict) else {}))
    last = _rank_meta(entries[-1][1]) if entries else {}
    if last.get("pairs"):  # the last decision's pairs are one write: all of them are there, or it is cut
        group = 0
        while group < len(entries) and _rank_meta(entries[-1 - group][1]).get("id") == last.get("id"):
            group += 1
        if group < last["pairs"]:
            return _cut(path, entries, entries[-group][0], "a ranking with some of its pairs missing")
    return [obj for _, obj in entries]


def _rank_meta(record: dict) -> dict:
    meta = record.get("rank")
    return meta if isinstance(meta, dict) else {}


def _cut(path: Path, entries: list, at: int, what: str) -> list[dict]:
    os.truncate(path, at)
    print(f"{path}: cut {what} off the end (a write interrupted by a kill or a crash); its prompt is asked "
          "again", file=sys.stderr)
    return [obj for start, obj in entries if start < at]


def done_prompts(out: Path, ask_skipped: bool) -> tuple[set[str], dict[str, int]]:
    """The ids of the prompts already decided (ranked, tied, identical; skipped unless `ask_skipped`), and
    counts of what the files hold."""
    done, counts = set(), {"pairs": 0, "tie": 0, "skip": 0, "identical": 0}
    for rec in read_log(out):
        if isinstance(rec.get("prompt"), str):  # also preference records not written by rank: not asked again
            done.add(prompt_id(rec["prompt"]))
            counts["pairs"] += 1
    for rec in read_log(sidecar_path(out)):
        decision = (rec.get("rank") or {}).get("decision")
        if isinstance(rec.get("prompt"), str) and decision in counts:
            counts[decision] += 1
            if decision != "skip" or not ask_skipped:
                done.add(prompt_id(rec["prompt"]))
    return done, counts


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + SIDECAR_SUFFIX)


def append_records(path: Path, records: list[dict]) -> None:
    """One write of whole lines, flushed and fsynced before returning: on disk before the next prompt shows."""
    new = not path.exists()
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        from tuneforge.fsutil import fsync_dir
        fsync_dir(path.parent)  # the file's name is on disk too


# -------------------------------------------------------------------------------------------------- the session

def shown(text: str) -> str:
    """Text safe to print on a terminal: control characters (an escape sequence a model wrote) as \\x1b."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


def distinct_answers(samples: list[str]) -> list[str]:
    """The sampled answers without repeats or blanks: a pair of identical texts prefers nothing (the reader
    refuses it), and an empty answer is refused as a record field."""
    return list(dict.fromkeys(s for s in samples if s.strip()))


@dataclass
class Session:
    prompts: list[str]
    sample: Callable[[int, str], tuple[list[str], int]]  # (index, prompt) -> (answers drawn, seed)
    out: Path
    meta: dict  # model, adapter, run, sampling settings: copied into every record
    ask_skipped: bool = False
    read_line: Callable[[str], str] = terminal_input
    say: Callable[[str], None] = print


def run_session(s: Session) -> int:
    """Ask every prompt not done yet, in file order; returns the exit code (0 done or quit, 130 Ctrl-C)."""
    done, counts = done_prompts(s.out, s.ask_skipped)
    todo = [i for i, p in enumerate(s.prompts) if prompt_id(p) not in done]
    total, before = len(s.prompts), len(s.prompts) - len(todo)
    held = f" ({counts['pairs']} pairs, {counts['tie']} ties, {counts['skip']} skips on file)" if before else ""
    print(f"rank: {total} prompts, {before} done already{held}, {len(todo)} to go; answers are written to {s.out} "
          "as you decide (? for help)", file=sys.stderr)
    answered, code = 0, 0
    try:
        for index in todo:
            if not _ask_one(s, index, f"{before + answered + 1}/{total}"):
                break
            answered += 1
        else:
            print(f"rank: all {total} prompts done; train on them with data.train={s.out} data.kind=preference",
                  file=sys.stderr)
            return 0
    except EOFError:  # Ctrl-D: a quit
        pass
    except KeyboardInterrupt:
        code = 130
    print(f"\nrank: stopped; {before + answered} of {total} prompts done, all written to {s.out}; rerun the same "
          "command to continue", file=sys.stderr)
    return code


def _ask_one(s: Session, index: int, progress: str) -> bool:
    """Show one prompt's answers and record the decision; False when the person quits."""
    prompt = s.prompts[index]
    samples, seed = s.sample(index, prompt)
    answers = distinct_answers(samples)
    meta = {"id": prompt_id(prompt), "index": index, "seed": seed, **s.meta}
    s.say(f"\n=== prompt {progress} " + "=" * 40 + f"\n{shown(prompt)}")
    if len(answers) < 2:
        s.say(f"(the {len(samples)} answers drawn are identical or empty: nothing to rank, recorded as such)")
        append_records(sidecar_path(s.out), [{"prompt": prompt, "rank": {"decision": "identical",
                                                                          "answers": samples, **meta}}])
        return True
    for k, answer in enumerate(answers, 1):
        s.say(f"--- {k} ---\n{shown(answer)}")
    if len(answers) < len(samples):
        s.say(f"({len(samples) - len(answers)} of the {len(samples)} answers drawn repeated another or were "
              "empty: not shown)")
    n = len(answers)
    while True:
        try:
            decision = parse_decision(s.read_line(f"best 1-{n}, order, =, s, q, ?> "), n)
        except BadInput as hint:
            s.say(str(hint))
            continue
        if decision.action == "help":
            s.say(HELP)
            continue
        break
    if decision.action == "quit":
        return False
    meta["answers"] = answers
    if decision.action in ("tie", "skip"):
        append_records(sidecar_path(s.out), [{"prompt": prompt, "rank": {"decision": decision.action, **meta}}])
        return True
    pairs = implied_pairs(decision.order, n)
    below = [k for k in range(1, n + 1) if k not in decision.order]
    append_records(s.out, [{"prompt": prompt, "chosen": answers[w - 1], "rejected": answers[lose - 1],
                            "rank": {"pair": [w, lose], "pairs": len(pairs), "order": list(decision.order),
                                     "below": below, **meta}} for w, lose in pairs])
    s.say(f"(written: {len(pairs)} pair{'s' if len(pairs) != 1 else ''})")
    return True


# -------------------------------------------------------------------------------------------------- the command

def rank_command(args: argparse.Namespace, load_for_inference: Callable) -> int:
    """`tuneforge rank CONFIG --prompts FILE --out OUT [overrides]`; `load_for_inference` is the loader that
    generate and chat use (cli.py), so a run, an adapter and templates are handled as there."""
    from tuneforge import preflight
    from tuneforge.config import load_config
    cfg = load_config(args.config, args.overrides)
    preflight.check_inputs([preflight.file_input("--prompts", args.prompts)])
    preflight.check_output_file("--out", args.out)
    prompts = read_prompts(args.prompts)  # before the model loads: a bad prompts file costs no waiting
    if not prompts:
        raise TuneforgeError(f"--prompts {args.prompts}: no prompts in the file")
    out = Path(args.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    loader_args = argparse.Namespace(run=args.run, adapter=args.adapter, model=None, system=None)
    model, tokenizer, system = load_for_inference(loader_args, None if args.run else args.config, args.overrides)
    r = cfg.rank
    meta = {"model": None if args.run else cfg.model.name, "adapter": args.adapter, "run": args.run,
            "temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
            "system_prompt": system}

    def sample(index: int, prompt: str) -> tuple[list[str], int]:
        import torch

        from tuneforge.eval.generation import generate
        seed = cfg.train.seed + index  # per prompt, so a rerun (or a resumed session) draws the same answers
        torch.manual_seed(seed)
        return generate(model, tokenizer, [[{"role": "user", "content": prompt}]] * r.num_answers,
                        r.max_new_tokens, r.num_answers, system, do_sample=True, temperature=r.temperature,
                        top_p=r.top_p), seed

    return run_session(Session(prompts, sample, out, meta, ask_skipped=args.ask_skipped))
