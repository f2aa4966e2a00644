"""tuneforge versus TRL, side by side: SFT of SmolLM2-135M on variable-length chat data, LoRA and full.

    python bench/run.py [--cases lora,full] [--steps 16] [--warmup 3] [--dtype auto|bf16|fp32] [--quick]
                        [--variants trl,tf-base,tf-fused,tf-pack,tf-varlen,...] [--threads N]

One process tree: this parent measures the machine's matrix-product rate (bench/matmul.py), writes the data
(bench/data.py), then runs every (case, side) in its own child process, so each peak RSS belongs to one run.
Both sides get the same model object (the embedded SmolLM2-135M-Instruct through
`tuneforge.models.load.load_causal_lm`, no hub), the same conversations, batch 8, max length 512 (no example is
longer, so nothing is truncated or dropped on either side), one epoch over 8 * (warmup + steps) conversations,
the same LoRA adapter (r 16, alpha 32, dropout 0.05, all linear layers) and the same loss mask (assistant turns
with their <|im_end|>; checked token by token after the TRL run). The first `--warmup` optimizer steps of
every run are excluded from timing (the first CPU steps run up to 2x slower while the allocator warms up).

Sides
- trl: `trl.SFTTrainer` configured as its documentation recommends: `assistant_only_loss=True` (SmolLM2's
  template gets `{% generation %}` markers, as TRL's docs ask for templates it cannot patch itself; the render
  is checked byte-identical to the original), `peft_config=LoraConfig(...)` with the LoRA learning rate 2e-4
  from TRL's PEFT guide, SFTConfig defaults otherwise (gradient checkpointing on, bf16 autocast when the compute
  dtype is bf16, AdamW, linear schedule), no logging integrations, no checkpoints.
- trl-pack (opt-in): the same with `packing=True` (TRL's bfd packing, padding-free).
- tf-*: tuneforge through `tuneforge.run.train` with a RunConfig (method sft, LoRA or full), a ladder of
  switches (TF_VARIANTS): tf-base (float32, padded, transformers' sdpa attention, PEFT's own dropout),
  tf-fused (+ fused LoRA dropout, LoRA only), tf-bf16 (+ bf16 autocast, bf16 machines only), tf-pack
  (+ packing into one wide micro-batch of the step's rows, transformers' masked sdpa), tf-varlen
  (+ tuneforge_varlen attention: the fast point), tf-varlen-ckpt (+ activation checkpointing), tf-group
  (group_by_length instead of packing), tf-defaults (tuneforge with nothing set: packing auto, one row of
  data.max_length per micro-batch, the same rows per step: the lean point);
  opt-in: tf-defaults-ckpt, tf-compile (tf-varlen + train.compile).

Compute dtype: `--dtype auto` picks bf16 when the measured bf16 matmul rate beats float32, else float32 (a CPU
without native bf16, e.g. AVX2-only, multiplies bf16 10-20x slower; autocast would then only measure that).
Both sides always run at the same compute dtype; master weights and optimizer state are float32 on both.

Numbers
- real tok/s: non-pad tokens of the timed steps / wall time of the timed steps (both sides count the same way:
  attention-mask ones, or every token of a packed row).
- peak RSS: VmHWM of the child process when its last step ends (model load, tokenisation and training).
- MFU: FLOPs the work needs / time / measured matmul rate (F.linear, as nn.Linear runs it) of the compute
  dtype. FLOPs: LoRA
  4 * N_body * T_real + 4 * N_head * T_supervised, full 6 * instead of 4 *; N_body = weights of the decoder's
  linear layers (LoRA adapters and attention scores not counted), N_head = output projection (V x H).
- ratio: tuneforge / TRL of real tok/s, and of peak RSS, same case.

Results: a markdown table on stdout and in bench/results/<timestamp>.md, raw rows in <timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

from common import serve, spawn  # noqa: E402  (bench/ is the script's folder, first on sys.path)
WORK = BENCH / "work"

LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}
MASK_TRL = "assistant turns + <|im_end|> (assistant_only_loss, generation-marked template)"
MASK_TF = "assistant turns + <|im_end|> (data.mask=assistant)"

# tuneforge ladder: name -> (label, switches). "dt" is replaced by the compute dtype.
TF_VARIANTS = {
    "tf-base": ("baseline: float32, padded, transformers' sdpa, PEFT's dropout",
                {"autocast": "none", "attn": "sdpa", "fused": False}),
    "tf-fused": ("+ fused LoRA dropout", {"autocast": "none", "attn": "sdpa"}),
    "tf-bf16": ("+ bf16 autocast", {"autocast": "dt", "attn": "sdpa"}),
    "tf-pack": ("+ packing, one wide micro-batch (sdpa mask)",
                {"autocast": "dt", "packing": True, "wide": True, "attn": "sdpa"}),
    "tf-varlen": ("+ varlen attention, one wide micro-batch", {"autocast": "dt", "packing": True, "wide": True}),
    "tf-varlen-ckpt": ("+ activation checkpointing", {"autocast": "dt", "packing": True, "wide": True, "ckpt": True}),
    "tf-compile": ("wide + torch.compile", {"autocast": "dt", "packing": True, "wide": True, "compile": True}),
    "tf-group": ("group_by_length instead of packing", {"autocast": "dt", "packing": False, "group": True}),
    "tf-defaults": ("the defaults: packing auto, one row of max_length per micro-batch",
                    {"autocast": "dt", "packing": "auto"}),
    "tf-defaults-ckpt": ("the defaults + activation checkpointing", {"autocast": "dt", "packing": "auto", "ckpt": True}),
}
TRL_VARIANTS = {"trl": ("SFTTrainer, docs config", {}), "trl-pack": ("SFTTrainer, packing=True", {"packing": True})}
DEFAULT_VARIANTS = {"lora": ["trl", "tf-base", "tf-fused", "tf-bf16", "tf-pack", "tf-varlen", "tf-varlen-ckpt",
                             "tf-group", "tf-defaults"],
                    "full": ["trl", "tf-base", "tf-bf16", "tf-pack", "tf-varlen", "tf-varlen-ckpt", "tf-defaults"]}


# ---------------------------------------------------------------------------------------------- child helpers

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _gpu_peak() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def flop_counts(model) -> dict:
    """N_body: weights of the decoder's linear layers (base weights only); N_head: the output projection."""
    import torch

    from tuneforge.objectives.functional import unwrap
    base = unwrap(model)
    head = base.get_output_embeddings()
    # PEFT keeps the frozen weight of a wrapped layer in `<name>.base_layer` (an nn.Linear); its lora_A/lora_B
    # are nn.Linear too, and are left out
    n_body = sum(m.weight.numel() for name, m in base.get_decoder().named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    return {"n_body": n_body, "n_head": head.weight.numel()}


class StepClock:
    """Start time of every optimizer step, and the end of the last one; per step its real tokens, supervised
    tokens and (preference runs) pairs."""

    def __init__(self):
        self.starts: list[float] = []
        self.end: float | None = None
        self.real: list[int] = []
        self.supervised: list[int] = []
        self.pairs: list[int] = []
        self.prepared: list[float] = []  # tuneforge: when each step's `prepare` returned (online RL: rollouts done)


def summarise(clock: StepClock, warmup: int, extra: dict) -> dict:
    steps = len(clock.starts)
    # packed runs cover the same conversations in fewer (fuller) steps: keep at least one timed step
    warmup = max(0, min(warmup, steps - 1))
    seconds = clock.end - clock.starts[warmup]
    real = sum(clock.real[warmup:steps])
    sup = sum(clock.supervised[warmup:steps])
    # pairs per second next to tokens per second: a run computing a pair's prompt once has fewer real tokens
    # per pair, so its token rate alone would hide (or, counted whole, double count) the saving
    pairs = {"pairs": sum(clock.pairs[warmup:steps]), "pairs_s": sum(clock.pairs[warmup:steps]) / seconds,
             "tokens_per_pair": real / max(1, sum(clock.pairs[warmup:steps]))} if clock.pairs else {}
    return {**pairs, "steps": steps, "timed_steps": steps - warmup, "warmup_steps": warmup, "seconds": seconds,
            "real_tokens": real, "supervised_tokens": sup, "real_tok_s": real / seconds,
            "step_seconds": seconds / (steps - warmup),
            "all_real_tokens": sum(clock.real), "all_supervised_tokens": sum(clock.supervised), **extra}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- tuneforge child

def child_tuneforge(spec: dict) -> dict:
    import torch

    import tuneforge.run as tr
    from tuneforge.config.schema import RunConfig

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    sw = spec["switches"]
    work = Path(spec["workdir"])
    cfg = RunConfig.model_validate({
        "method": "sft",
        "model": {"name": spec["model"], "attn_implementation": sw.get("attn")},
        "data": {"train": spec["data"], "max_length": spec["max_length"], "mask": "assistant",
                 "packing": sw.get("packing", False), "group_by_length": bool(sw.get("group")),
                 "cache_dir": str(work / "tokcache")},
        "lora": {"enabled": spec["case"] == "lora", **LORA, "fused_dropout": sw.get("fused", True)},
        "train": {"output_dir": str(work / "run"),
                  # packed: a step holds `rows` rows of max_length, one row per micro-batch by default,
                  # or all of them in one wide micro-batch (micro_batch_tokens = rows x max_length)
                  "micro_batch_size": spec["rows"] if sw.get("packing") else spec["batch"], "grad_accum": 1,
                  "micro_batch_tokens": spec["rows"] * spec["max_length"] if sw.get("wide") else None,
                  "epochs": 1, "autocast": sw.get("autocast", "none"),
                  "activation_checkpointing": bool(sw.get("ckpt")), "compile": bool(sw.get("compile")),
                  "tensorboard": False, "progress": False,
                  "log_every": 1000000, "seed": 0},
        "eval": {"loss": False, "generate": False, "before": False},
    })
    clock, info = StepClock(), {}
    timed_train(tr, cfg, clock, info, before=lambda model: info.update(flop_counts(model)))
    return summarise(clock, spec["warmup"], {**info, "mask": MASK_TF})


def timed_train(tr, cfg, clock: "StepClock", info: dict, before=None, count: str = "supervised",
                history: list | None = None, watch=None) -> None:
    """`tuneforge.run.train(cfg)` (tr: the tuneforge.run module) with `fit` timed step by step into `clock`
    and peak memory read into `info`; stops once fit returns (evaluation and the final save are skipped).
    `count`: the clock list that gets each step's loss count (the objective's unit: "supervised" tokens for
    SFT, "pairs" for preference methods). `history`, if given, receives fit's rows (one per optimizer update,
    with the objective's metrics: online RL's reward, gen_seconds, ...); `watch(micro_batches)` is called at
    the start of every step with the loader's micro-batches (to record which examples a step trained on)."""

    class Done(Exception):
        pass

    class TimedObjective:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def prepare(self, module, batches):  # once per step, before its forward/backward passes
            clock.starts.append(time.perf_counter())
            if watch is not None:
                watch(batches)
            updates = self.inner.prepare(module, batches)
            clock.prepared.append(time.perf_counter())
            return updates

    real_fit = tr.fit

    def timed_fit(model, objective, *args, **kwargs):
        if before is not None:
            before(model)
        info["setup_peak_kb"] = _status_kb("VmHWM")
        info["exact_reset"] = _reset_peak()
        result = real_fit(model, TimedObjective(objective), *args, **kwargs)
        clock.end = time.perf_counter()
        clock.real += [int(row["tokens"]) for row in result.history]
        getattr(clock, count).extend(int(row["count"]) for row in result.history)
        if count != "supervised":
            clock.supervised += [0] * len(result.history)
        info["train_peak_kb"] = _status_kb("VmHWM")
        info["final_loss"] = result.train_loss
        if history is not None:
            history.extend(result.history)
        info["gpu_peak_gb"] = _gpu_peak()
        raise Done  # the numbers are in; skip writing the final model

    tr.fit = timed_fit
    try:
        tr.train(cfg)
    except Done:
        pass
    else:
        raise SystemExit("tuneforge.run.train returned without calling fit")
    finally:
        tr.fit = real_fit


def trl_clock(clock: "StepClock", info: dict, before=None, logs: list | None = None):
    """A transformers TrainerCallback timing each optimizer step into `clock` and reading peak memory; `logs`,
    if given, receives every dict the trainer logs (with its global step under "step")."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kw):
            if before is not None:
                before()
            info["setup_peak_kb"] = _status_kb("VmHWM")
            info["exact_reset"] = _reset_peak()

        def on_step_begin(self, args_, state, control, **kw):
            clock.starts.append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kw):
            clock.end = time.perf_counter()
            info["train_peak_kb"] = _status_kb("VmHWM")

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs is not None and logs_out is not None:
                logs_out.append({"step": state.global_step, **logs})

    logs_out = logs
    return Clock()


# ---------------------------------------------------------------------------------------------- TRL child

def generation_marked(template: str) -> str:
    """SmolLM2's ChatML template with {% generation %} around each assistant reply and its <|im_end|>."""
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if plain not in template:
        raise SystemExit("unexpected chat template: cannot add {% generation %} markers for TRL's "
                         "assistant_only_loss (bench/run.py generation_marked)")
    marked = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + plain
              + "{% endif %}")
    return template.replace(plain, marked)


