"""The one training loop. Every method runs through `fit`; a method contributes only its Objective.

Per optimizer step: the method's `step` runs forward/backward over the micro-batches on loss SUMS; the loop
then divides every gradient by the step's global count (summed across micro-batches; across ranks under
torchrun), clips, and steps AdamW with the learning rate of that step. Data order is a seeded permutation per
epoch, so the step counter alone says where in the data a resumed run continues.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from dataclasses import dataclass, field

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.train import checkpoint as ckpt
from tuneforge.train.logging import MetricsLogger, Progress
from tuneforge.train.optim import lr_at, make_optimizer, set_lr


@dataclass
class LoopSettings:
    output_dir: str
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    keep_last: int = 2
    max_bad_steps: int = 5
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True
    autocast: str = "none"
    group_by_length: bool = False


@dataclass
class FitResult:
    steps: int
    train_loss: float | None
    eval: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    interrupted: bool = False


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo: bf16 matmuls at least as fast as float32 (Linux x86; else False)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_autocast(kind: str, device: torch.device) -> str:
    """`train.autocast` with "auto" decided for `device`: bf16 where it is native, else none."""
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "none"
    return "none"


def make_autocast(kind: str, device: torch.device):
    kind = resolve_autocast(kind, device)
    if kind == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def steps_per_epoch(n_examples: int, s: LoopSettings) -> int:
    return max(1, math.ceil(n_examples / (s.micro_batch_size * s.grad_accum)))


def total_steps(n_examples: int, s: LoopSettings) -> int:
    return s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch(n_examples, s)))


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int, lengths: tuple | None, group: int) -> tuple:
    """The seeded example order of one epoch. With `lengths`, examples are sorted by length inside windows of
    `group` examples (less padding per micro-batch) and the windows' micro-batches keep a seeded order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    if lengths is None:
        return tuple(order)
    window, grouped = group * 16, []
    for start in range(0, n, window):
        by_length = sorted(order[start:start + window], key=lambda i: -lengths[i])
        chunks = [by_length[i:i + group] for i in range(0, len(by_length), group)]
        for c in torch.randperm(len(chunks), generator=gen).tolist():  # long and short batches interleave
            grouped += chunks[c]
    return tuple(grouped)


