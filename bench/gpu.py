"""GPU check: a randomly initialised model of Llama-3.2-1B's shape, packed sequences of 2048, LoRA and full
fine-tuning through tuneforge's loop, and the same through TRL's SFTTrainer when it is installed.

Run it through bench/gpu.sh (which bounds the wall time). Every (case, side) runs in its own child process,
so the peak GPU memory (`torch.cuda.max_memory_allocated`, weights + gradients + optimizer + activations)
belongs to one run. Reported per run: real tokens per second (every token of a packed row is real), peak GPU
memory, and MFU = FLOPs the work needs / time / this GPU's measured bf16 matmul rate (bench/matmul.py), with
FLOPs = (4 for LoRA, 6 for full) * (N_body * tokens + N_head * supervised tokens); N_body = the decoder's linear
weights, N_head = the output projection; attention scores are not counted (at 2048 tokens they add ~20%).

Both sides: the same random weights (seed 0), float32 master weights with bf16 autocast, the same synthetic
examples (random token ids; lengths 64..1536, the first 30% of each example unsupervised), packed into rows
of 2048, `--batch` rows per optimizer step, AdamW, LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers.
tuneforge: `tuneforge.train.loop.fit` with PackedExamples + collate_packed, no activation checkpointing
(--ckpt adds it). TRL: SFTConfig(packing=True, bf16=True, completion_only_loss=True), its defaults otherwise
(gradient checkpointing on), on a pre-tokenised dataset (input_ids, completion_mask).

    python bench/gpu.py [--cases lora,full] [--sides tuneforge,trl] [--steps 10] [--warmup 3] [--batch 4]
    python bench/gpu.py --cpu-smoke      # the same code at toy size on the CPU (checks the harness)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

from common import serve, spawn  # noqa: E402  (bench/ is the script's folder, first on sys.path)

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, head_dim=64, rms_norm_eps=1e-5,
                max_position_embeddings=131072, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
TOY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
           vocab_size=1024, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=True,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def make_model(shape: dict, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)  # float32 master weights; compute in bf16 autocast
    return model


def synthetic_examples(vocab: int, seq: int, rows: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) examples totalling about rows * seq tokens; lengths 64..0.75*seq."""
    rng = random.Random(seed)
    out, total = [], 0
    lo, hi = min(64, seq // 4), max(min(64, seq // 4) + 1, int(seq * 0.75))
    while total < rows * seq:
        n = rng.randint(lo, hi)
        prompt = int(n * 0.3)
        out.append(([rng.randrange(3, vocab) for _ in range(n)], [0] * prompt + [1] * (n - prompt)))
        total += n
    return out


def flop_counts(model) -> dict:
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_body = sum(m.weight.numel() for name, m in base.get_decoder().named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    return {"n_body": n_body, "n_head": base.get_output_embeddings().weight.numel()}


def _sync(device: str):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> dict:
    import torch
    out = {}
    if device.startswith("cuda"):
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["peak_rss_gb"] = int(line.split()[1]) / 2**20
    return out


def child_tuneforge(spec: dict) -> dict:
    import torch

    from tuneforge.data.chat import TokenizedExample
    from tuneforge.data.packing import PackedExamples, collate_packed
    from tuneforge.config.schema import TrainSection
    from tuneforge.objectives.sft import SFTObjective
    from tuneforge.train.loop import fit

    device = spec["device"]
    model = make_model(spec["shape"], device)
    if spec["case"] == "lora":
        from tuneforge.adapters.lora import apply_lora
        torch.manual_seed(0)
        model = apply_lora(model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                           target_modules="all-linear")
    if spec["ckpt"]:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples = [TokenizedExample(ids, mask) for ids, mask in spec_examples(spec)]
    rows = PackedExamples(examples, spec["seq"])
    settings = TrainSection(output_dir=spec["workdir"], micro_batch_size=spec["batch"],
                            max_steps=spec["warmup"] + spec["steps"], lr=2e-4 if spec["case"] == "lora" else 1e-5,
                            warmup_ratio=0.0, autocast="bf16", tensorboard=False, progress=False,
                            log_every=10**6)
    starts, real, sup = [], [], []
    objective = SFTObjective()
    inner_prepare = objective.prepare

    def timed_prepare(module, batches):  # once per step, before its forward/backward passes
        _sync(device)
        starts.append(time.perf_counter())
        return inner_prepare(module, batches)

    objective.prepare = timed_prepare
    counts = flop_counts(model)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = fit(model, objective, rows, lambda b: collate_packed(b, 0), settings, device=torch.device(device))
    _sync(device)
    end = time.perf_counter()
    real += [row["tokens"] for row in result.history]
    sup += [row["count"] for row in result.history]
    return {**summarise(starts, end, real, sup, spec["warmup"]), **counts, **_peak(device),
            "final_loss": result.train_loss}


def child_trl(spec: dict) -> dict:
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    device = spec["device"]
    model = make_model(spec["shape"], device)
    tok = _stub_tokenizer(PreTrainedTokenizerFast, spec["shape"]["vocab_size"])
    data = datasets.Dataset.from_list([{"input_ids": ids, "completion_mask": mask}
                                       for ids, mask in spec_examples(spec)])
    lora = spec["case"] == "lora"
    args = SFTConfig(output_dir=spec["workdir"], per_device_train_batch_size=spec["batch"],
                     max_steps=spec["warmup"] + spec["steps"], max_length=spec["seq"], packing=True,
                     completion_only_loss=True, bf16=True, learning_rate=2e-4 if lora else 2e-5,
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=0, logging_steps=10**6,
                     dataloader_pin_memory=device.startswith("cuda"), use_cpu=not device.startswith("cuda"))
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
    from common import count_batches
    batches = count_batches(trainer)
    starts, ends, counts = [], [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            counts.update(flop_counts(trainer.model))
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            _sync(device)
            starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            _sync(device)
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    out = trainer.train()
    n = len(starts)
    return {**summarise(starts, ends[-1], [b[0] for b in batches[:n]], [b[1] for b in batches[:n]],
                        spec["warmup"]), **counts, **_peak(device), "final_loss": out.training_loss,
            "trl_version": trl.__version__, "gradient_checkpointing": args.gradient_checkpointing}


def _stub_tokenizer(cls, vocab: int):
    """A word-level tokenizer over the model's vocabulary: TRL needs a processing class with a pad token; the
    data is already tokenised, so it is never used to encode text."""
    from tokenizers import Tokenizer, models
    vocab_map = {f"t{i}": i for i in range(vocab)}
    tok = cls(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="t0")))
    tok.pad_token, tok.eos_token, tok.bos_token = "t0", "t2", "t1"
    return tok


def spec_examples(spec: dict):
    return synthetic_examples(spec["shape"]["vocab_size"], spec["seq"],
                              spec["batch"] * (spec["warmup"] + spec["steps"] + 2))


def summarise(starts, end, real, sup, warmup) -> dict:
    steps = len(starts)
    warmup = max(0, min(warmup, steps - 1))
    seconds = end - starts[warmup]
    return {"steps": steps, "timed_steps": steps - warmup, "seconds": seconds,
            "real_tokens": sum(real[warmup:steps]), "supervised_tokens": sum(sup[warmup:steps]),
            "tok_s": sum(real[warmup:steps]) / seconds}


def run_child(spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="tf-gpu-") as tmp:
        t = Path(tmp)
        return spawn(__file__, {**spec, "workdir": tmp}, t / "spec.json", t / "result.json", t / "log.txt",
                     timeout=timeout, tail=4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="lora,full")
    ap.add_argument("--sides", default="tuneforge,trl")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; smoke 1)")
    ap.add_argument("--batch", type=int, default=None, help="packed rows per step (default 4; smoke 2)")
    ap.add_argument("--seq", type=int, default=None, help="row length (default 2048; smoke 256)")
    ap.add_argument("--ckpt", action="store_true", help="tuneforge with activation checkpointing")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy model on the CPU: checks the code path only")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all runs together (default 200; smoke 900): each child gets an equal share "
                         "of what is left, and one that overruns is stopped and reported")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if serve(args, child_trl, child_tuneforge):
        return 0

    smoke = args.cpu_smoke
    import torch
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu-smoke to check the harness on the CPU")
    device = "cpu" if smoke else "cuda"
    shape = TOY if smoke else LLAMA_1B
    steps, warmup = args.steps or (2 if smoke else 10), args.warmup if args.warmup is not None else (1 if smoke else 3)
    batch, seq = args.batch or (2 if smoke else 4), args.seq or (256 if smoke else 2048)
    t_start = time.perf_counter()
    deadline = t_start + (args.budget or (900 if smoke else 200))
    mm = subprocess.run([sys.executable, str(BENCH / "matmul.py"), "--device", device, "--reps", "5"]
                        + (["--n", "512", "--max-seconds", "0.5"] if smoke else []),
                        check=True, capture_output=True, text=True)
    rates = json.loads(mm.stdout.strip().splitlines()[-1])
    print(f"[gpu-bench] {rates.get('gpu', 'cpu')}: matmul bf16 {rates['bfloat16']:.0f} GFLOP/s, float32 "
          f"{rates['float32']:.0f} GFLOP/s", flush=True)
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
    rows = []
    if not have_trl and "trl" in args.sides.split(","):
        print("[gpu-bench] trl not installed: TRL rows skipped", flush=True)
    plan = [(c, s) for c in args.cases.split(",") for s in args.sides.split(",") if s != "trl" or have_trl]
    for i, (case, side) in enumerate(plan):
            timeout = max(20.0, (deadline - time.perf_counter()) / (len(plan) - i))
            spec = {"case": case, "side": side, "device": device, "shape": shape, "steps": steps,
                    "warmup": warmup, "batch": batch, "seq": seq, "ckpt": args.ckpt}
            print(f"[gpu-bench] {case} {side} ...", end=" ", flush=True)
            row = {"case": case, "side": side, **run_child(spec, timeout)}
            if "error" not in row:
                k = 4 if case == "lora" else 6
                flops = k * (row["n_body"] * row["real_tokens"] + row["n_head"] * row["supervised_tokens"])
                row["mfu"] = flops / row["seconds"] / (rates["bfloat16"] * 1e9)
                mem = row.get("peak_gpu_gb", row.get("peak_rss_gb"))
                print(f"{row['tok_s']:.0f} tok/s, peak {mem:.2f} GB, MFU {row['mfu']:.1%} "
                      f"({row['wall_seconds']:.0f} s)", flush=True)
            else:
                print("FAILED: " + row["error"], flush=True)
            rows.append(row)
    for r in rows:
        peer = next((p for p in rows if p["case"] == r["case"] and p["side"] == "trl" and "error" not in p), None)
        if peer and "error" not in r:
            r["tok_ratio"] = r["tok_s"] / peer["tok_s"]
            key = "peak_gpu_gb" if "peak_gpu_gb" in r else "peak_rss_gb"
            r["mem_ratio"] = r[key] / peer[key]
    mem_name = "peak GPU GB (max_memory_allocated)" if device == "cuda" else "peak RSS GB"
    n_params = sum(flop_counts_static(shape).values())
    lines = [f"# GPU check: random-init Llama-3.2-1B shape ({n_params / 1e9:.2f}B params in matmuls), "
             f"bf16 autocast, packed rows of {seq}" if not smoke else
             "# GPU check, CPU SMOKE RUN (toy model, not a measurement)", "",
             f"- device: {rates.get('gpu', 'cpu')}; measured matmul bf16 {rates['bfloat16']:.0f} GFLOP/s",
             f"- {batch} rows x {seq} tokens per step, {warmup} warm-up + {steps} timed steps; "
             f"LoRA r {LORA['r']} all-linear; tuneforge activation checkpointing {'on' if args.ckpt else 'off'}, "
             "TRL gradient checkpointing on (its default)", "",
             f"| case | side | tok/s | {mem_name} | MFU | tok/s vs TRL | memory vs TRL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['side']} | error: {r['error'][:120]} | | | | |")
            continue
        mem = r.get("peak_gpu_gb", r.get("peak_rss_gb"))
        def ratio(k: str, r=r) -> str:
            return f"{r[k]:.2f}x" if k in r else "-"
        lines.append(f"| {r['case']} | {r['side']} | {r['tok_s']:.0f} | {mem:.2f} | {r['mfu']:.1%} | "
                     f"{ratio('tok_ratio')} | {ratio('mem_ratio')} |")
    lines += ["", f"total wall time {time.perf_counter() - t_start:.0f} s"]
    report = "\n".join(lines)
    print("\n" + report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"gpu-{stamp}{'-cpu-smoke' if smoke else ''}"
    (out / f"{name}.md").write_text(report + "\n")
    (out / f"{name}.json").write_text(json.dumps({"rates": rates, "rows": rows}, indent=1, default=str))
    return 0 if all("error" not in r for r in rows) else 1


def flop_counts_static(shape: dict) -> dict:
    h, i, v, layers = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    return {"n_body": layers * (h * q + 2 * h * kv + q * h + 3 * h * i), "n_head": v * h}


if __name__ == "__main__":
    sys.exit(main())
