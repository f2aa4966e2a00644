"""Embedding batch layouts (models/embedder.py `embedding_layout`): one contrastive update on real pairs with the
batch's rows as they are ("padded"), sorted by length in chunks each cut to its longest ("sorted", the default),
and, for a decoder, laid end to end in one padding-free row ("packed", data.packing: true).

Two models: all-MiniLM-L6-v2 (full, mean pooling, float32) and SmolLM2-135M-Instruct + LoRA (last-token pooling,
autocast as run.py resolves it). The pairs are the first `--pairs` of the contrastive demo's training file
(scripts/make_retrieval_demo.py), cut at `--max-length` tokens, one micro-batch, the loss and backward of method
contrastive (objectives/contrastive.py). The layouts run interleaved, `--repeats` times each, in one process: the
machine is shared, so compare the medians side by side. Also printed: the share of padding in the padded batch
and the largest difference between a layout's embeddings and the padded ones.

    .venv/bin/python scripts/make_retrieval_demo.py
    .venv/bin/python bench/embed_packing.py [--pairs 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = (("all-minilm-l6-v2", "mean", False), ("smollm2-135m-instruct", "last", True))


def measure(name: str, pooling: str, lora: bool, args) -> dict:
    from tuneforge.adapters.lora import apply_lora
    from tuneforge.config.load import config_from_dict
    from tuneforge.data.builders import BuildStats, PairBuilder
    from tuneforge.data.collate import collate_sequences
    from tuneforge.data.readers import read_records
    from tuneforge.models.embedder import embed, load_embedder
    from tuneforge.models.heads import TrainModule
    from tuneforge.objectives.contrastive import ContrastiveObjective
    from tuneforge.train.loop import make_autocast, resolve_autocast

    cfg = config_from_dict({"method": "contrastive", "model": {"name": name},
                            "data": {"train": args.data, "max_length": args.max_length}})
    model, tok = load_embedder(cfg)
    torch.manual_seed(0)
    if lora:
        model = apply_lora(model, r=16, alpha=32, dropout=0.0, task_type="FEATURE_EXTRACTION")
    module = TrainModule(model).train()
    device = torch.device("cpu")
    mode = "auto" if lora else "none"
    autocast = make_autocast(mode, device)

    class Sink(list):
        add = list.append

    examples = Sink()
    builder = PairBuilder(tok, cfg.data, examples, BuildStats())
    for record in read_records(args.data, kind="pair").records[:args.pairs]:
        builder.add(record)
    batch = {**collate_sequences(list(examples), tok.pad_token_id), "texts": [ex.texts for ex in examples]}
    mask = batch["attention_mask"]
    layouts = {"padded": False, "sorted": "auto", **({"packed": True} if lora else {})}
    module.eval()  # no dropout: the layouts draw their masks in another order
    with torch.no_grad(), autocast():
        vectors = {k: embed(module, batch, pooling, True, layout=k) for k in layouts}
    module.train()
    difference = {k: float((v - vectors["padded"]).abs().max()) for k, v in vectors.items() if k != "padded"}

    def step(packing) -> float:
        objective = ContrastiveObjective(pooling, packing=packing)
        module.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with autocast():
            out = objective.loss(module, batch)
        out.loss_sum.backward()
        return time.perf_counter() - t0

    for setting in layouts.values():  # warm-up: first-call allocations and kernel selection
        step(setting)
    times: dict[str, list[float]] = {k: [] for k in layouts}
    for _ in range(args.repeats):
        for k, setting in layouts.items():
            times[k].append(step(setting))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "lora": lora, "autocast": resolve_autocast(mode, device), "pairs": args.pairs,
            "sequences": int(mask.shape[0]), "real_tokens": int(mask.sum()), "padded_tokens": int(mask.numel()),
            "padding_share": round(1.0 - float(mask.sum()) / mask.numel(), 3),
            "max_difference_from_padded": difference,
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
            "median_seconds": {k: round(v, 3) for k, v in medians.items()},
            "speedup_over_padded": {k: round(medians["padded"] / v, 2) for k, v in medians.items() if k != "padded"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="all-minilm-l6-v2,smollm2-135m-instruct")
    ap.add_argument("--data", default=str(ROOT / "examples/retrieval_demo/train.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = args.models.split(",")
    for name, pooling, lora in MODELS:
        if name in wanted:
            print(json.dumps(measure(name, pooling, lora, args)), flush=True)


if __name__ == "__main__":
    main()
