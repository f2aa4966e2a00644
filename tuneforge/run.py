"""A training run from a config: load, prepare data, (LoRA), score the base, fit, save, score the result.

The same short conductor for every method: what differs between methods is their entry in methods.py (data
builder, objective, evaluation, saved result); the maths is in objectives/, the loop in train/loop.py.
Under torchrun every rank runs this; rank 0 alone writes the run folder and prints.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.packing import PackedExamples, collate_packed, example_lengths
from tuneforge.errors import ConfigError, TuneforgeError
from tuneforge.eval.forgetting import forgetting_row, general_blocks, general_perplexity, measures_forgetting
from tuneforge.fsutil import atomic_write_text
from tuneforge.methods import method_of
from tuneforge.models.attention import is_varlen
from tuneforge.models.heads import TrainModule, unwrap
from tuneforge.train import distributed as dist
from tuneforge.train.loop import evaluate as held_out_metrics
from tuneforge.train.loop import fit, make_autocast, resolve_autocast

DIFF_FILE = "eval_diff.jsonl"  # a run's per-example answer diff, base against tuned (tuneforge.eval.task.answer_diff)


def setup_runtime(cfg: RunConfig) -> torch.device:
    device = dist.init_from_env()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return device


def say(text: str) -> None:
    """A line for the user, from rank 0 only."""
    if dist.is_main():
        print(text, flush=True)


def load_model_and_tokenizer(cfg: RunConfig, device: torch.device | None = None):
    """The config's model as its method trains it (a causal LM; an embedder's bare body) and its tokenizer."""
    if method_of(cfg).load is not None:
        model, tokenizer = method_of(cfg).load(cfg, device)
    else:
        from tuneforge.models.load import load_causal_lm
        model, tokenizer = load_causal_lm(cfg.model.name, dtype=cfg.model.dtype,
                                          trust_remote_code=cfg.model.trust_remote_code,
                                          attn_implementation=cfg.model.attn_implementation)
        if cfg.model.attn_implementation is None:
            from tuneforge.models.attention import register, supports_varlen
            if supports_varlen(model.config):
                model.set_attn_implementation(register())
        if device is not None:
            model.to(device)
    if cfg.data.chat_template:
        tokenizer.chat_template = cfg.data.chat_template
    return model, tokenizer


def load_tokenizer_of(cfg: RunConfig):
    """The config's tokenizer alone (with data.chat_template applied), as load_model_and_tokenizer gives it."""
    from tuneforge.models.load import load_tokenizer
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:
        tokenizer.chat_template = cfg.data.chat_template
    return tokenizer


def make_objective(cfg: RunConfig, tokenizer=None):
    return method_of(cfg).objective(cfg, tokenizer)


def apply_speed_switches(cfg: RunConfig, model) -> None:
    """Fused LoRA dropout, sparse dropout, activation checkpointing and torch.compile (on the transformers model,
    under any PEFT wrapper)."""
    base = unwrap(model)
    if cfg.lora.enabled and cfg.lora.fused_dropout:
        from tuneforge.adapters.fused_dropout import fuse_lora_dropout
        fuse_lora_dropout(model)
    if cfg.train.sparse_dropout and not cfg.train.compile:  # compiled kernels draw their own dropout masks
        sparse_model_dropout(base)
    if cfg.train.activation_checkpointing:
        # non-reentrant checkpointing needs no input that requires grad, so it works with a frozen LoRA base
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile:
        base.get_decoder().compile()


def sparse_model_dropout(base) -> None:
    """Sparse dropout (models/dropout.py) for the transformers model `base`: its `nn.Dropout` modules, and under
    SDPA attention with attention dropout, "tuneforge_sdpa" (models/attention.py), the same SDPA path except
    the CPU's dropped-out attention probabilities."""
    from tuneforge.models.attention import attention_dropout, register_sdpa
    from tuneforge.models.dropout import sparse_dropouts
    sparse_dropouts(base)
    config = getattr(base, "config", None)
    if (config is not None and getattr(config, "_attn_implementation", None) == "sdpa"
            and attention_dropout(config) > 0 and hasattr(base, "set_attn_implementation")):
        base.set_attn_implementation(register_sdpa())


def packing_on(cfg: RunConfig, model) -> bool:
    """data.packing, with auto resolved: on where the attention isolates packed examples by itself."""
    if cfg.data.packing != "auto":
        return bool(cfg.data.packing)
    return is_varlen(unwrap(model))


