"""Peak memory of the loss path alone: final hidden states (B, T, H) -> summed next-token loss, forward and
backward, with tuneforge's chunked fused path (`tuneforge.objectives.logprobs.fused_nll_sum`) versus plain
full logits + `F.cross_entropy` (what `model(labels=...)` does), at several sequence lengths.

Each (path, length) runs in its own subprocess. The child allocates the inputs (hidden states that require
grad, the output-projection weight, targets), resets the peak-RSS counter (`/proc/self/clear_refs`), runs
forward + backward, and reports the peak resident memory above what the inputs already held, i.e. what the
loss path itself costs. Defaults are SmolLM2-135M's shapes: H=576, V=49152, batch 8, every position
supervised (the worst case for both paths).

    python bench/logits_memory.py [--lengths 512,2048] [--batch 8] [--dtype float32|bfloat16] [--train-head]

The table is printed and written to bench/results/logits-memory-<timestamp>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(path: str, batch: int, length: int, hidden: int, vocab: int, dtype: str, train_head: bool,
          chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from tuneforge.objectives.logprobs import fused_nll_sum

    torch.manual_seed(0)
    h = torch.randn(batch, length, hidden) * 0.5
    h = h.to(getattr(torch, dtype)).requires_grad_(True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_(train_head)
    y = torch.randint(0, vocab, (batch, length))
    # warm the allocator and kernels on a tiny problem so the measurement is the loss path, not lazy init
    fused_nll_sum(h[:1, :8].reshape(-1, hidden).detach().requires_grad_(True), w, y[:1, :8].reshape(-1), 4).backward()
    F.cross_entropy((h[:1, :8].detach().float() @ w.detach().T).reshape(-1, vocab), y[:1, :8].reshape(-1)).item()
    before = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    if path == "fused":
        loss = fused_nll_sum(h.reshape(-1, hidden), w, y.reshape(-1), chunk)
    else:
        logits = (h @ w.to(h.dtype).T).float()  # (B, T, V): full logits, float32 for the softmax
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    return {"path": path, "batch": batch, "length": length, "positions": batch * length, "dtype": dtype,
            "train_head": train_head, "chunk": chunk if path == "fused" else None,
            "inputs_rss_mb": round(before / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "loss_path_peak_mb": round((peak - before) / 1024, 1), "exact_reset": exact,
            "seconds": round(seconds, 2), "loss_per_token": float(loss) / (batch * length)}


def run_one(args, path: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--batch", str(args.batch), "--lengths", str(length),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype,
           "--chunk", str(args.chunk)] + (["--train-head"] if args.train_head else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"path": path, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    out = ["| loss path | batch x length | positions | dtype | loss-path peak MB | process peak MB | seconds |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['path']} | ? x {r['length']} | | | error: {r['error']} | | |")
            continue
        name = f"fused chunked (chunk {r['chunk']})" if r["path"] == "fused" else "full logits + cross_entropy"
        out.append(f"| {name} | {r['batch']} x {r['length']} | {r['positions']} | {r['dtype']} | "
                   f"{r['loss_path_peak_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="dtype of the hidden states (bfloat16: as under bf16 autocast)")
    ap.add_argument("--chunk", type=int, default=1024, help="positions per chunk of the fused path")
    ap.add_argument("--train-head", action="store_true", help="the head weight trains too (full fine-tuning)")
    ap.add_argument("--paths", default="fused,full")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"),
                    help="folder for logits-memory-<timestamp>.md/.json ('' to skip)")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.batch, lengths[0], args.hidden, args.vocab, args.dtype,
                               args.train_head, args.chunk)))
        return 0
    rows = [run_one(args, p, t) for t in lengths for p in args.paths.split(",")]
    text = table(rows)
    print(text)
    if args.out:
        import datetime
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        head = (f"# Loss-path memory ({stamp}): hidden (B, T, {args.hidden}) -> summed loss, V={args.vocab}, "
                f"forward + backward, head {'trains' if args.train_head else 'frozen'}\n\n")
        (out / f"logits-memory-{stamp}.md").write_text(head + text + "\n")
        (out / f"logits-memory-{stamp}.json").write_text(json.dumps(rows, indent=1))
        print(f"\nwritten {out / ('logits-memory-' + stamp)}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
