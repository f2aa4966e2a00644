"""tuneforge method contrastive against sentence-transformers, side by side in one run: all-MiniLM-L6-v2, full
fine-tuning, InfoNCE with in-batch negatives (scale 20 = temperature 0.05), the same pairs, batch size, sequence
length, learning rate and precision on both sides.

Sides (each in its own child process, one after the other):
  tf         tuneforge, the whole batch in one micro-batch
  tf-cached  tuneforge, micro-batches of --mini pairs and grad_accum = batch / mini (cached mini-batching)
  st         SentenceTransformerTrainer with MultipleNegativesRankingLoss
  st-cached  SentenceTransformerTrainer with CachedMultipleNegativesRankingLoss(mini_batch_size=--mini)

Measured per side: pairs per second over the timed steps (after --warmup untimed steps; a step is one optimizer
update of --batch pairs), peak RSS (VmHWM of the child, reset just before training where the kernel allows:
`exact_reset`), and recall@1 / MRR@10 of the trained model on the held-out pairs, embedded and ranked by one
function for both sides (each anchor a query, the deduplicated held-out positives the corpus, cosine).

`--sweep 64,256,1024` instead runs the cached sides once per batch size (1 warm-up + 1 timed step, no
evaluation): the peak memory of cached mini-batching should stay flat as the batch grows.

Data: scripts/make_retrieval_demo.py --large (torch and numpy docstrings, summary -> body; made here if missing).

    .venv/bin/python bench/contrastive_run.py [--batch 64 --mini 16 --steps 20 --warmup 2] [--threads 2]
    .venv/bin/python bench/contrastive_run.py --sweep 64,256,1024 [--mini 32]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

from common import serve, spawn
from run import StepClock, _reset_peak, _status_kb, cpu_name, matmul_rates, timed_train, versions

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
DATA = ROOT / "examples" / "retrieval_bench"
MODEL = "all-minilm-l6-v2"
SIDES = {"tf": "tuneforge, one micro-batch", "tf-cached": "tuneforge, cached micro-batches",
         "st": "sentence-transformers MultipleNegativesRankingLoss",
         "st-cached": "sentence-transformers CachedMultipleNegativesRankingLoss"}


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def held_out_retrieval(encode, pairs: list[dict]) -> dict:
    """recall@1/5/10, MRR@10, nDCG@10 of `encode(texts) -> (N, D) float tensor` on held-out pairs: the one
    evaluation both sides get."""
    import torch.nn.functional as F

    from tuneforge.eval.retrieval import corpus_from_pairs, evaluate_retrieval
    anchors, positives = [p["anchor"] for p in pairs], [p["positive"] for p in pairs]
    corpus, relevant = corpus_from_pairs(anchors, positives)
    queries = F.normalize(encode(anchors).float(), dim=-1)
    documents = F.normalize(encode(corpus).float(), dim=-1)
    return evaluate_retrieval(queries, documents, relevant)


def _threads(spec: dict) -> None:
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------- tuneforge child

def child_tuneforge(spec: dict) -> dict:
    import torch

    import tuneforge.run as tr
    from tuneforge.config.schema import RunConfig
    from tuneforge.models.embedder import embed
    _threads(spec)
    work = Path(spec["workdir"])
    cached = spec["side"] == "tf-cached"
    micro = spec["mini"] if cached else spec["batch"]
    cfg = RunConfig.model_validate({
        "method": "contrastive", "model": {"name": MODEL},
        "data": {"train": spec["train"], "max_length": spec["max_length"], "cache_dir": str(work / "tokcache")},
        "contrastive": {"pooling": "mean", "normalize": True, "temperature": 0.05},
        "train": {"output_dir": str(work / "run"), "micro_batch_size": micro, "grad_accum": spec["batch"] // micro,
                  "max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0, "autocast": "none",
                  "tensorboard": False, "progress": False, "log_every": 1, "seed": 0},
        "eval": {"loss": False, "generate": False, "before": False},
    })
    clock, info, trained = StepClock(), {}, []
    timed_train(tr, cfg, clock, info, before=trained.append, count="pairs")
    out = {**info, "starts": clock.starts, "end": clock.end, "pairs": clock.pairs}
    if spec["evaluate"]:
        module = trained[0]
        tok = tr.load_tokenizer_of(cfg)
        module.eval()

        @torch.no_grad()
        def encode(texts):
            vectors = []
            for i in range(0, len(texts), 64):
                x = tok(texts[i:i + 64], padding=True, truncation=True, max_length=spec["max_length"],
                        return_tensors="pt")
                vectors.append(embed(module, x, "mean", True))
            return torch.cat(vectors)

        out["retrieval"] = held_out_retrieval(encode, read_pairs(Path(spec["eval"])))
    return out


# -------------------------------------------------------------------------------- sentence-transformers child

def child_st(spec: dict) -> dict:
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer import losses
    from transformers import TrainerCallback

    from tuneforge.models.load import resolve_spec
    _threads(spec)
    datasets.disable_progress_bars()
    work = Path(spec["workdir"])
    model = SentenceTransformer(resolve_spec(MODEL, None)[1], device="cpu")
    model.max_seq_length = spec["max_length"]
    if spec["side"] == "st-cached":
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=spec["mini"])
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    rows = read_pairs(Path(spec["train"]))
    train = datasets.Dataset.from_dict({"anchor": [r["anchor"] for r in rows],
                                        "positive": [r["positive"] for r in rows]})
    args = Args(output_dir=str(work / "run"), per_device_train_batch_size=spec["batch"],
                max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", report_to="none",
                logging_steps=10**6, seed=0, dataloader_drop_last=True, use_cpu=True, disable_tqdm=True)
    clock, info = StepClock(), {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            info["setup_peak_kb"] = _status_kb("VmHWM")
            info["exact_reset"] = _reset_peak()

        def on_step_begin(self, *a, **kw):
            clock.starts.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            clock.end = time.perf_counter()
            clock.pairs.append(spec["batch"])

    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=loss, callbacks=[Clock()])
    trainer.train()
    info["train_peak_kb"] = _status_kb("VmHWM")
    out = {**info, "starts": clock.starts, "end": clock.end, "pairs": clock.pairs}
    if spec["evaluate"]:
        model.eval()
        out["retrieval"] = held_out_retrieval(
            lambda texts: model.encode(texts, batch_size=64, convert_to_tensor=True), read_pairs(Path(spec["eval"])))
    return out


def child(spec: dict) -> dict:
    return child_st(spec) if spec["side"].startswith("st") else child_tuneforge(spec)


# ------------------------------------------------------------------------------------------------- parent

def summary(res: dict, warmup: int) -> dict:
    starts, end = res["starts"], res["end"]
    steps = len(starts)
    if steps <= warmup:
        raise SystemExit(f"{steps} steps ran, not more than the {warmup} warm-up steps")
    seconds = end - starts[warmup]
    pairs = sum(res["pairs"][warmup:steps])
    return {"steps": steps, "timed_steps": steps - warmup, "seconds": seconds, "pairs_s": pairs / seconds,
            "peak_rss_gb": res["train_peak_kb"] / 2**20, "exact_reset": res.get("exact_reset")}


def ensure_data() -> None:
    if not (DATA / "train.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_retrieval_demo.py"), "--large"], check=True,
                       cwd=ROOT)


def run_side(side: str, args, batch: int, evaluate: bool, stamp: str, steps: int, warmup: int) -> dict:
    work = WORK / f"contrastive-{side}-{batch}"
    work.mkdir(parents=True, exist_ok=True)
    spec = {"side": side, "train": str(DATA / "train.jsonl"), "eval": str(DATA / "eval.jsonl"),
            "workdir": str(work), "threads": args.threads, "batch": batch, "mini": args.mini,
            "max_length": args.max_length, "lr": args.lr, "steps": steps, "warmup": warmup, "evaluate": evaluate}
    log = WORK / "logs" / f"contrastive-{stamp}-{side}-{batch}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[contrastive-bench] {side} batch {batch} ...", end=" ", flush=True)
    res = spawn(__file__, spec, work / "spec.json", work / "result.json", log, timeout=args.timeout)
    if "error" in res:
        print("FAILED: " + res["error"], flush=True)
        return {"side": side, "batch": batch, **res}
    row = {"side": side, "batch": batch, **summary(res, warmup), "retrieval": res.get("retrieval"),
           "wall_seconds": res["wall_seconds"]}
    r1 = f", recall@1 {row['retrieval']['recall@1']:.3f}" if row["retrieval"] else ""
    print(f"{row['pairs_s']:.1f} pairs/s, peak RSS {row['peak_rss_gb']:.2f} GB{r1} ({res['wall_seconds']:.0f} s)",
          flush=True)
    return row


def fmt(rows: list[dict], sweep: bool) -> str:
    head = ("| side | batch | pairs/s | peak RSS GB | recall@1 | MRR@10 | timed steps |", "|---|---|---|---|---|---|---|")
    lines = list(head)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['side']} | {r['batch']} | FAILED: {r['error'][:80]} | | | | |")
            continue
        ret = r.get("retrieval") or {}
        rec = f"{ret['recall@1']:.3f}" if ret else "-"
        mrr = f"{ret['mrr@10']:.3f}" if ret else "-"
        lines.append(f"| {r['side']} | {r['batch']} | {r['pairs_s']:.1f} | {r['peak_rss_gb']:.2f} | {rec} | {mrr} | "
                     f"{r['timed_steps']} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    by = {(r["side"], r["batch"]): r for r in rows if "error" not in r}
    out = []
    for ours, theirs in (("tf", "st"), ("tf-cached", "st-cached")):
        for (side, batch), r in sorted(by.items()):
            peer = by.get((theirs, batch))
            if side != ours or peer is None:
                continue
            speed, memory = r["pairs_s"] / peer["pairs_s"], r["peak_rss_gb"] / peer["peak_rss_gb"]
            met = speed >= 1.5 and memory <= 1.0
            out.append(f"- {ours} / {theirs}, batch {batch}: throughput {speed:.2f}x, peak RSS {memory:.2f}x "
                       f"(target >= 1.5x at <= 1x: {'MET' if met else 'not met'})")
    return out


def flatness(rows: list[dict]) -> list[str]:
    out = []
    for side in ("tf-cached", "st-cached"):
        mine = sorted((r for r in rows if r["side"] == side and "error" not in r), key=lambda r: r["batch"])
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            growth = hi["peak_rss_gb"] / lo["peak_rss_gb"] - 1.0
            out.append(f"- {side}: peak RSS {lo['peak_rss_gb']:.2f} GB at batch {lo['batch']}, "
                       f"{hi['peak_rss_gb']:.2f} GB at batch {hi['batch']}: {100 * growth:+.1f}% "
                       f"(target within 20%: {'MET' if abs(growth) <= 0.2 else 'not met'})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="pairs per optimizer step (default 64)")
    ap.add_argument("--mini", type=int, default=16, help="pairs per cached mini-batch (default 16)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text, both sides (default 128)")
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate, both sides, constant")
    ap.add_argument("--variants", default="tf,tf-cached,st,st-cached", help="comma list from " + ",".join(SIDES))
    ap.add_argument("--sweep", default=None, help="batch sizes for the cached sides' memory sweep, e.g. 64,256,1024")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per child (default 2)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per child")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if serve(args, child, child):
        return 0
    sides = args.variants.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}: pick from {', '.join(SIDES)}")
    ensure_data()
    t0 = time.perf_counter()
    rates = matmul_rates(args.threads or None)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    if args.sweep:
        batches = [int(b) for b in args.sweep.split(",")]
        for batch in batches:
            for side in [s for s in ("tf-cached", "st-cached") if s in sides]:  # --variants narrows the sweep
                rows.append(run_side(side, args, batch, False, stamp, steps=1, warmup=1))
    else:
        if args.batch % args.mini:
            raise SystemExit(f"--batch {args.batch} is not a multiple of --mini {args.mini}")
        for side in sides:
            rows.append(run_side(side, args, args.batch, True, stamp, args.steps, args.warmup))
    n_train = len(read_pairs(DATA / "train.jsonl"))
    n_eval = len(read_pairs(DATA / "eval.jsonl"))
    command = "bench/contrastive_run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# tuneforge contrastive vs sentence-transformers: all-MiniLM-L6-v2, full fine-tuning ({stamp})", "",
             f"- command: `.venv/bin/python {command.strip()}`",
             f"- machine: {cpu_name()}; matmul GFLOP/s float32 {rates['float32']}; torch threads {args.threads}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v),
             f"- data: examples/retrieval_bench ({n_train} training pairs, {n_eval} held-out; "
             "scripts/make_retrieval_demo.py --large); max_length "
             f"{args.max_length}; float32 both sides; lr {args.lr} constant, AdamW, grad clip 1.0; scale 20",
             f"- cached mini-batch: {args.mini} pairs" + ("" if args.sweep else
             f"; {args.warmup} warm-up + {args.steps} timed steps of {args.batch} pairs"),
             "", fmt(rows, bool(args.sweep)), ""]
    lines += ratios(rows) + flatness(rows)
    lines += ["", "pairs/s: pairs of the timed steps over their wall time (step start to the last step's end). "
              "Peak RSS: VmHWM of the child after training, reset before training where the kernel allows. "
              "recall@1, MRR@10: held-out anchors among the deduplicated held-out positives, both sides embedded "
              "and ranked by the same function (bench/contrastive_run.py held_out_retrieval).", "",
              f"total wall time {time.perf_counter() - t0:.0f} s"]
    report = "\n".join(lines)
    print("\n" + report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"contrastive-{'sweep-' if args.sweep else ''}{stamp}"
    (RESULTS / f"{name}.md").write_text(report + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"args": vars(args), "rates": rates, "versions": versions(),
                                                      "rows": rows}, indent=1, default=str))
    print(f"\nwritten {RESULTS / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