def child_trl(spec: dict) -> dict:
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import datasets
    import trl
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tuneforge.models.load import load_causal_lm

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    model, tok = load_causal_lm(spec["model"])
    records = [json.loads(line) for line in open(spec["data"], encoding="utf-8")]
    original = tok.chat_template
    tok.chat_template = generation_marked(original)
    for r in records[:64]:  # the markers must not change a single byte of the render
        a = tok.apply_chat_template(r["messages"], tokenize=False, chat_template=original)
        b = tok.apply_chat_template(r["messages"], tokenize=False)
        if a != b:
            raise SystemExit("generation-marked template renders differently from the original")
    bf16 = spec["dtype"] == "bf16"
    on_cpu = not torch.cuda.is_available()
    lora = spec["case"] == "lora"
    args = SFTConfig(
        output_dir=str(Path(spec["workdir"]) / "run"),
        per_device_train_batch_size=spec["rows"] if spec["switches"].get("packing") else spec["batch"],
        gradient_accumulation_steps=1, num_train_epochs=1,
        max_length=spec["max_length"], assistant_only_loss=True, packing=bool(spec["switches"].get("packing")),
        bf16=bf16, fp16=False, **({"learning_rate": 2e-4} if lora else {}),
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_pin_memory=not on_cpu,
        use_cpu=on_cpu,  # transformers refuses bf16 on a CPU-only machine unless use_cpu is set
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=int(LORA["alpha"]), lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tok, peft_config=peft_config)
    clock, info = StepClock(), {"trl_version": trl.__version__,
                                "gradient_checkpointing": args.gradient_checkpointing, "optim": str(args.optim),
                                "lr": args.learning_rate}
    from common import count_batches
    batches = count_batches(trainer)

    trainer.add_callback(trl_clock(clock, info, before=lambda: info.update(flop_counts(trainer.model))))
    out = trainer.train()
    info["final_loss"] = out.training_loss
    info["gpu_peak_gb"] = _gpu_peak()
    steps = len(clock.starts)
    clock.real = [b[0] for b in batches[:steps]]
    clock.supervised = [b[1] for b in batches[:steps]]
    info["parity"] = _mask_parity(trainer.train_dataset, records, tok, original, spec)
    return summarise(clock, spec["warmup"], {**info, "mask": MASK_TRL})


