"""tuneforge `method: grpo` versus TRL's GRPOTrainer, side by side: SmolLM2-135M-Instruct, LoRA, arithmetic
prompts rewarded by `tuneforge.rl.rewards:number_match`.

    python bench/grpo_run.py [--steps 10] [--warmup 2] [--prompts 4] [--generations 4] [--max-new-tokens 64]
                             [--dtype auto|bf16|fp32] [--variants tf,trl] [--threads N] [--smoke]

One step means the same on both sides: P prompts (`--prompts`), each sampled G times (`--generations`), so
P x G completions, then ONE optimizer update over all of them (one epoch, one mini-batch; no reuse of a
generation batch). tuneforge: train.micro_batch_size P, grad_accum 1, rl.epochs 1, rl.mini_batches 1. TRL 1.16:
per_device_train_batch_size P x G (TRL counts completions), gradient_accumulation_steps 1, so its
generation_batch_size is P x G and steps_per_generation 1, num_iterations 1 (one generation per optimizer
step, trl/trainer/grpo_config.py __post_init__).

Same on both sides: the model (the embedded SmolLM2-135M-Instruct through `tuneforge.models.load.load_causal_lm`,
the safetensors folder tuneforge caches from the GGUF; no hub), the prompts (made here, deterministic) in the
same order step by step (tuneforge runs first; its order is recorded and given to TRL with
shuffle_dataset=False), the chat template (checked: TRL's prompt token ids equal tuneforge's), LoRA r 16, alpha
32, dropout 0, all linear layers, num_generations, max completion length, temperature 1, top-p 1 (TRL top-k 0),
learning rate (constant, no warm-up), AdamW betas (0.9, 0.999), no weight decay, gradient clipping 1.0, beta
0.04 (KL to the reference, k3; TRL's default is 0, set to 0.04 on both), clip epsilon 0.2, group-scaled
advantages, loss type dapo (TRL 1.16's default; token-level mean over the update on both), the reward function
(TRL gets `number_match` wrapped in its signature), compute dtype (bf16 autocast on both where the measured
bf16 matmul beats float32, as bench/run.py decides, else float32 on both; float32 master weights), torch
threads. The reference is the base with the adapter disabled on both (LoRA).

Different, each side as its docs ship it: TRL keeps gradient checkpointing on (GRPOConfig's default; the
opt-in side `trl-nockpt` turns it off) and skips the "old" log-prob forward when num_iterations is 1 (the
ratio is then 1 by construction); tuneforge computes the old log-probs once per batch (its ratio-1 check) and
runs its defaults otherwise (packed rows with varlen attention for the log-prob passes and the update, no
activation checkpointing).

Numbers per side (the first `--warmup` steps excluded): seconds per optimizer step (median of the timed steps;
a step is from one step's start to the next's), split into generation (sampling), scoring (rewards, old and
reference log-probs, advantages) and update (forward, backward, optimizer), each a median share; peak RSS
(VmHWM of the child process at its last step: model load + training); mean reward of the last
`--reward-last` steps; mean completion length; sampled tokens per second of generation. Ratios: tuneforge /
TRL of steps per hour (= TRL's median step time / tuneforge's) and of peak RSS. Target (issue 11): steps per
hour >= 2x TRL's at <= its peak RSS.

Results: a markdown table on stdout and in bench/results/grpo-<timestamp>.md (raw rows in .json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import statistics
import sys
import time
from pathlib import Path

from common import serve, spawn
from run import StepClock, cpu_name, matmul_rates, timed_train, trl_clock, versions

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SIDES = {"tf": "tuneforge method grpo, defaults",
         "tf-ckpt": "tuneforge method grpo, train.activation_checkpointing on", "trl": "GRPOTrainer, GRPOConfig defaults (gradient ckpt on)",
         "trl-nockpt": "GRPOTrainer, gradient_checkpointing=False"}


# ---------------------------------------------------------------------------------------------- prompts

def arithmetic_prompts(n: int, seed: int = 0) -> list[dict]:
    """`n` prompt records {"prompt", "reference"}: sums, differences and products of small numbers, the same
    list for the same (n, seed). Small enough that SmolLM2-135M answers some right, so rewards vary within a
    group and the advantages are not all zero."""
    rng = random.Random(seed)
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    rows = []
    for _ in range(n):
        sym, fn = ops[rng.randrange(len(ops))]
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if sym == "*" else (rng.randint(10, 99), rng.randint(1, 60))
        rows.append({"prompt": f"What is {a} {sym} {b}? Give the result as a number.", "reference": str(fn(a, b))})
    return rows


def write_prompts(n: int, seed: int) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"grpo-prompts-n{n}-s{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_prompts(n, seed)), encoding="utf-8")
    return path


def number_match_trl(prompts, completions, completion_ids=None, reference=None, **kwargs) -> list[float]:
    """tuneforge's number_match in TRL's reward-function signature: TRL passes conversational completions as
    message lists and the dataset's other columns (here `reference`) as keyword arguments."""
    from tuneforge.rl.rewards import number_match

    def text(x):
        return x[-1]["content"] if isinstance(x, list) else x
    return number_match([text(p) for p in prompts], [text(c) for c in completions], list(reference))


