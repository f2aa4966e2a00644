#!/usr/bin/env python3
"""Write tuneforge's default general-text set (tuneforge/data/general/general_text.jsonl), on which every run
measures forgetting: the perplexity of the model before and after tuning on text that is not the task's.

Real text, available offline: the module docstrings of Python's standard library (those with at least 800
characters of prose; pdb is left out, its text is also in pydoc_data) and three software licences from Debian's
/usr/share/common-licenses (Apache-2.0, MPL-2.0, GPL-3), each cut into paragraphs-aligned documents of at most
MAX_CHARS characters and shuffled with a fixed seed, so the first tokens already mix both kinds. Neither the
machine's man pages nor Python's pydoc_data (kept for independent checks), and none of tuneforge's demo data
(customer messages, additions, torch and numpy docstrings).

The file is committed: this script documents how it was made (Python 3.11's standard library) and remakes it.

    python scripts/make_general_text.py [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tuneforge" / "data" / "general" / "general_text.jsonl"
SKIP = {"pdb", "this", "antigravity", "idlelib", "pydoc", "pydoc_data", "turtle", "turtledemo", "tkinter"}
LICENCES = ("Apache-2.0", "MPL-2.0", "GPL-3")
MIN_DOC_CHARS, MAX_CHARS, SEED = 800, 2000, 20261203


def chunks(text: str, limit: int = MAX_CHARS) -> list[str]:
    """`text` cut at paragraph boundaries into pieces of at most `limit` characters (a longer paragraph alone)."""
    out, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + len(para) + 2 > limit:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return out


def stdlib_docs() -> list[dict]:
    docs = []
    for name in sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in SKIP):
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform modules (winreg, ...) that do not import here
            continue
        doc = inspect.getdoc(module) or ""
        if len(doc) >= MIN_DOC_CHARS:
            docs += [{"text": t, "source": f"python {sys.version_info.major}.{sys.version_info.minor} stdlib: "
                                           f"{name} module docstring"} for t in chunks(doc)]
    return docs


def licence_docs(folder: Path = Path("/usr/share/common-licenses")) -> list[dict]:
    docs = []
    for name in LICENCES:
        text = (folder / name).read_text(encoding="utf-8")
        docs += [{"text": t, "source": f"licence text: {name} ({folder / name})"} for t in chunks(text)]
    return docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    docs = stdlib_docs() + licence_docs()
    random.Random(SEED).shuffle(docs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
