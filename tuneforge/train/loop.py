"""The one training loop. Every method runs through `fit`; a method contributes only its Objective.

Per step the loop takes one batch of data (this rank's micro-batches of it), asks the method for the updates
that batch yields (objectives/base.py states the contract), and for each update: back-propagates the loss SUM
of every micro-batch (gradient sync only on the last one under DDP), adds counts and sums over micro-batches
and ranks, divides every gradient by the global count once, clips, and steps AdamW with the learning rate of
that update. Checkpoints fall between batches of data, where the step counter alone fixes the data position.
Settings come from the config's `train` section (config/schema.py): the one place for every default.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field

import torch

from tuneforge.data.packing import example_lengths, real_tokens
from tuneforge.errors import TuneforgeError
from tuneforge.models.heads import as_train_module, train_module
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import distributed as dist
from tuneforge.train.data_order import rank_share, step_micro_batches, step_places, steps_per_epoch, total_steps
from tuneforge.train.logging import MetricsLogger, Progress
from tuneforge.train.optim import lr_at, make_optimizer, set_lr


@dataclass
class FitResult:
    steps: int
    train_loss: float | None
    eval: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    interrupted: bool = False
    resumed_from: int = 0  # the step this run started at (0 unless resumed)

    @property
    def steps_this_run(self) -> int:
        return self.steps - self.resumed_from


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


class _StopFlag:
    """SIGINT/SIGTERM finish the current batch of data, then the loop saves and exits cleanly."""

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


def to_device_batch(batch: dict, device) -> dict:
    """Tensors moved to `device`; anything else a collator passes (online RL's prompt examples) as it is."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fit(model, objective, train_data, collate, s, eval_data=None, resume: bool = False,
        extra_checkpoint_writer=None, device: torch.device | None = None,
        group_by_length: bool = False) -> FitResult:
    """Train `model` (a transformers model, a PeftModel, or a TrainModule carrying extra heads) with
    `objective` on `train_data` (examples or packed rows; `collate(list) -> batch dict`). `s` is the config's
    train section. Under torchrun every rank calls this with the same arguments."""
    device = device or next(model.parameters()).device
    autocast = make_autocast(s.autocast, device)
    tm = as_train_module(model)
    module = dist.wrap(tm, device)
    params = [p for p in tm.parameters() if p.requires_grad]
    optimizer = make_optimizer(tm, s.lr, s.weight_decay, s.betas)
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    n, per_batch = len(train_data), objective.updates_per_batch
    total = total_steps(n, s, world)
    total_updates = total * per_batch
    lengths = tuple(example_lengths(train_data)) if group_by_length else None
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total_updates)
    layout = {"examples": n, "total_steps": total, "seed": s.seed, "micro_batch_size": s.micro_batch_size,
              "grad_accum": s.grad_accum, "world_size": world, "updates_per_batch": per_batch}
    step, bad_steps = _restore(tm, optimizer, s.output_dir, layout, objective) if resume else (0, 0)
    logger = MetricsLogger(s.output_dir, s.tensorboard) if main else None
    progress = Progress(total, step, s.progress and main)
    result = FitResult(steps=step, train_loss=None, resumed_from=step)
    to_device = lambda b: to_device_batch(b, device)  # noqa: E731
    seen_tokens, t_start, row = 0, time.perf_counter(), {}
    objective.start(module, resumed=step > 0, step=step)
    with _StopFlag() as stop:
        while step < total:
            micro = step_micro_batches(step, n, s, lengths, world)
            # step_index: each example's place in the step's global batch (all ranks), for methods whose maths
            # must not depend on how the batch is split (online RL seeds each prompt's samples by it)
            batches = [dict(to_device(collate([train_data[i] for i in idx])), is_real=real, step_index=places)
                       for (idx, real), (places, _) in zip(rank_share(micro, rank, world),
                                                           rank_share(step_places(micro), rank, world))]
            tm.train()
            t_batch, pending, update_seconds = time.perf_counter(), [], 0.0
            updates = objective.prepare(module, batches)
            prepare_seconds = time.perf_counter() - t_batch
            try:
                for k, update in enumerate(updates):
                    update_no = step * per_batch + k  # optimizer updates before this one
                    lr = lr_at(update_no, total_updates, s.lr, warmup, s.schedule, s.min_lr_ratio)
                    set_lr(optimizer, lr)
                    t0 = time.perf_counter()
                    row = _apply_update(module, objective, update, params, optimizer, autocast, s.max_grad_norm)
                    seconds = time.perf_counter() - t0
                    update_seconds += seconds
                    row.update(lr=lr, tokens_per_s=row["tokens"] / max(seconds, 1e-9))
                    seen_tokens += row["tokens"]
                    update_no += 1
                    if row["skipped"]:
                        bad_steps += 1
                        pending.append((update_no, {**row, "bad_steps": bad_steps}))
                        _check_bad_step(update_no, row, bad_steps, s, progress)
                    else:
                        result.train_loss = row["loss"]
                        if update_no % s.log_every == 0 or update_no == total_updates:
                            pending.append((update_no, row))
                    result.history.append(row)
            finally:  # rows are logged once the batch is done, the first with where the batch's time went
                _log_batch(logger, pending, time.perf_counter() - t_batch, prepare_seconds, update_seconds)
            step += 1  # a skipped update still consumed its data and its slot of the schedule: resume stays exact
            progress.update(row["raw_loss"], row["lr"], row["tokens_per_s"])
            if eval_data is not None and s.eval_every and step % s.eval_every == 0 and step < total:
                _log_eval(module, objective, eval_data, collate, autocast, device, step, logger, progress, s)
            stopping = not dist.all_agree(not stop.raised)
            if (s.save_every and step % s.save_every == 0) or stopping:
                _save(tm, optimizer, step, s, extra_checkpoint_writer, layout, bad_steps, objective)
            if stopping:
                progress.write(f"stopped by signal at step {step}; checkpoint saved, resume with --resume")
                result.interrupted = True
                break
    result.train_seconds = time.perf_counter() - t_start
    result.tokens_per_second = seen_tokens / max(result.train_seconds, 1e-9)  # all ranks' tokens
    result.steps = step
    progress.close()  # before the final evaluation, so the bar's rate is the training rate
    if eval_data is not None and not result.interrupted:
        result.eval = _log_eval(module, objective, eval_data, collate, autocast, device, step, logger, None, s)
    if logger is not None:
        logger.close()
    return result