# ---------------------------------------------------------------------------------------------- children

def child_tuneforge(spec: dict) -> dict:
    import torch

    import tuneforge.run as tr
    from tuneforge.config.schema import RunConfig
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    work = Path(spec["workdir"])
    cfg = RunConfig.model_validate({
        "method": "grpo", "model": {"name": MODEL},
        "data": {"train": spec["data"], "cache_dir": str(work / "tokcache")},
        "lora": {"enabled": True, **LORA},
        "train": {"output_dir": str(work / "run"), "micro_batch_size": spec["prompts"], "grad_accum": 1,
                  "max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
                  "autocast": "bf16" if spec["dtype"] == "bf16" else "none",
                  "activation_checkpointing": spec["side"] == "tf-ckpt",
                  "tensorboard": False, "progress": False, "log_every": 1, "seed": 0},
        "rl": {"reward_functions": ["tuneforge.rl.rewards:number_match"], "num_generations": spec["generations"],
               "max_new_tokens": spec["max_new_tokens"], "temperature": 1.0, "top_p": 1.0, "beta": spec["beta"],
               "kl_estimator": "k3", "loss_type": spec["loss_type"], "scale_rewards": True, "clip_range": 0.2,
               "epochs": 1, "mini_batches": 1, "samples_every": 0,
               "rollout_batch_size": spec["prompts"] * spec["generations"]},
        "eval": {"loss": False, "generate": False, "before": False},
    })
    clock, info, history, order = StepClock(), {}, [], []

    def watch(micro_batches):  # the prompts of this step, in order, and their token ids
        for b in micro_batches:
            for ex in b["examples"]:
                order.append({"prompt": ex.texts["prompt"], "reference": ex.texts["reference"],
                              "ids": list(ex.sequences[0].input_ids)})

    timed_train(tr, cfg, clock, info, history=history, watch=watch)
    if len(history) != len(clock.starts):  # a step must be one update, as on TRL's side
        raise SystemExit(f"{len(history)} optimizer updates in {len(clock.starts)} steps: expected one per step")
    steps = []
    for i, row in enumerate(history):
        end = clock.starts[i + 1] if i + 1 < len(clock.starts) else clock.end
        prep = clock.prepared[i] - clock.starts[i]  # sampling + rewards + old/reference log-probs + advantages
        steps.append({"seconds": end - clock.starts[i], "gen": row["gen_seconds"], "score": prep - row["gen_seconds"],
                      "update": end - clock.prepared[i], "reward": row["reward"],
                      "completion_length": row["completion_length"], "gen_tokens_per_s": row["gen_tokens_per_s"],
                      "kl": row.get("kl")})
    return {**info, "steps": steps, "order": order, "gradient_checkpointing": spec["side"] == "tf-ckpt"}