def _mask_parity(dataset, records, tok, original_template, spec) -> dict:
    """TRL's tokenised rows (input_ids, labels) against tuneforge's render of the same conversations."""
    if "labels" not in dataset.column_names or spec["switches"].get("packing"):
        return {"checked": 0, "note": "packed rows: not compared"}
    from tuneforge.data.chat import tokenize_chat
    from tuneforge.data.records import ChatRecord, Message
    tok.chat_template = original_template
    same_ids = same_mask = 0
    sup_trl = sup_tf = 0
    for row, rec in zip(dataset, records, strict=True):
        chat = ChatRecord([Message(m["role"], m["content"]) for m in rec["messages"]])
        ex = tokenize_chat(tok, chat, "assistant", spec["max_length"])
        mask_trl = [int(x != -100) for x in row["labels"]]
        same_ids += ex is not None and list(row["input_ids"]) == list(ex.input_ids)
        same_mask += ex is not None and mask_trl == list(ex.loss_mask)
        sup_trl += sum(mask_trl)
        sup_tf += sum(ex.loss_mask) if ex is not None else 0
    return {"checked": len(records), "same_input_ids": same_ids, "same_loss_mask": same_mask,
            "supervised_trl": sup_trl, "supervised_tuneforge": sup_tf}


# ---------------------------------------------------------------------------------------------- parent