@dataclass
class UpdateTotals:
    """One update's sums over its micro-batches and all ranks (gradients hold the gradient of loss_sum)."""
    loss_sum: float
    count: float
    tokens: int
    metrics: dict  # name -> (sum, count)


def accumulate_update(module, objective, micro_batches: list[dict], autocast) -> UpdateTotals:
    """Forward and backward over the micro-batches of one update, gradients of loss SUMS accumulated in
    `.grad`; DDP synchronises only on the last micro-batch. Counts and sums are added over ranks."""
    objective.begin_update(module, micro_batches, autocast)
    loss_sum, count, tokens, metrics = 0.0, 0.0, 0, {}
    for i, batch in enumerate(micro_batches):
        real = batch.get("is_real", True)
        with dist.sync_context(module, sync=i == len(micro_batches) - 1):
            with autocast():
                out = objective.loss(module, batch)
            (out.loss_sum if real else out.loss_sum * 0.0).backward()
        weight = 1.0 if real else 0.0  # a rank's padding micro-batch: run for DDP's sake, counted as nothing
        loss_sum += out.reported() * weight
        count += out.count * weight
        tokens += real_tokens(batch) if real else 0
        for key, (s, c) in out.metrics.items():
            acc = metrics.setdefault(key, [0.0, 0.0])
            acc[0] += float(s) * weight
            acc[1] += float(c) * weight
    keys = sorted(metrics)  # every micro-batch of a method reports the same names, so ranks agree
    flat = dist.all_sum([loss_sum, count, tokens] + [v for key in keys for v in metrics[key]])
    return UpdateTotals(flat[0], flat[1], int(flat[2]),
                        {key: (flat[3 + 2 * j], flat[4 + 2 * j]) for j, key in enumerate(keys)})


