"""Preference packing with each pair's prompt once versus whole sequences: tokens per pair and the time of one
DPO LoRA update on the same pairs, SmolLM2-135M-Instruct, float32, tuneforge_varlen attention.

    python bench/pref_share.py [--pairs 16] [--repeats 2] [--threads N]

The first `--pairs` pairs of examples/demo_prefs/train.jsonl, packed into rows of data.max_length (512) tokens
by `tuneforge.run.batching`, once with whole sequences ([prompt + chosen][prompt + rejected]) and once with
the prompt shared ([prompt + chosen][rejected]); LoRA r 16, alpha 32, dropout 0 on all linear layers; one
update = `accumulate_update` over the rows (policy forward and backward, the reference forward with the
adapter disabled). The layouts alternate `--repeats` times, after one untimed update each; the losses and
gradients of the two must agree (checked). A shared machine makes the timings indicative only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "demo_prefs" / "train.jsonl"
WORK = ROOT / "bench" / "work" / "pref-share"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    import torch

    from tuneforge.config.schema import RunConfig
    from tuneforge.run import _build_module, batching, load_model_and_tokenizer, make_objective, prepare
    from tuneforge.train.loop import accumulate_update, make_autocast
    if args.threads:
        torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    data_file = WORK / f"prefs-{args.pairs}.jsonl"
    data_file.write_text("".join(DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:args.pairs]))
    cfg = RunConfig.model_validate({
        "method": "dpo", "model": {"name": "smollm2-135m-instruct"},
        "data": {"train": str(data_file), "max_length": 512, "packing": True, "cache_dir": str(WORK / "tokcache")},
        "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"output_dir": str(WORK / "run"), "autocast": "none", "micro_batch_size": args.pairs, "seed": 0},
        "eval": {"loss": False},
    })
    model, tok = load_model_and_tokenizer(cfg)
    module = _build_module(cfg, model)
    with torch.no_grad():  # away from the reference, so the loss is not ln 2 everywhere
        gen = torch.Generator().manual_seed(1)
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    data = prepare(cfg, tok)
    objective, autocast = make_objective(cfg), make_autocast("none", torch.device("cpu"))
    pairs = len(data.train)  # the training split of the slice (a held-out share may leave)
    layouts = {}
    for name, share in (("whole", False), ("shared", True)):
        rows, _, collate_fn, _ = batching(cfg, data, tok, True, share)
        batches = [collate_fn(rows[i:i + 1]) for i in range(len(rows))]
        tokens = sum(int(b["num_real"]) for b in batches)
        layouts[name] = {"batches": batches, "rows": len(rows), "tokens": tokens, "seconds": []}

    def update(batches):
        module.zero_grad(set_to_none=True)
        totals = accumulate_update(module, objective, batches, autocast)
        return totals, {n: q.grad.clone() for n, q in module.named_parameters() if q.grad is not None}

    results = {name: update(v["batches"]) for name, v in layouts.items()}  # untimed, and compared
    (tw, gw), (ts, gs) = results["whole"], results["shared"]
    loss_gap = abs(tw.loss_sum - ts.loss_sum) / abs(tw.loss_sum)
    grad_gap = max(float((gw[n] - gs[n]).abs().max() / gw[n].abs().max().clamp_min(1e-12)) for n in gw)
    for _ in range(args.repeats):
        for v in layouts.values():
            t0 = time.perf_counter()
            update(v["batches"])
            v["seconds"].append(time.perf_counter() - t0)
    print(f"\n# DPO LoRA update on {pairs} pairs of {DATA.name}, SmolLM2-135M, float32, "
          f"{torch.get_num_threads()} threads (shared machine: indicative)\n")
    print(f"agreement: loss sum relative gap {loss_gap:.1e}, largest relative gradient gap {grad_gap:.1e}\n")
    print("| layout | rows | tokens | tokens/pair | update s (each) | pairs/s |")
    print("|---|---|---|---|---|---|")
    for name, v in layouts.items():
        best = min(v["seconds"])
        each = ", ".join(f"{s:.2f}" for s in v["seconds"])
        print(f"| {name} | {v['rows']} | {v['tokens']} | {v['tokens'] / pairs:.1f} | {each} | "
              f"{pairs / best:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