def step_micro_batches(step: int, n: int, s: LoopSettings, lengths: tuple | None = None) -> list[list[int]]:
    """Example indices of each micro-batch of optimizer step `step` (a pure function of step and seed)."""
    per_epoch = steps_per_epoch(n, s)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(n, s.seed, epoch, lengths, s.micro_batch_size)
    size = s.micro_batch_size * s.grad_accum
    chunk = order[index * size:(index + 1) * size]
    return [chunk[i:i + s.micro_batch_size] for i in range(0, len(chunk), s.micro_batch_size)]


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _scale_grads(params, factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


class _StopFlag:
    """SIGINT/SIGTERM finish the current optimizer step, then the loop saves and exits cleanly."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def fit(model, objective, train_data: list, collate, s: LoopSettings, eval_data: list | None = None,
        resume: bool = False, extra_checkpoint_writer=None, device: torch.device | None = None) -> FitResult:
    """Train `model` with `objective` on `train_data` (a list of examples; `collate(list) -> batch dict`)."""
    device = device or next(model.parameters()).device
    autocast = make_autocast(s.autocast, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, s.lr, s.weight_decay, s.betas)
    n, total = len(train_data), total_steps(len(train_data), s)
    lengths = tuple(train_data.length(i) for i in range(n)) if s.group_by_length else None
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total)
    step, bad_steps = 0, 0
    if resume:
        step, bad_steps = _restore(model, optimizer, s.output_dir, n, total, s.seed)
    logger = MetricsLogger(s.output_dir, s.tensorboard)
    progress = Progress(total, step, s.progress)
    result = FitResult(steps=step, train_loss=None)
    to_device = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    seen_tokens, t_start = 0, time.perf_counter()
    model.train()
    with _StopFlag() as stop:
        while step < total:
            lr = lr_at(step, total, s.lr, warmup, s.schedule, s.min_lr_ratio)
            set_lr(optimizer, lr)
            batches = [to_device(collate([train_data[i] for i in idx]))
                       for idx in step_micro_batches(step, n, s, lengths)]
            t0 = time.perf_counter()
            out = objective.step(model, batches, autocast)
            loss, grad_norm, finite = _update(out, params, optimizer, s.max_grad_norm)
            step += 1  # a skipped step still consumed its batch and its slot of the schedule: resume stays exact
            dt = time.perf_counter() - t0
            seen_tokens += out.tokens
            count = max(out.count, 1)
            row = {"loss": loss if finite else None, "lr": lr, "grad_norm": grad_norm if finite else None,
                   "count": out.count, "tokens": out.tokens, "tokens_per_s": out.tokens / dt,
                   "skipped": int(not finite), **{k: v / count for k, v in out.metrics.items()}}
            if not finite:
                bad_steps += 1
                logger.log(step, "train", {**row, "bad_steps": bad_steps})
                _check_bad_step(step, loss, grad_norm, bad_steps, s, progress)
            else:
                result.train_loss = loss
                if step % s.log_every == 0 or step == total:
                    logger.log(step, "train", row)
            result.history.append(row)
            progress.update(loss, lr, row["tokens_per_s"])
            if eval_data and s.eval_every and step % s.eval_every == 0 and step < total:
                _log_eval(model, objective, eval_data, collate, to_device, autocast, step, logger, progress, s)
                model.train()
            if (s.save_every and step % s.save_every == 0) or stop.raised:
                _save(model, optimizer, step, s, extra_checkpoint_writer, n, total, bad_steps)
            if stop.raised:
                progress.write(f"stopped by signal at step {step}; checkpoint saved, resume with --resume")
                result.interrupted = True
                break
    result.train_seconds = time.perf_counter() - t_start
    result.tokens_per_second = seen_tokens / max(result.train_seconds, 1e-9)
    result.steps = step
    if eval_data and not result.interrupted:
        result.eval = _log_eval(model, objective, eval_data, collate, to_device, autocast, step, logger,
                                progress, s)
    progress.close()
    logger.close()
    return result


def _update(out, params, optimizer, max_grad_norm: float | None) -> tuple[float, float, bool]:
    """Normalise, clip and apply one step's gradients: (loss, grad norm, finite).

    When the loss or the gradient norm is NaN or infinite the update is not applied (weights and optimizer
    moments stay as they were), so a checkpoint saved later never holds NaN.
    """
    count = max(out.count, 1)  # under torchrun: all-reduce the count here, the one normalisation point
    loss = float(out.loss_sum) / count
    _scale_grads(params, 1.0 / count)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")).item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, finite


def _check_bad_step(step: int, loss: float, grad_norm: float, bad_steps: int, s: LoopSettings, progress) -> None:
    """Warn about a skipped step; past `max_bad_steps` stop without saving, keeping the last good checkpoint."""
    what = f"loss {loss}, gradient norm {grad_norm}"
    if bad_steps > s.max_bad_steps:
        last = ckpt.latest_checkpoint(s.output_dir)
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was saved yet"
        raise TuneforgeError(
            f"step {step}: {what}; {bad_steps} steps had a non-finite loss or gradients, more than "
            f"train.max_bad_steps={s.max_bad_steps}. Stopped without saving; {kept}. Try a lower train.lr, "
            "train.max_grad_norm, float32 instead of fp16 autocast, or check the data of these steps")
    progress.write(f"warning: step {step}: {what}; update skipped ({bad_steps} of at most {s.max_bad_steps})")


def _log_eval(model, objective, eval_data, collate, to_device, autocast, step, logger, progress, s):
    model.eval()
    size = s.micro_batch_size
    batches = (to_device(collate(eval_data[i:i + size])) for i in range(0, len(eval_data), size))
    metrics = objective.evaluate(model, batches, autocast)
    if objective.unit == "tokens":
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    logger.log(step, "eval", metrics)
    progress.write(f"step {step}: eval " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _save(model, optimizer, step, s: LoopSettings, extra_writer, n_examples: int, total: int, bad_steps: int):
    epoch, batch = divmod(step, steps_per_epoch(n_examples, s))
    # The step alone fixes data position and schedule; the rest is written for people and for checks on resume.
    state = {"seed": s.seed, "epoch": epoch, "batch_in_epoch": batch, "total_steps": total, "examples": n_examples,
             "bad_steps": bad_steps}
    ckpt.save_checkpoint(s.output_dir, step, trainable_weights(model), optimizer, state,
                         keep_last=s.keep_last, extra_writer=extra_writer)


def _restore(model, optimizer, run_dir, n_examples: int, total: int, seed: int) -> tuple[int, int]:
    """(step, bad steps so far) from the newest readable checkpoint; (0, 0) when there is none."""
    found = ckpt.load_latest(run_dir, warn=lambda message: print(f"warning: {message}", flush=True))
    if found is None:
        return 0, 0
    path, (weights, opt_tensors, rng_tensors, state) = found
    expected = {"examples": n_examples, "total_steps": total, "seed": seed}
    changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k, v) != v}
    if changed:  # a different data set, schedule or seed would silently replay or skip data
        raise TuneforgeError(f"{path}: cannot resume exactly, the run changed since the checkpoint "
                             + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
    current = trainable_weights(model)
    missing = set(current) - set(weights)
    if missing:
        raise TuneforgeError(f"checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for name, param in current.items():
            param.copy_(weights[name])
    ckpt.optimizer_from_flat(optimizer, opt_tensors, state["optimizer"])
    ckpt.set_rng_state(rng_tensors, state["rng"])
    return int(state["step"]), int(state.get("bad_steps", 0))