def run_child(spec: dict, log: Path, extra_env: dict | None = None) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    return spawn(__file__, spec, log.with_suffix(".spec.json"), log.with_suffix(".result.json"), log, extra_env)


def ensure_data(n: int, seed: int, min_tokens: int, max_tokens: int) -> tuple[Path, dict]:
    """The conversations file (written once by bench/data.py) and its length statistics."""
    path = WORK / f"chat-n{n}-s{seed}-{min_tokens}-{max_tokens}.jsonl"
    stats_file = path.with_suffix(".stats.json")
    if not (path.exists() and stats_file.exists()):
        WORK.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, str(BENCH / "data.py"), "--out", str(path), "--n", str(n), "--seed",
                              str(seed), "--min-tokens", str(min_tokens), "--max-tokens", str(max_tokens)],
                             check=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        stats_file.write_text(out.stdout.strip().splitlines()[-1])
    return path, json.loads(stats_file.read_text())


def matmul_rates(threads: int | None) -> dict:
    cmd = [sys.executable, str(BENCH / "matmul.py")] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def have_trl() -> str | None:
    try:
        from importlib.metadata import version
        return version("trl")
    except Exception:  # noqa: BLE001 - not installed
        return None


def mfu(row: dict, case: str, rate_gflops: float) -> float:
    k = 4 if case == "lora" else 6
    flops = k * row["n_body"] * row["real_tokens"] + k * row["n_head"] * row["supervised_tokens"]
    row["model_tflop"] = flops / 1e12
    return flops / row["seconds"] / (rate_gflops * 1e9)