def prompt_shared(model, packed: bool) -> bool:
    """Whether packed rows hold a preference pair's prompt once: only under tuneforge_varlen attention, the one
    that lets the rejected answer see the prompt (data/packing.py); any other keeps whole sequences."""
    return packed and is_varlen(unwrap(model))


def batching(cfg: RunConfig, data, tokenizer, packed: bool, share_prompt: bool = False):
    """(train rows, eval rows, collate, train settings): examples as they are, or packed into rows of the
    micro-batch token budget, one row per micro-batch (the step's tokens unchanged, memory fixed), a pair's
    prompt once under `share_prompt` (`prompt_shared`): the budget counts what the collator lays out."""
    if method_of(cfg).batching is not None:
        return method_of(cfg).batching(cfg, data, tokenizer)
    pad = tokenizer.pad_token_id
    if not packed:
        return data.train, data.eval, lambda b: collate(b, pad), cfg.train
    t, d = cfg.train, cfg.data
    # a row must fit the longest example (a preference example holds two sequences of up to max_length)
    longest = max(example_lengths(data.train, share_prompt), default=d.max_length)
    budget = max(t.micro_batch_tokens or d.max_length, d.max_length, longest)
    rows_per_step = max(1, math.ceil(t.micro_batch_size * t.grad_accum * d.max_length / budget))
    settings = t.model_copy(update={"micro_batch_size": 1, "grad_accum": rows_per_step})
    pack = lambda ex: PackedExamples(ex, budget, share_prompt) if ex is not None else None  # noqa: E731
    # compiled models get one row width for every batch: a new shape would mean a new compile
    width = budget if t.compile else None
    collate_fn = lambda rows: collate_packed(rows, pad, width, share_prompt)  # noqa: E731
    return pack(data.train), pack(data.eval), collate_fn, settings


def _task_eval(cfg, model, tokenizer, records, label: str):
    from tuneforge.eval.task import task_accuracy
    import time
    e, t0 = cfg.eval, time.perf_counter()
    with make_autocast(cfg.train.autocast, next(model.parameters()).device)():  # as training computes
        res = task_accuracy(model, tokenizer, records, e.max_new_tokens, e.batch_size, cfg.data.system_prompt,
                            e.limit, e.metrics)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    shown = ", ".join(f"{name} {value:.1%}" for name, value in res["metrics"].items())
    print(f"[{label}] held-out task accuracy: {shown} (n={res['n']}, {res['seconds']} s)", flush=True)
    return res


def compare_answers(base: dict, tuned: dict, diff_path: Path | None = None, rows: bool = False) -> dict:
    """The tuned model's answers against the base model's on the same prompts: win rate and counts of
    improved / regressed / unchanged answers; with `diff_path`, the per-example diff as JSON lines there, with
    `rows` also under "rows"."""
    from tuneforge.eval.task import answer_diff, diff_summary, win_rate
    diff = answer_diff(base, tuned)
    out = {**win_rate(base, tuned), **diff_summary(diff)}
    if diff_path is not None:
        atomic_write_text(diff_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in diff))
        out["diff_file"] = str(diff_path)
    if rows:
        out["rows"] = diff
    return out


def _task_eval_main(cfg, model, tokenizer, records, label: str):
    """Generation-based evaluation on rank 0 (the others wait): a few hundred prompts need no sharding."""
    res = _task_eval(cfg, model, tokenizer, records, label) if dist.is_main() else None
    dist.barrier()
    return res


def save_final(cfg: RunConfig, module: TrainModule, tokenizer, results: dict | None = None) -> Path:
    """output_dir/final: what the method saves (an adapter, a model folder, ...), plus the tokenizer and the
    model card (README.md, from the run's results so far)."""
    from tuneforge.card import write_model_card
    from tuneforge.fsutil import atomic_dir
    from tuneforge.train.checkpoint import WRITE_ERRORS
    out = Path(cfg.train.output_dir) / "final"
    try:
        with atomic_dir(out) as tmp:
            tokenizer.save_pretrained(tmp)  # first: a method's save may replace it (a reward model's pad token)
            method_of(cfg).save(cfg, module, tokenizer, tmp)
            write_model_card(tmp, cfg, results or {})  # in place of PEFT's blank template
    except WRITE_ERRORS as exc:  # a full disk: say so, and that the checkpoints still hold the run
        raise TuneforgeError(f"could not write {out}: {exc}; checkpoints in {out.parent / 'checkpoints'} are "
                             "intact, free space and run again with --resume") from exc
    return out