def _apply_update(module, objective, micro_batches, params, optimizer, autocast, max_grad_norm) -> dict:
    """One update: accumulate, divide by the global count once, clip, step.

    When the loss or the gradient norm is NaN or infinite (on any rank) the update is not applied (weights
    and optimizer moments stay as they were), so a checkpoint saved later never holds NaN.
    """
    totals = accumulate_update(module, objective, micro_batches, autocast)
    count = max(totals.count, 1.0)
    loss = totals.loss_sum / count
    # DDP averaged the gradients over ranks; the sum over ranks divided by the global count is what we want
    _scale_grads(params, dist.world_size() / count)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")).item()
    finite = dist.all_agree(math.isfinite(loss) and math.isfinite(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    row = {"loss": loss if finite else None, "grad_norm": grad_norm if finite else None, "count": totals.count,
           "tokens": totals.tokens, "skipped": int(not finite), "raw_loss": loss, "raw_grad_norm": grad_norm}
    for key, (s, c) in totals.metrics.items():
        row[key] = s / c if c else None
    return row


def _scale_grads(params, factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def _log(logger, step: int, row: dict) -> None:
    if logger is not None:
        logger.log(step, "train", {k: v for k, v in row.items() if not k.startswith("raw_")})


def _log_batch(logger, pending: list, batch_seconds: float, prepare_seconds: float, update_seconds: float) -> None:
    """Log one batch of data's rows; the first also gets the batch's wall time and the shares of it spent in
    the method's `prepare` (online RL: rollouts, rewards, reference numbers), in generation alone (methods
    that report `gen_seconds`) and in the optimizer updates (forward, backward, step)."""
    if pending:
        first = pending[0][1]
        total = max(batch_seconds, 1e-9)
        first.update({"time/batch_seconds": batch_seconds, "time/prepare_share": prepare_seconds / total,
                      "time/update_share": update_seconds / total})
        if first.get("gen_seconds") is not None:
            first["time/generation_share"] = first["gen_seconds"] / total
    for update_no, row in pending:
        _log(logger, update_no, row)


def _check_bad_step(step: int, row: dict, bad_steps: int, s, progress) -> None:
    """Warn about a skipped step; past `max_bad_steps` stop without saving, keeping the last good checkpoint."""
    what = f"loss {row['raw_loss']}, gradient norm {row['raw_grad_norm']}"
    if bad_steps > s.max_bad_steps:
        last = ckpt.latest_checkpoint(s.output_dir)
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was saved yet"
        raise TuneforgeError(
            f"step {step}: {what}; {bad_steps} steps had a non-finite loss or gradients, more than "
            f"train.max_bad_steps={s.max_bad_steps}. Stopped without saving; {kept}. Try a lower train.lr, "
            "train.max_grad_norm, float32 instead of fp16 autocast, or check the data of these steps")
    progress.write(f"warning: step {step}: {what}; update skipped ({bad_steps} of at most {s.max_bad_steps})")


def evaluate(module, objective, data, collate, batch_size: int, autocast, device) -> dict:
    """Held-out metrics of `objective` on `data`, each rank scoring its share, sums added over ranks.

    The one held-out evaluation: the loop's periodic and final evaluations and `tuneforge eval` all use it.
    "loss" is per the method's unit; token-level methods also get "perplexity" (exp of the mean token loss).
    """
    tm = train_module(module)  # no DDP forward: ranks may score different numbers of batches
    was_training = tm.training
    tm.eval()
    world, rank = dist.world_size(), dist.rank()
    starts = range(rank * batch_size, len(data), batch_size * world)
    batches = (to_device_batch(collate(data[i:i + batch_size]), device) for i in starts)
    local = objective.evaluate(tm, batches, autocast)
    keys = dist.union_keys(sorted(local))
    flat = dist.all_sum([v for key in keys for v in local.get(key, (0.0, 0.0))])
    metrics = {key: flat[2 * j] / flat[2 * j + 1] if flat[2 * j + 1] else None for j, key in enumerate(keys)}
    metrics["count"] = flat[2 * keys.index(objective.eval_key) + 1]
    if objective.unit == "tokens" and metrics.get("loss") is not None:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    tm.train(was_training)
    return metrics


def _log_eval(module, objective, eval_data, collate, autocast, device, step, logger, progress, s) -> dict:
    metrics = evaluate(module, objective, eval_data, collate, s.micro_batch_size, autocast, device)
    if logger is not None:
        logger.log(step, "eval", metrics)
    if dist.is_main():
        text = f"step {step}: eval " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if v is not None)
        progress.write(text) if progress is not None else print(text, flush=True)
    return metrics


def _save(tm, optimizer, step: int, s, extra_writer, layout: dict, bad_steps: int, objective) -> None:
    """Rank 0 writes the checkpoint (replicated state under DDP); the others wait until it is complete."""
    if dist.is_main():
        epoch, batch = divmod(step, steps_per_epoch(layout["examples"], s, layout["world_size"]))
        # The step alone fixes data position and schedule; the rest is written for people and for checks.
        state = {**layout, "epoch": epoch, "batch_in_epoch": batch, "bad_steps": bad_steps,
                 "objective": objective.state_dict()}
        ckpt.save_checkpoint(s.output_dir, step, ckpt.trainable_state_dict(tm), optimizer, state,
                             keep_last=s.keep_last, extra_writer=extra_writer)
    dist.barrier()


def _restore(tm, optimizer, run_dir, layout: dict, objective) -> tuple[int, int]:
    """(step, bad steps so far) from the newest readable checkpoint; (0, 0) when there is none."""
    found = ckpt.load_latest(run_dir, warn=lambda message: print(f"warning: {message}", flush=True))
    if found is None:
        return 0, 0
    path, (weights, opt_tensors, rng_tensors, state) = found
    changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k, v) != v}
    if changed:  # a different data set, batch shape, schedule or seed would silently replay or skip data
        raise TuneforgeError(f"{path}: cannot resume exactly, the run changed since the checkpoint: "
                             + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                             + "; resume with the settings of the checkpoint, or start a new train.output_dir")
    ckpt.load_trainable_state_dict(tm, weights, where=str(path))
    ckpt.optimizer_from_flat(optimizer, opt_tensors, state["optimizer"])
    ckpt.set_rng_state(rng_tensors, state["rng"])
    objective.load_state_dict(state.get("objective") or {})
    return int(state["step"]), int(state.get("bad_steps", 0))
