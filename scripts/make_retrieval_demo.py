#!/usr/bin/env python3
"""Generate the contrastive demo: find the documentation of a PyTorch function from its one-line summary.

Real text, available offline and pinned: the docstrings of the installed torch (tuneforge pins the version).
Each public callable of a few torch modules whose docstring has a summary paragraph and a body gives one pair:
  anchor   = the summary (the docstring's first paragraph: "Applies a 1D average pooling over ...")
  positive = the start of the body (the paragraphs after it, prose only: cut before examples and code)
The held-out set (eval.jsonl, 20% of the functions, chosen by a fixed shuffle) tests retrieval among held-out
documents only: a tuned embedder must find a function it never saw from its summary. Duplicate summaries and
bodies (aliases of one function) are dropped, so no pair repeats within or across the files.

Not the machine's man pages nor Python's pydoc_data: those are kept for independent checks.

    python scripts/make_retrieval_demo.py          # writes examples/retrieval_demo/train.jsonl and eval.jsonl
    python scripts/make_retrieval_demo.py --out DIR --seed 7
    python scripts/make_retrieval_demo.py --large  # more torch modules and numpy's: about 1,200 training pairs,
                                                   # in examples/retrieval_bench (the contrastive benchmark's data)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
from pathlib import Path

MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.linalg", "torch.fft",
           "torch.special", "torch.distributions", "torch.utils.data", "torch.autograd")
# --large: also these (torch's and numpy's own docstrings; numpy comes with torch), for batches of 1024 pairs
LARGE_MODULES = ("torch.nn.init", "torch.nn.utils", "torch.distributed", "torch.sparse", "torch.nested", "torch.func",
                 "torch.testing", "torch.profiler", "torch.amp", "torch.optim.lr_scheduler", "torch.utils.checkpoint",
                 "torch.jit", "torch.onnx", "torch.export", "torch.cuda", "torch.backends.cudnn", "torch.masked",
                 "torch.signal.windows", "numpy", "numpy.linalg", "numpy.random", "numpy.fft", "numpy.ma",
                 "numpy.polynomial")
SEED = 1234
EVAL_SHARE = 0.2
MAX_DOC_CHARS = 400
CODE = re.compile(r"(Example::|Examples::|Example:|>>>|\.\. code-block|\.\. math::)")


def _prose(text: str) -> str:
    """One line of text, cut before the first example or code block."""
    text = CODE.split(text, maxsplit=1)[0]
    return " ".join(text.split())


def pairs(modules=MODULES) -> list[dict]:
    out, seen_text = [], set()
    seen_objects: dict[int, object] = {}  # id -> the object itself, kept alive so that no id is reused
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or not callable(obj) or id(obj) in seen_objects:
                continue
            seen_objects[id(obj)] = obj
            doc = inspect.getdoc(obj)
            paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc or "") if p.strip()]
            if paragraphs and paragraphs[0].startswith(f"{name}("):  # a signature line first (C functions)
                paragraphs = paragraphs[1:]
            if len(paragraphs) < 2:
                continue
            summary, body = _prose(paragraphs[0]), _prose(" ".join(paragraphs[1:]))[:MAX_DOC_CHARS]
            if len(summary) < 20 or len(body) < 80 or summary in seen_text or body in seen_text:
                continue
            seen_text.update((summary, body))
            out.append({"anchor": summary, "positive": body, "id": f"{module_name}.{name}"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="default examples/retrieval_demo (--large: examples/retrieval_bench)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--large", action="store_true", help="more modules: about 1,500 pairs in all")
    args = ap.parse_args()
    args.out = args.out or ("examples/retrieval_bench" if args.large else "examples/retrieval_demo")
    if args.large:
        import warnings
        warnings.filterwarnings("ignore")  # some modules warn on import (deprecations), which says nothing here
    rows = pairs(MODULES + LARGE_MODULES if args.large else MODULES)
    random.Random(args.seed).shuffle(rows)
    n_eval = int(len(rows) * EVAL_SHARE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.jsonl", rows[:n_eval]), ("train.jsonl", rows[n_eval:])):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    import numpy
    import torch
    print(f"{len(rows) - n_eval} training and {n_eval} held-out pairs from torch {torch.__version__} "
          f"{f'and numpy {numpy.__version__} ' if args.large else ''}docstrings -> {out}")


if __name__ == "__main__":
    main()