def prepare(cfg: RunConfig, tokenizer, **kwargs):
    """The run's data through its method's builder; rank 0 builds the token cache, the others then read it."""
    with dist.main_first():
        method = method_of(cfg)
        options = method.builder_options(cfg) if method.builder_options else None
        return prepare_data(cfg, tokenizer, method.builder, options=options, **kwargs)


def frozen_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """lora.frozen_dtype resolved: the autocast dtype the frozen base's linear weights are stored in, or None to
    keep them as loaded (no autocast, DoRA, a method that merges the base into its result, or `model`)."""
    mode = resolve_autocast(cfg.train.autocast, device)
    if (not cfg.lora.enabled or cfg.lora.frozen_dtype == "model" or mode == "none" or cfg.lora.use_dora
            or method_of(cfg).merges_base):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def _build_module(cfg: RunConfig, model) -> TrainModule:
    if cfg.lora.enabled:
        from tuneforge.adapters.lora import apply_lora
        torch.manual_seed(cfg.train.seed)  # LoRA A init: same seed, same adapter start, with or without eval
        lo = cfg.lora
        model = apply_lora(model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.target_modules,
                           use_dora=lo.use_dora, use_rslora=lo.use_rslora,
                           task_type=method_of(cfg).lora_task_type)
        frozen = frozen_dtype(cfg, next(model.parameters()).device)
        if frozen is not None:
            from tuneforge.adapters.lora import frozen_linears_to
            frozen_linears_to(model, frozen)
    apply_speed_switches(cfg, model)
    heads = method_of(cfg).heads
    return TrainModule(model, heads(cfg, model) if heads else None)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, command: str | None = None) -> dict:
    """`command`: the command line that started the run, recorded in results.json and the model card."""
    from tuneforge.preflight import check_output_dir, record_run_config
    from tuneforge.train.checkpoint import latest_checkpoint
    out_dir = Path(cfg.train.output_dir)
    if dist.is_main():
        check_output_dir(out_dir, resume, overwrite)  # a finished run is never overwritten without a choice
    device = setup_runtime(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    data = prepare(cfg, tokenizer)
    say("data: " + json.dumps(data.stats))
    gen_records = method_of(cfg).generation_records(cfg, data)
    results: dict = {"data": data.stats, **({"command": command} if command else {}),
                     "environment": environment(device)}
    if gen_records and cfg.eval.before and not resume:
        results["base"] = _task_eval_main(cfg, model, tokenizer, gen_records, "base")
    module = _build_module(cfg, model)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    packed = packing_on(cfg, module)
    say(f"model: {cfg.model.name}, trainable {trainable:,} of {total:,} parameters")
    say(f"compute: {device.type} x {dist.world_size()}, autocast {resolve_autocast(cfg.train.autocast, device)}, "
        f"attention {getattr(module.base.config, '_attn_implementation', None)}, packing {'on' if packed else 'off'}")
    autocast = make_autocast(cfg.train.autocast, device)
    if method_of(cfg).before_fit is not None:
        data = method_of(cfg).before_fit(cfg, module, data, tokenizer, device, autocast, resume)
    train_rows, eval_rows, collate_fn, settings = batching(cfg, data, tokenizer, packed,
                                                           prompt_shared(module, packed))
    objective = make_objective(cfg, tokenizer)
    held_out = eval_rows if cfg.eval.loss else None
    if held_out is not None and not resume:  # every run shows whether it got better: held-out loss before
        results["eval_before"] = held_out_metrics(module, objective, held_out, collate_fn,
                                                  settings.micro_batch_size, autocast, device)
        say("before training: eval " + _format(results["eval_before"]))
    general = general_before = None
    if measures_forgetting(cfg):  # and what it cost elsewhere: general-text perplexity before and after
        general = general_blocks(cfg, tokenizer)
        if not resume:
            general_before = general_perplexity(module, tokenizer, general, cfg.eval.batch_size, autocast, device)
            say(f"before training: general-text perplexity {general_before['perplexity']:.4g} "
                f"({general_before['tokens']} tokens)")
    base_name = adapter_base_name(cfg)
    writer = (lambda d: _save_adapter_into(module.model, d, base_name)) if cfg.lora.enabled else None
    # config.yaml once start-up passed; a resumed run's once fit's resume checks accepted the checkpoint
    resuming = resume and latest_checkpoint(out_dir) is not None
    if not resuming and dist.is_main():
        record_run_config(cfg, overwrite)
    fitted = fit(module, objective, train_rows, collate_fn, settings, eval_data=held_out, resume=resume,
                 extra_checkpoint_writer=writer, device=device,
                 group_by_length=cfg.data.group_by_length and not packed)
    if resuming and dist.is_main():
        record_run_config(cfg)
    results["train"] = {"steps": fitted.steps, "steps_this_run": fitted.steps_this_run,
                        "resumed_from": fitted.resumed_from, "final_loss": fitted.train_loss, "eval": fitted.eval,
                        "tokens_per_second": round(fitted.tokens_per_second, 1),
                        "train_seconds": round(fitted.train_seconds, 1), "interrupted": fitted.interrupted}
    if fitted.interrupted:
        if dist.is_main():
            _write_report(out_dir, results)
        return results
    if general is not None:
        after = general_perplexity(module, tokenizer, general, cfg.eval.batch_size, autocast, device)
        results["forgetting"] = forgetting_row(general_before, after, _general_name(cfg))
        say(forgetting_text(results["forgetting"]))
    if dist.is_main():
        results["final_dir"] = str(save_final(cfg, module, tokenizer, results))
    dist.barrier()
    if gen_records:
        results["tuned"] = _task_eval_main(cfg, module.model, tokenizer, gen_records, "tuned")
        if dist.is_main() and results.get("base"):
            results["tuned"]["over_base"] = compare_answers(results["base"], results["tuned"],
                                                            out_dir / DIFF_FILE)
        if dist.is_main():
            from tuneforge.card import write_model_card
            write_model_card(results["final_dir"], cfg, results)  # now with the tuned model's numbers
    if dist.is_main():
        _write_json(out_dir / "results.json", results)
        _write_report(out_dir, None)
    return results


def _write_report(out_dir: Path, partial: dict | None) -> None:
    """out_dir/report.html from what the run folder holds (`partial`: results of an interrupted run, which
    writes no results.json). A report that cannot be written never fails the run it describes."""
    from tuneforge.report import REPORT, load_run, render
    try:
        run = load_run(out_dir)
        if partial is not None and not run["results"]:
            run["results"] = json.loads(json.dumps(partial, default=str))
        atomic_write_text(out_dir / REPORT, render([run]))
    except (OSError, TuneforgeError, ValueError) as exc:
        say(f"warning: report.html not written: {exc}")


def environment(device) -> dict:
    """Where the run ran: versions, device, CPU, threads, processes (results.json and the report)."""
    import platform

    import peft
    import transformers

    from tuneforge import __version__
    env = {"tuneforge": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "platform": platform.platform(),
           "device": str(device), "processes": dist.world_size(), "torch_threads": torch.get_num_threads()}
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    cpu = _cpu_name()
    if cpu:
        env["cpu"] = cpu
    return env


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or None


def _general_name(cfg: RunConfig) -> str:
    return cfg.eval.general_text or "tuneforge's general text"


def forgetting_text(row: dict) -> str:
    if "before" not in row:
        return f"general-text perplexity after training {row['after']:.4g} (before: not measured, resumed run)"
    return (f"general-text perplexity (forgetting): {row['before']:.4g} -> {row['after']:.4g} "
            f"({100 * row['change']:+.1f}%, {row['tokens']} tokens of {row['general_text']})")


def _format(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


def _save_adapter_into(model, folder: Path, base_model: str | None = None) -> None:
    from tuneforge.adapters.lora import save_adapter
    save_adapter(model, Path(folder) / "adapter", base_model=base_model)


def adapter_base_name(cfg: RunConfig) -> str | None:
    """The embedded short name to record as an adapter's base (not this machine's cache path); else None, and
    PEFT records the path or hub id the model was loaded from."""
    from tuneforge.models.embedded import canonical_name
    return canonical_name(cfg.model.name)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def tuned_weights(run_dir: str | Path) -> tuple[str, Path]:
    """What a run folder's final/ holds: ("adapter", final) for a LoRA adapter in PEFT format, ("model", final)
    for a model folder (full fine-tuning, a merged embedder); a TuneforgeError when the run has no final/."""
    final = Path(run_dir) / "final"
    if (final / "adapter_config.json").is_file():
        return "adapter", final
    if (final / "config.json").is_file():
        return "model", final
    raise TuneforgeError(f"{run_dir}: no trained model in {final} (no adapter_config.json, no config.json): the "
                         "run has not finished; resume it with `tuneforge train CONFIG --resume`")


def compare_metrics(base: dict, tuned: dict) -> dict:
    """{metric: {"base", "tuned", "change"}} for the numbers both held-out evaluations have."""
    out = {}
    for key, value in tuned.items():
        other = base.get(key)
        if isinstance(value, (int, float)) and isinstance(other, (int, float)) and key != "count":
            out[key] = {"base": other, "tuned": value, "change": value - other}
    return out


def evaluate_against_base(cfg: RunConfig, adapter: str | None = None, model_dir: str | None = None,
                          diff_path: Path | None = None) -> dict:
    """The config's model (the base) and the tuned one (`adapter` on the base, or the model folder
    `model_dir`) on the same held-out data: each one's `evaluate`, the metrics side by side, and answer by
    answer what tuning changed (improved / regressed / unchanged; the rows to `diff_path` as JSON lines)."""
    if (adapter is None) == (model_dir is None):
        raise ValueError("give the tuned model as an adapter or as a model folder, one of the two")
    base = evaluate(cfg)
    tuned_cfg = cfg
    if model_dir is not None:
        tuned_cfg = cfg.model_copy(deep=True)
        tuned_cfg.model.name = str(model_dir)
    tuned = evaluate(tuned_cfg, adapter=adapter)
    out = {"base": base, "tuned": tuned, "comparison": {}}
    if "loss" in base and "loss" in tuned:
        out["comparison"]["loss"] = compare_metrics(base["loss"], tuned["loss"])
    if "general" in base and "general" in tuned:
        out["comparison"]["forgetting"] = forgetting_row(base["general"], tuned["general"], _general_name(cfg))
    if base.get("task") and tuned.get("task"):
        out["comparison"]["task"] = {"metrics": compare_metrics(base["task"]["metrics"], tuned["task"]["metrics"]),
                                     **compare_answers(base["task"], tuned["task"], diff_path, rows=True)}
    return out


def evaluate(cfg: RunConfig, adapter: str | None = None, model_dir: str | None = None) -> dict:
    """Held-out loss (and task accuracy when eval.generate) of the config's model, optionally with an adapter;
    for a method whose result is its own model (a reward model), of the saved result `model_dir`.

    Held-out means data.eval or the data.eval_fraction split: without one there is nothing held out, and
    scoring the training data instead would look like a held-out result, so it is refused."""
    d = cfg.data
    if (not cfg.eval.loss and not method_of(cfg).scores_generation(cfg) and not measures_forgetting(cfg)
            and model_dir is None):
        raise ConfigError("nothing to evaluate: eval.loss and eval.forgetting are false and there is no task "
                          "evaluation (eval.generate, for instruction and preference data); set eval.loss=true",
                          key="eval.loss")
    if not d.eval and not d.eval_fraction:
        raise ConfigError("no held-out data: set data.eval (a file) or data.eval_fraction (a share of "
                          "data.train); tuneforge eval does not score training data as if it were held out",
                          key="data.eval")
    method = method_of(cfg)
    if method.evaluate_saved is not None or model_dir is not None:
        if method.evaluate_saved is None:
            raise ConfigError(f"--model is for methods whose result is a model of its own (reward); for method "
                              f"{cfg.method} set model.name (and --adapter for a LoRA run)", key="method")
        if model_dir is None:
            raise ConfigError(f"method {cfg.method}: the config's model has no trained {cfg.method} head; pass the "
                              "trained model with --model RUN_DIR/final", key="method")
        setup_runtime(cfg)
        data = prepare(cfg, load_tokenizer_of(cfg))  # the held-out pairs as training built them
        if data.eval is None:
            raise ConfigError("the held-out split is empty (every record went to training)", key="data.eval")
        return {"loss": method.evaluate_saved(cfg, data, model_dir)}
    device = setup_runtime(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    if adapter:
        from tuneforge.adapters.lora import load_adapter
        model = load_adapter(model, adapter)
    data = prepare(cfg, tokenizer)
    out: dict = {}
    module = TrainModule(model)
    if cfg.eval.loss:
        if data.eval is None:
            raise ConfigError("the held-out split is empty (every record went to training)", key="data.eval")
        packed = packing_on(cfg, module)
        _, eval_rows, collate_fn, settings = batching(cfg, data, tokenizer, packed, prompt_shared(module, packed))
        out["loss"] = held_out_metrics(module, make_objective(cfg, tokenizer), eval_rows, collate_fn,
                                       settings.micro_batch_size, make_autocast(cfg.train.autocast, device),
                                       device)
    if measures_forgetting(cfg):
        out["general"] = general_perplexity(module, tokenizer, general_blocks(cfg, tokenizer), cfg.eval.batch_size,
                                            make_autocast(cfg.train.autocast, device), device)
    if gen := method_of(cfg).generation_records(cfg, data):
        out["task"] = _task_eval_main(cfg, model, tokenizer, gen, "model")
    return out
