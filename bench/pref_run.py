"""tuneforge versus TRL, side by side, for preference methods: `method: dpo` (sigmoid) against
`trl.DPOTrainer` and `method: reward` against `trl.RewardTrainer`, LoRA, float32, a SHORT run.

    python bench/pref_run.py [--methods dpo,reward] [--variants trl,tf] [--steps 3] [--warmup 1] [--threads N]

Each (method, side) runs in its own child process (bench/common.py spawn/serve), so each peak RSS belongs to
one run. Both sides: the embedded SmolLM2-135M-Instruct (`load_causal_lm`, float32, no hub), the first
8 * (warmup + steps) pairs of examples/demo_prefs/train.jsonl, batch 8 pairs (16 sequences, padded one per
row), one epoch, LoRA r 16, alpha 32, dropout 0 on all linear layers, AdamW.

Sides
- trl: DPOTrainer (beta 0.1, loss_type sigmoid, the reference = the base with the adapter disabled) or
  RewardTrainer (an AutoModelForSequenceClassification holding the same base weights), `peft_config` LoRA,
  the configs' defaults otherwise (gradient checkpointing ON, their default, as the SFT bench keeps it).
- trl-nockpt (opt-in): the same with gradient_checkpointing=False.
- tf: tuneforge through `tuneforge.run.train` with a RunConfig (method dpo or reward, data.packing false,
  float32, no activation checkpointing: tuneforge's default).
- tf-pack (opt-in): the same with data.packing true: rows of data.max_length tokens, each pair's prompt once
  (tuneforge_varlen attention, the default for SmolLM2), the step's pairs set by the token budget.

Numbers (as bench/run.py): real tok/s = tokens computed in the timed steps / their wall time (attention-mask
ones padded; a packed row's tokens, a shared prompt once: so tf-pack computes fewer tokens per pair, and its
token rate alone would hide the saving); pairs/s = pairs trained in the timed steps / their wall time, the rate
to compare across layouts (tok/pair shows the layout's cost). Both sides' sequences are the same tokens except
TRL's DPO, whose answers also hold the newline after <|im_end|>: the same tokens, one more of them supervised;
see bench/pref_check.py. Peak RSS = VmHWM at the last step's end (model load, tokenisation, training).
ratio = tf / trl of pairs/s. The first `--warmup` steps are not timed. The defaults are a few steps on a few
hundred tokens: the numbers are indicative only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import serve, spawn
from run import StepClock, summarise, timed_train, trl_clock

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
DATA = ROOT / "examples" / "demo_prefs" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BATCH = 8  # pairs per step


def child_tuneforge(spec: dict) -> dict:
    import torch

    import tuneforge.run as tr
    from tuneforge.config.schema import RunConfig
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work = Path(spec["workdir"])
    cfg = RunConfig.model_validate({
        "method": spec["method"], "model": {"name": MODEL},
        "data": {"train": spec["data"], "max_length": 512, "packing": spec["side"] == "tf-pack",
                 "cache_dir": str(work / "tokcache")},
        "lora": {"enabled": True, **LORA},
        # packed, a step is micro_batch_size rows of max_length tokens: one 512-token row holds about BATCH pairs
        # with their prompt once (~66 tokens a pair on this data), so the packed side trains about as many pairs
        # a step as the padded sides, and gets warm-up and timed steps like them
        "train": {"output_dir": str(work / "run"), "micro_batch_size": 1 if spec["side"] == "tf-pack" else BATCH,
                  "grad_accum": 1, "epochs": 1,
                  "autocast": "none", "tensorboard": False, "progress": False, "log_every": 1000000, "seed": 0},
        "eval": {"loss": False, "generate": False, "before": False},
    })
    clock, info = StepClock(), {"gradient_checkpointing": False}
    timed_train(tr, cfg, clock, info, count="pairs")  # a preference objective counts pairs
    return summarise(clock, spec["warmup"], info)


def _trl_trainer(spec: dict, tok, model, rows: list[dict]):
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    common = {"output_dir": str(Path(spec["workdir"]) / "run"), "per_device_train_batch_size": BATCH,
              "gradient_accumulation_steps": 1, "num_train_epochs": 1, "save_strategy": "no", "report_to": "none",
              "disable_tqdm": True, "seed": 0, "use_cpu": True, "dataloader_pin_memory": False, "bf16": False,
              "fp16": False}
    if spec["side"] == "trl-nockpt":
        common["gradient_checkpointing"] = False
    data = datasets.Dataset.from_list(rows)
    if spec["method"] == "dpo":
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
        return DPOTrainer(model=model, args=DPOConfig(beta=0.1, loss_type=["sigmoid"], **common),
                          train_dataset=data, processing_class=tok, peft_config=peft_config)
    import copy

    import torch
    config = copy.deepcopy(model.config)
    config.num_labels = 1
    seqcls = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing, _ = seqcls.model.load_state_dict(model.model.state_dict(), strict=False)
    if missing:
        raise SystemExit(f"sequence classifier misses base weights {missing[:3]}")
    seqcls.config.pad_token_id = tok.pad_token_id
    del model
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="SEQ_CLS")
    return RewardTrainer(model=seqcls, args=RewardConfig(**common), train_dataset=data, processing_class=tok,
                         peft_config=peft_config)


def child_trl(spec: dict) -> dict:
    import trl

    from common import trl_child_start
    model, tok = trl_child_start(spec, MODEL)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    trainer = _trl_trainer(spec, tok, model, rows)
    clock = StepClock()
    info = {"trl_version": trl.__version__, "gradient_checkpointing": trainer.args.gradient_checkpointing}
    batches: list[tuple[int, int]] = []
    inner = trainer.data_collator

    def counting(examples):
        out = inner(examples)
        batches.append((int(out["attention_mask"].sum()), len(examples)))  # (real tokens, pairs)
        return out

    trainer.data_collator = counting

    trainer.add_callback(trl_clock(clock, info))
    out = trainer.train()
    info["final_loss"] = out.training_loss
    steps = len(clock.starts)
    clock.real = [tokens for tokens, _ in batches[:steps]]
    clock.pairs = [pairs for _, pairs in batches[:steps]]
    clock.supervised = [0] * steps
    return summarise(clock, spec["warmup"], info)


def write_slice(pairs: int) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"prefs-{pairs}.jsonl"
    lines = DATA.read_text(encoding="utf-8").splitlines()[:pairs]
    if len(lines) < pairs:
        raise SystemExit(f"{DATA} has {len(lines)} pairs, fewer than the {pairs} asked for")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child")
    p.add_argument("--result")
    p.add_argument("--methods", default="dpo,reward")
    p.add_argument("--variants", default="trl,tf")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    args = p.parse_args()
    if serve(args, child_trl, child_tuneforge):
        return 0
    data = write_slice(BATCH * (args.warmup + args.steps))
    rows = []
    for method in args.methods.split(","):
        for side in args.variants.split(","):
            work = WORK / f"pref-{method}-{side}"
            work.mkdir(parents=True, exist_ok=True)
            spec = {"method": method, "side": side, "data": str(data), "workdir": str(work),
                    "warmup": args.warmup, "threads": args.threads}
            log = work / "log.txt"
            res = spawn(__file__, spec, work / "spec.json", work / "result.json", log, timeout=args.timeout)
            rows.append({"method": method, "side": side, **res})
            print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
    print(f"\n# preference methods, tuneforge vs TRL: LoRA, float32, batch {BATCH} pairs, {args.steps} timed steps "
          f"after {args.warmup} warmup (a short run: indicative)\n")
    print("| method | side | grad ckpt | pairs/s | real tok/s | tok/pair | step s | peak RSS MiB | final loss | "
          "pairs/s ratio | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['side']} | error: {r['error'][:200]} |||||||||")
            continue
        base = next((b for b in rows if b["method"] == r["method"] and b["side"] == "trl" and "error" not in b), None)
        ratio = f"{r['pairs_s'] / base['pairs_s']:.2f}" if base else "-"
        rss = f"{r['train_peak_kb'] / base['train_peak_kb']:.2f}" if base else "-"
        print(f"| {r['method']} | {r['side']} | {r['gradient_checkpointing']} | {r['pairs_s']:.2f} | "
              f"{r['real_tok_s']:.0f} | {r['tokens_per_pair']:.1f} | {r['step_seconds']:.2f} | "
              f"{r['train_peak_kb'] / 1024:.0f} | {r['final_loss']:.4f} | {ratio} | {rss} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