def fmt_table(rows: list[dict]) -> str:
    head = ("| case | side | what | dtype | loss mask | real tok/s | tok/s runs | peak RSS GB | MFU | tok/s vs TRL | "
            "RSS vs TRL | timed steps | s/step | timed real tokens |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} | {r['side']} | {r['label']} | {r['dtype']} | | error: "
                       f"{r['error'][:100]} | | | | | | | | |")
            continue

        def ratio(k: str, r=r) -> str:
            return f"{r[k]:.2f}x" if r.get(k) is not None else "-"
        mask = "assistant+eot (TRL assistant_only_loss)" if r["side"].startswith("trl") else \
            "assistant+eot (tuneforge mask=assistant)"
        spread = "/".join(f"{v:.0f}" for v in r.get("tok_s_runs", []))
        if r.get("failed_runs"):
            spread += f" ({r['failed_runs']} failed)"
        out.append(f"| {r['case']} | {r['side']} | {r['label']} | {r['dtype']} | {mask} | {r['real_tok_s']:.0f} | "
                   f"{spread} | {r['peak_rss_gb']:.2f} | {r['mfu']:.1%} | {ratio('tok_ratio')} | "
                   f"{ratio('rss_ratio')} | {r['timed_steps']} of {r['steps']} | {r['step_seconds']:.1f} | "
                   f"{r['real_tokens']} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    """The issue's LoRA operating points, checked for every tuneforge run that has a TRL run beside it."""
    lines = []
    for r in rows:
        if r["case"] != "lora" or r["side"].startswith("trl") or r.get("tok_ratio") is None:
            continue
        fast = r["tok_ratio"] >= 2.5 and r["rss_ratio"] <= 1.0
        lean = r["rss_ratio"] <= 0.4 and r["tok_ratio"] >= 1.5
        lines.append(f"- {r['side']}: {r['tok_ratio']:.2f}x TRL's real tok/s at {r['rss_ratio']:.2f}x its peak RSS"
                     f" -> fast point (>=2.5x at <=1.0x) {'MET' if fast else 'not met'}; "
                     f"lean point (<=0.4x at >=1.5x) {'MET' if lean else 'not met'}")
    return lines


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for p in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="lora,full")
    ap.add_argument("--variants", default=None,
                    help="comma list from trl,trl-pack," + ",".join(TF_VARIANTS) + " (default: per case)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps of a padded run (default 16)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, quick 1)")
    ap.add_argument("--batch", type=int, default=8, help="conversations per optimizer step (padded rungs)")
    ap.add_argument("--pack-rows", type=int, default=None,
                    help="rows of --max-length per step in packed rungs (default: as many as hold the tokens of "
                         "one padded batch on average, batch * mean length / max length)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every rung this many times, interleaved (order reversed every other round), and "
                         "report the fastest run of each (contention only slows a run) with every run's tok/s: "
                         "use 2-3 on a shared machine")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--min-tokens", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=None, help="longest conversation (default 500, quick 250)")
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--quick", action="store_true", help="2 timed steps after 1 warm-up, conversations <= 250 "
                    "tokens: checks the harness end to end; the numbers are not a measurement")
    ap.add_argument("--no-trl", action="store_true", help="tuneforge sides only")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of every child, both sides (repeatable), e.g. MALLOC_MMAP_THRESHOLD_=1048576: "
                         "glibc's dynamic mmap threshold keeps freed activation memory resident, so peak RSS "
                         "measures the allocator as much as the tensors")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if serve(args, child_trl, child_tuneforge):
        return 0

    steps = args.steps or (2 if args.quick else 16)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    max_tokens = args.max_tokens or (250 if args.quick else 500)
    if max_tokens > args.max_length:
        raise SystemExit("--max-tokens must not exceed --max-length (nothing may be truncated on either side)")
    n_examples = args.batch * (steps + warmup)
    trl_version = None if args.no_trl else have_trl()
    if not args.no_trl and trl_version is None:
        print("note: trl is not installed (pip install -e '.[bench]'); running the tuneforge sides only")

    extra_env = dict(kv.split("=", 1) for kv in args.env)
    t_start = time.perf_counter()
    print("[bench] measuring matmul rates ...", flush=True)
    rate_runs = [matmul_rates(args.threads)]
    rates = dict(rate_runs[0])
    if args.dtype == "auto":
        dtype = "bf16" if rates["bfloat16"] > rates["float32"] else "fp32"
    else:
        dtype = args.dtype
    print(f"[bench] matmul GFLOP/s: float32 {rates['float32']}, bfloat16 {rates['bfloat16']} -> compute dtype "
          f"{dtype}", flush=True)
    print(f"[bench] data: {n_examples} conversations ...", flush=True)
    data, data_stats = ensure_data(n_examples, args.seed, args.min_tokens, max_tokens)
    import hashlib
    data_sha = hashlib.sha256(data.read_bytes()).hexdigest()
    pack_rows = args.pack_rows or max(1, round(args.batch * data_stats["tokens_mean"] / args.max_length))

    plan = []
    for case in args.cases.split(","):
        wanted = args.variants.split(",") if args.variants else DEFAULT_VARIANTS[case]
        for side in wanted:
            if side.startswith("trl") and trl_version is None:
                continue
            if side == "tf-bf16" and dtype != "bf16":
                continue  # the ladder's autocast rung only exists where bf16 is the compute dtype
            if side in TF_VARIANTS:
                label, switches = TF_VARIANTS[side]
                switches = {k: (("bf16" if dtype == "bf16" else "none") if v == "dt" else v)
                            for k, v in switches.items()}
                run_dtype = "bf16" if switches.get("autocast") == "bf16" else "fp32"
            elif side in TRL_VARIANTS:
                label, switches = TRL_VARIANTS[side]
                run_dtype = dtype
            else:
                raise SystemExit(f"unknown variant {side}")
            if switches.get("packing"):
                label += f"; {pack_rows} rows x {args.max_length} per step"
            plan.append((case, side, label, switches, run_dtype))

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs: list[dict] = []
    for rep in range(args.repeats):
        for case, side, label, switches, run_dtype in (plan if rep % 2 == 0 else plan[::-1]):
            WORK.mkdir(parents=True, exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix=f"{case}-{side}-", dir=WORK))
            spec = {"case": case, "side": side, "switches": switches, "dtype": run_dtype, "model": args.model,
                    "data": str(data), "batch": args.batch, "rows": pack_rows, "max_length": args.max_length,
                    "warmup": warmup, "threads": args.threads, "workdir": str(workdir)}
            tag = f" [round {rep + 1}/{args.repeats}]" if args.repeats > 1 else ""
            print(f"[bench] {case} {side} ({label}, {run_dtype}){tag} ...", end=" ", flush=True)
            res = run_child(spec, WORK / "logs" / f"{stamp}-{case}-{side}-r{rep + 1}.log", extra_env)
            shutil.rmtree(workdir, ignore_errors=True)
            row = {"case": case, "side": side, "label": label, "dtype": run_dtype, "round": rep + 1, **res}
            if "error" not in row:
                row["peak_rss_gb"] = max(row["setup_peak_kb"], row["train_peak_kb"]) / 2**20
                row["train_peak_rss_gb"] = row["train_peak_kb"] / 2**20
                print(f"{row['real_tok_s']:.0f} real tok/s, peak RSS {row['peak_rss_gb']:.2f} GB "
                      f"({row['wall_seconds']:.0f} s)", flush=True)
            else:
                print("FAILED: " + row["error"], flush=True)
            runs.append(row)
    print("[bench] measuring matmul rates again ...", flush=True)
    rate_runs.append(matmul_rates(args.threads))
    for k in ("float32", "bfloat16"):  # the machine's capability: the best of the measurements
        rates[k] = max(r[k] for r in rate_runs)

    rows = []
    for case, side, _label, _, run_dtype in plan:
        mine = [r for r in runs if r["case"] == case and r["side"] == side]
        ok = sorted((r for r in mine if "error" not in r), key=lambda r: r["real_tok_s"])
        if not ok:
            rows.append(mine[0])
            continue
        row = dict(ok[-1])  # the fastest run: on a shared machine contention only ever slows a run down
        row["tok_s_runs"] = [round(r["real_tok_s"], 1) for r in ok]
        row["rss_gb_runs"] = [round(r["peak_rss_gb"], 3) for r in ok]
        row["failed_runs"] = len(mine) - len(ok)
        row["mfu"] = mfu(row, case, rates["bfloat16" if run_dtype == "bf16" else "float32"])
        rows.append(row)

    for case in {r["case"] for r in rows}:
        peer = next((r for r in rows if r["case"] == case and r["side"] == "trl" and "error" not in r), None)
        for r in rows:
            if r["case"] == case and peer is not None and "error" not in r:
                r["tok_ratio"] = r["real_tok_s"] / peer["real_tok_s"]
                r["rss_ratio"] = r["peak_rss_gb"] / peer["peak_rss_gb"]

    table = fmt_table(rows)
    parity = [r["parity"] for r in rows if r.get("parity", {}).get("checked")]
    lines = [f"# tuneforge vs TRL: SFT of SmolLM2-135M ({stamp})", ""]
    if args.quick:
        lines += ["**QUICK RUN: harness check only (few steps, short data); not a measurement.**", ""]
    lines += [
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, torch threads "
        f"{rates['threads']}, {platform.system()} {platform.release()}",
        f"- matmul GFLOP/s (bench/matmul.py, F.linear, best of before/after the runs; MFU uses these): float32 "
        f"{rates['float32']}, bfloat16 {rates['bfloat16']}; before "
        f"{rate_runs[0]['float32']}/{rate_runs[0]['bfloat16']}, after {rate_runs[-1]['float32']}/"
        f"{rate_runs[-1]['bfloat16']} (a drop means the machine was busy); torch.matmul "
        f"{rates.get('matmul_float32')}/{rates.get('matmul_bfloat16')}; cpu capability "
        f"{rates.get('cpu_capability', '-')}, flags {', '.join(rates.get('cpu_flags', []))}",
        f"- compute dtype: **{dtype}** on both sides"
        + (" (bf16 autocast, float32 master weights)" if dtype == "bf16" else
           " (this machine's bf16 matmul is slower than float32, so TRL runs with bf16=False)"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items() if v),
        f"- data: {data.name} ({n_examples} conversations, {args.min_tokens}-{max_tokens} tokens rendered, "
        f"mean {data_stats['tokens_mean']}, sha256 {data_sha[:16]}), batch {args.batch} conversations "
        f"(packed rungs: {pack_rows} rows of {args.max_length}, the same tokens per step on average), max length "
        f"{args.max_length}, one epoch per run; {warmup} warm-up steps excluded from timing; "
        f"{args.repeats} round(s), interleaved, fastest run shown",
        f"- child environment: {' '.join(args.env) if args.env else 'as inherited (glibc malloc defaults)'}",
        f"- LoRA r {LORA['r']}, alpha {LORA['alpha']:.0f}, dropout {LORA['dropout']}, all linear layers, both sides",
        "- loss mask: both sides train on every assistant turn and its <|im_end|>, nothing else"
        + (": " + "; ".join(f"checked on {p['checked']} conversations: identical input ids {p['same_input_ids']}, "
                            f"identical loss mask {p['same_loss_mask']}, supervised tokens TRL "
                            f"{p['supervised_trl']} / tuneforge {p['supervised_tuneforge']}" for p in parity[:1])
           if parity else ""),
        "", table, ""]
    tl = targets(rows)
    if tl:
        lines += ["LoRA operating points (issue targets):", *tl, ""]
    lines += [("real tok/s: non-pad tokens of the timed steps / their wall time (fastest of the rounds; 'tok/s "
               "runs' lists every round). peak RSS: the child process's VmHWM at its last step (load + tokenise + "
               "train). "
               "MFU: (4 or 6) x (N_body x real tokens + N_head x supervised tokens) / time / matmul rate of the "
               "run's dtype. Ratios: this row / the TRL row of the same case."), "",
              f"total wall time {time.perf_counter() - t_start:.0f} s"]
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"{stamp}{suffix}.md").write_text(report + "\n")
    (out / f"{stamp}{suffix}.json").write_text(json.dumps(
        {"rates": rates, "rate_runs": rate_runs, "dtype": dtype, "env": extra_env, "argv": sys.argv[1:],
         "data": str(data), "data_stats": data_stats, "data_sha256": data_sha, "steps": steps, "warmup": warmup,
         "pack_rows": pack_rows, "repeats": args.repeats, "versions": versions(), "rows": rows, "runs": runs},
        indent=1, default=str))
    print(f"\nwritten {out / (stamp + suffix)}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
