"""A training run from a config: load, prepare data, (LoRA), score the base, fit, save, score the result.

This is the glue between the parts; the maths is in objectives/, the loop in train/loop.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tuneforge.config.schema import RunConfig
from tuneforge.data.collate import collate
from tuneforge.data.dataset import prepare_data
from tuneforge.data.packing import PackedExamples, collate_packed
from tuneforge.data.records import as_chat
from tuneforge.errors import TuneforgeError
from tuneforge.fsutil import atomic_write_text
from tuneforge.objectives import make_objective
from tuneforge.train.loop import LoopSettings, fit


def setup_runtime(cfg: RunConfig) -> torch.device:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_and_tokenizer(cfg: RunConfig, device: torch.device | None = None):
    from tuneforge.models.load import load_causal_lm
    model, tokenizer = load_causal_lm(cfg.model.name, dtype=cfg.model.dtype,
                                      trust_remote_code=cfg.model.trust_remote_code,
                                      attn_implementation=cfg.model.attn_implementation)
    if cfg.data.chat_template:
        tokenizer.chat_template = cfg.data.chat_template
    if cfg.model.attn_implementation is None:
        from tuneforge.models.attention import register, supports_varlen
        if supports_varlen(model.config):
            model.set_attn_implementation(register())
    if device is not None:
        model.to(device)
    return model, tokenizer


def apply_speed_switches(cfg: RunConfig, model) -> None:
    """Fused LoRA dropout, activation checkpointing and torch.compile (on the transformers model, under any
    PEFT wrapper)."""
    from tuneforge.objectives.functional import unwrap
    base = unwrap(model)
    if cfg.lora.enabled and cfg.lora.fused_dropout:
        from tuneforge.adapters.fused_dropout import fuse_lora_dropout
        fuse_lora_dropout(model)
    if cfg.train.activation_checkpointing:
        # non-reentrant checkpointing needs no input that requires grad, so it works with a frozen LoRA base
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.compile:
        base.get_decoder().compile()


def batching(cfg: RunConfig, data, tokenizer):
    """(train rows, eval rows, collate): examples as they are, or packed into rows of data.max_length."""
    pad = tokenizer.pad_token_id
    if not cfg.data.packing:
        return data.train, data.eval, lambda b: collate(b, pad)
    pack = lambda ex: PackedExamples(ex, cfg.data.max_length) if ex is not None else None  # noqa: E731
    # compiled models get one row width (max_length) for every batch: a new shape would mean a new compile
    width = cfg.data.max_length if cfg.train.compile else None
    return pack(data.train), pack(data.eval), lambda rows: collate_packed(rows, pad, width)


def loop_settings(cfg: RunConfig) -> LoopSettings:
    t = cfg.train
    fields = LoopSettings.__dataclass_fields__
    settings = LoopSettings(**{k: v for k, v in t.model_dump().items() if k in fields})
    settings.group_by_length = cfg.data.group_by_length and not cfg.data.packing
    return settings


def _generation_records(cfg: RunConfig, data) -> list:
    """Held-out conversations to score by generation (instruction/chat data with eval.generate on)."""
    if not cfg.eval.generate or cfg.method != "sft":
        return []
    return [as_chat(r) for r in data.eval_records]


def _task_eval(cfg, model, tokenizer, records, label: str):
    from tuneforge.eval.task import task_accuracy
    e = cfg.eval
    res = task_accuracy(model, tokenizer, records, e.max_new_tokens, e.batch_size, cfg.data.system_prompt, e.limit)
    print(f"[{label}] held-out task accuracy: exact {res['exact']:.1%}, lenient {res['lenient']:.1%} "
          f"(n={res['n']})", flush=True)
    return res


def save_final(cfg: RunConfig, model, tokenizer, results: dict | None = None) -> Path:
    """output_dir/final: the adapter (PEFT format) for LoRA, a full model folder otherwise; plus tokenizer and
    the model card (README.md, from the run's results so far)."""
    from tuneforge.card import write_model_card
    from tuneforge.fsutil import atomic_dir
    from tuneforge.train.checkpoint import WRITE_ERRORS
    out = Path(cfg.train.output_dir) / "final"
    try:
        with atomic_dir(out) as tmp:
            if cfg.lora.enabled:
                from tuneforge.adapters.lora import save_adapter
                save_adapter(model, tmp, base_model=_adapter_base_name(cfg))
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_model_card(tmp, cfg, results or {})  # in place of PEFT's blank template
    except WRITE_ERRORS as exc:  # a full disk: say so, and that the checkpoints still hold the run
        raise TuneforgeError(f"could not write {out}: {exc}; checkpoints in {out.parent / 'checkpoints'} are "
                             "intact, free space and run again with --resume") from exc
    return out


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, command: str | None = None) -> dict:
    """`command`: the command line that started the run, recorded in results.json and the model card."""
    from tuneforge.preflight import check_output_dir, record_run_config
    from tuneforge.train.checkpoint import latest_checkpoint
    out_dir = Path(cfg.train.output_dir)
    check_output_dir(out_dir, resume, overwrite)  # a finished run is never overwritten without a choice
    device = setup_runtime(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    data = prepare_data(cfg, tokenizer)
    print("data: " + json.dumps(data.stats), flush=True)
    gen_records = _generation_records(cfg, data)
    results: dict = {"data": data.stats, **({"command": command} if command else {})}
    if gen_records and cfg.eval.before and not resume:
        results["base"] = _task_eval(cfg, model, tokenizer, gen_records, "base")
    if cfg.lora.enabled:
        from tuneforge.adapters.lora import apply_lora
        torch.manual_seed(cfg.train.seed)  # LoRA A init: same seed, same adapter start, with or without eval
        l = cfg.lora
        model = apply_lora(model, r=l.r, alpha=l.alpha, dropout=l.dropout, target_modules=l.target_modules,
                           use_dora=l.use_dora, use_rslora=l.use_rslora)
    apply_speed_switches(cfg, model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"model: {cfg.model.name}, trainable {trainable:,} of {total:,} parameters", flush=True)
    from tuneforge.objectives.functional import unwrap
    from tuneforge.train.loop import resolve_autocast
    print(f"compute: {device.type}, autocast {resolve_autocast(cfg.train.autocast, device)}, attention "
          f"{getattr(unwrap(model).config, '_attn_implementation', None)}", flush=True)
    writer = (lambda d: _save_adapter_into(model, d, _adapter_base_name(cfg))) if cfg.lora.enabled else None
    train_rows, eval_rows, collate_fn = batching(cfg, data, tokenizer)
    # config.yaml once start-up passed; a resumed run's once fit's resume checks accepted the checkpoint
    resuming = resume and latest_checkpoint(out_dir) is not None
    if not resuming:
        record_run_config(cfg, overwrite)
    fitted = fit(model, make_objective(cfg.method), train_rows, collate_fn, loop_settings(cfg),
                 eval_data=eval_rows if cfg.eval.loss else None, resume=resume,
                 extra_checkpoint_writer=writer, device=device)
    if resuming:
        record_run_config(cfg)
    results["train"] = {"steps": fitted.steps, "final_loss": fitted.train_loss, "eval": fitted.eval,
                        "tokens_per_second": round(fitted.tokens_per_second, 1),
                        "train_seconds": round(fitted.train_seconds, 1), "interrupted": fitted.interrupted}
    if fitted.interrupted:
        return results
    results["final_dir"] = str(save_final(cfg, model, tokenizer, results))
    if gen_records:
        results["tuned"] = _task_eval(cfg, model, tokenizer, gen_records, "tuned")
        from tuneforge.card import write_model_card
        write_model_card(results["final_dir"], cfg, results)  # now with the tuned model's numbers
    _write_json(out_dir / "results.json", results)
    return results


def _save_adapter_into(model, folder: Path, base_model: str | None = None) -> None:
    from tuneforge.adapters.lora import save_adapter
    save_adapter(model, Path(folder) / "adapter", base_model=base_model)


def _adapter_base_name(cfg: RunConfig) -> str | None:
    """The embedded short name to record as an adapter's base (not this machine's cache path); else None, and
    PEFT records the path or hub id the model was loaded from."""
    from tuneforge.models.embedded import canonical_name
    return canonical_name(cfg.model.name)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def evaluate(cfg: RunConfig, adapter: str | None = None) -> dict:
    """Held-out loss (and task accuracy when eval.generate) of the config's model, optionally with an adapter."""
    device = setup_runtime(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    if adapter:
        from tuneforge.adapters.lora import load_adapter
        model = load_adapter(model, adapter)
    data = prepare_data(cfg, tokenizer)
    out: dict = {}
    held_out = data.eval if data.eval is not None else data.train
    if cfg.eval.loss:
        from tuneforge.train.loop import make_autocast
        import math
        objective = make_objective(cfg.method)
        size = cfg.train.micro_batch_size
        batches = ({k: v.to(device) for k, v in collate(held_out[i:i + size], tokenizer.pad_token_id).items()}
                   for i in range(0, len(held_out), size))
        model.eval()
        out["loss"] = objective.evaluate(model, batches, make_autocast(cfg.train.autocast, device))
        out["loss"]["perplexity"] = math.exp(min(out["loss"]["loss"], 50.0))
    if gen := _generation_records(cfg, data):
        out["task"] = _task_eval(cfg, model, tokenizer, gen, "model")
    return out