def child_trl(spec: dict) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from common import trl_child_start
    model, tok = trl_child_start(spec, MODEL)
    if spec.get("order"):  # tuneforge's prompts, step by step, in its order
        rows = [{"prompt": r["prompt"], "reference": r["reference"]} for r in spec["order"]]
    else:
        rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                        "reference": r["reference"]} for r in rows])
    on_cpu = not torch.cuda.is_available()
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "run"),
        per_device_train_batch_size=spec["prompts"] * spec["generations"], gradient_accumulation_steps=1,
        num_generations=spec["generations"], max_completion_length=spec["max_new_tokens"], temperature=1.0,
        top_p=1.0, top_k=0, beta=spec["beta"], loss_type=spec["loss_type"], scale_rewards="group", epsilon=0.2,
        num_iterations=1, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, max_steps=spec["warmup"] + spec["steps"],
        shuffle_dataset=not spec.get("order"), bf16=spec["dtype"] == "bf16", fp16=False, use_cpu=on_cpu,
        dataloader_pin_memory=not on_cpu, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        logging_steps=1, **({"gradient_checkpointing": False} if spec["side"] == "trl-nockpt" else {}),
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=number_match_trl, args=args, train_dataset=data,
                          processing_class=tok, peft_config=peft_config)
    # time TRL's phases from outside (instance attributes shadow the methods; TRL's code is untouched)
    phases = {"gen": [], "gen_score": []}
    prompt_ids: list[list[int]] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            phases[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    def tokenize(prompts, _inner=trainer._tokenize_prompts):
        out = _inner(prompts)
        prompt_ids.extend(list(map(int, ids)) for ids in out[0])
        return out

    trainer._generate = timed("gen", trainer._generate)
    trainer._generate_and_score_completions = timed("gen_score", trainer._generate_and_score_completions)
    trainer._tokenize_prompts = tokenize
    clock, info, logs = StepClock(), {"trl_version": trl.__version__,
                                      "gradient_checkpointing": args.gradient_checkpointing}, []
    trainer.add_callback(trl_clock(clock, info, logs=logs))
    trainer.train()
    if not (len(phases["gen"]) == len(phases["gen_score"]) == len(clock.starts)):
        raise SystemExit(f"TRL generated {len(phases['gen'])} times in {len(clock.starts)} optimizer steps: "
                         "expected once per step (steps_per_generation 1, num_iterations 1)")
    per_step = {}
    for entry in logs:  # logging_steps=1: one entry per step with the step's GRPO metrics
        if "reward" in entry:
            per_step[entry["step"]] = entry
    steps = []
    for i, start in enumerate(clock.starts):
        end = clock.starts[i + 1] if i + 1 < len(clock.starts) else clock.end
        gen, gen_score = phases["gen"][i], phases["gen_score"][i]
        log = per_step.get(i + 1, {})
        length = log.get("completions/mean_length")
        steps.append({"seconds": end - start, "gen": gen, "score": gen_score - gen,
                      "update": end - start - gen_score, "reward": log.get("reward"), "completion_length": length,
                      "gen_tokens_per_s": length * spec["prompts"] * spec["generations"] / gen if length else None,
                      "kl": log.get("kl")})
    # TRL repeats each prompt num_generations times before tokenising: one row per prompt
    info["prompt_ids"] = prompt_ids[::spec["generations"]]
    return {**info, "steps": steps}


# ---------------------------------------------------------------------------------------------- parent

def summarise_side(res: dict, warmup: int, reward_last: int) -> dict:
    timed = res["steps"][warmup:]
    if not timed:
        raise SystemExit("no timed steps: raise --steps")

    def med(key):
        return statistics.median(s[key] for s in timed)

    rewards = [s["reward"] for s in res["steps"] if s["reward"] is not None]
    lengths = [s["completion_length"] for s in timed if s["completion_length"] is not None]
    rates = [s["gen_tokens_per_s"] for s in timed if s["gen_tokens_per_s"]]
    seconds = med("seconds")
    return {"step_s": seconds, "gen_s": med("gen"), "score_s": med("score"), "update_s": med("update"),
            "gen_share": statistics.median(s["gen"] / s["seconds"] for s in timed),
            "score_share": statistics.median(s["score"] / s["seconds"] for s in timed),
            "update_share": statistics.median(s["update"] / s["seconds"] for s in timed),
            "steps_per_hour": 3600.0 / seconds,
            "peak_rss_gb": max(res["setup_peak_kb"], res["train_peak_kb"]) / 2**20,
            "train_peak_rss_gb": res["train_peak_kb"] / 2**20,
            "reward_last": statistics.fmean(rewards[-reward_last:]) if rewards else None,
            "reward_first": statistics.fmean(rewards[:reward_last]) if rewards else None,
            "completion_length": statistics.fmean(lengths) if lengths else None,
            "gen_tok_s": statistics.median(rates) if rates else None, "timed_steps": len(timed),
            "all_steps": len(res["steps"])}


def fmt_table(rows: list[dict]) -> str:
    head = ("| side | what | grad ckpt | s/step (median) | generation | scoring | update | steps/h | peak RSS GB | "
            "reward first / last | completion tokens | gen tok/s | steps/h vs TRL | RSS vs TRL |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['side']} | {SIDES[r['side']]} | error: {r['error'][:160]} |" + " |" * 11)
            continue
        s = r["summary"]

        def num(v, f="{:.3f}"):
            return "-" if v is None else f.format(v)
        ratio = (f"{r['steps_ratio']:.2f}x", f"{r['rss_ratio']:.2f}x") if "steps_ratio" in r else ("-", "-")
        out.append(f"| {r['side']} | {SIDES[r['side']]} | {r['gradient_checkpointing']} | {s['step_s']:.2f} | "
                   f"{s['gen_s']:.2f} s ({s['gen_share']:.0%}) | {s['score_s']:.2f} s ({s['score_share']:.0%}) | "
                   f"{s['update_s']:.2f} s ({s['update_share']:.0%}) | {s['steps_per_hour']:.0f} | "
                   f"{s['peak_rss_gb']:.2f} | {num(s['reward_first'])} / {num(s['reward_last'])} | "
                   f"{num(s['completion_length'], '{:.1f}')} | {num(s['gen_tok_s'], '{:.0f}')} | {ratio[0]} | "
                   f"{ratio[1]} |")
    return "\n".join(out)


def prompt_parity(tf: dict, trl_res: dict) -> str:
    ours = [r["ids"] for r in tf.get("order", [])]
    theirs = trl_res.get("prompt_ids", [])
    n = min(len(ours), len(theirs))
    same = sum(a == b for a, b in zip(ours[:n], theirs[:n]))
    return f"prompt token ids identical on both sides for {same} of {n} prompts"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (default 4)")
    ap.add_argument("--generations", type=int, default=4, help="num_generations, completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="max completion length (default 64)")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate, both sides (tuneforge's LoRA default)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient, both sides")
    ap.add_argument("--loss-type", default="dapo", choices=("grpo", "dr_grpo", "dapo"))
    ap.add_argument("--reward-last", type=int, default=5, help="steps averaged for the reward columns")
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--variants", default="tf,trl", help="comma list from " + ",".join(SIDES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0, help="prompt set seed")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per child")
    ap.add_argument("--smoke", action="store_true", help="harness check: 2 steps (1 warm-up, 1 timed) of 4 prompts "
                    "x --generations, 16 new tokens; the numbers are NOT a measurement")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if serve(args, child_trl, child_tuneforge):
        return 0
    if args.smoke:
        args.steps, args.warmup, args.prompts, args.max_new_tokens, args.reward_last = 1, 1, 4, 16, 1
    if args.generations < 2:
        raise SystemExit("--generations must be at least 2 (group-normalised advantages)")

    t_start = time.perf_counter()
    rates = matmul_rates(args.threads or None)
    dtype = ("bf16" if rates["bfloat16"] > rates["float32"] else "fp32") if args.dtype == "auto" else args.dtype
    print(f"[grpo-bench] matmul GFLOP/s float32 {rates['float32']}, bfloat16 {rates['bfloat16']} -> {dtype}",
          flush=True)
    n_prompts = args.prompts * (args.warmup + args.steps)
    data = write_prompts(n_prompts, args.seed)
    sides = args.variants.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {unknown}: pick from {', '.join(SIDES)}")
    sides.sort(key=lambda s: s != "tf")  # tuneforge first: TRL then trains on its prompts in its order
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    order, results = None, {}
    for side in sides:
        work = WORK / f"grpo-{side}"
        work.mkdir(parents=True, exist_ok=True)
        spec = {"side": side, "data": str(data), "workdir": str(work), "threads": args.threads, "dtype": dtype,
                "prompts": args.prompts, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                "lr": args.lr, "beta": args.beta, "loss_type": args.loss_type, "warmup": args.warmup,
                "steps": args.steps, "order": order if side.startswith("trl") else None}
        print(f"[grpo-bench] {side} ({SIDES[side]}, {dtype}) ...", end=" ", flush=True)
        log = WORK / "logs" / f"grpo-{stamp}-{side}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        res = spawn(__file__, spec, work / "spec.json", work / "result.json", log, timeout=args.timeout)
        if "error" not in res:
            res["summary"] = summarise_side(res, args.warmup, args.reward_last)
            if side == "tf":
                order = res["order"]
            print(f"{res['summary']['step_s']:.2f} s/step, peak RSS {res['summary']['peak_rss_gb']:.2f} GB "
                  f"({res['wall_seconds']:.0f} s)", flush=True)
        else:
            print("FAILED: " + res["error"], flush=True)
        results[side] = {"side": side, **res}

    rows = [results[s] for s in sides]
    peer = results.get("trl")
    for r in rows:
        if peer is not None and "error" not in peer and "error" not in r:
            r["steps_ratio"] = r["summary"]["steps_per_hour"] / peer["summary"]["steps_per_hour"]
            r["rss_ratio"] = r["summary"]["peak_rss_gb"] / peer["summary"]["peak_rss_gb"]
    lines = [f"# tuneforge GRPO vs TRL GRPOTrainer: SmolLM2-135M-Instruct, LoRA ({stamp})", ""]
    if args.smoke:
        lines += ["**SMOKE RUN: harness check only (2 steps, tiny batches); not a measurement.**", ""]
    lines += [
        f"- machine: {cpu_name()}; matmul GFLOP/s float32 {rates['float32']}, bfloat16 {rates['bfloat16']}; "
        f"cpu flags {', '.join(rates.get('cpu_flags', []))}; torch threads {rates.get('threads')}",
        f"- compute dtype: **{dtype}** on both sides"
        + (" (bf16 autocast, float32 master weights)" if dtype == "bf16" else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v),
        f"- a step: {args.prompts} prompts x {args.generations} generations = {args.prompts * args.generations} "
        f"completions of at most {args.max_new_tokens} new tokens, one optimizer update; {args.warmup} warm-up + "
        f"{args.steps} timed steps; {n_prompts} arithmetic prompts (seed {args.seed}, bench/grpo_run.py "
        "arithmetic_prompts), the same ones in the same order on both sides",
        f"- LoRA r {LORA['r']}, alpha {LORA['alpha']}, dropout 0, all linear layers; lr {args.lr} constant; "
        f"beta {args.beta} (k3); clip 0.2; loss {args.loss_type}; temperature 1, top-p 1; reward number_match",
    ]
    if "tf" in results and peer is not None and "error" not in results["tf"] and "error" not in peer:
        lines.append(f"- {prompt_parity(results['tf'], peer)}")
    lines += ["", fmt_table(rows), ""]
    for r in rows:
        if r.get("steps_ratio") is not None and r["side"].startswith("tf"):
            met = r["steps_ratio"] >= 2.0 and r["rss_ratio"] <= 1.0
            lines.append(f"Target (>= 2x TRL's steps/h at <= its peak RSS), {r['side']}: {r['steps_ratio']:.2f}x at "
                         f"{r['rss_ratio']:.2f}x -> {'MET' if met else 'not met'}")
    lines += ["", "s/step: median over the timed steps of the time from a step's start to the next's; generation: "
              "sampling; scoring: rewards, old and reference log-probs, advantages; update: forward, backward, "
              "optimizer step (medians, share of the step). Reward: mean number_match of the first / last "
              f"{args.reward_last} steps. Peak RSS: VmHWM of the child (load + train).", "",
              f"total wall time {time.perf_counter() - t_start:.0f} s"]
    report = "\n".join(lines)
    print("\n" + report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"grpo-{stamp}{'-smoke' if args.smoke else ''}"
    (RESULTS / f"{name}.md").write_text(report + "\n")
    for r in rows:
        r.pop("order", None)  # token ids of every prompt: not needed in the record
    (RESULTS / f"{name}.json").write_text(json.dumps({"args": vars(args), "dtype": dtype, "rates": rates,
                                                      "versions": versions(), "rows": rows}, indent=1, default=str))
    print(f"\nwritten {RESULTS / name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
