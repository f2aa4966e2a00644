"""LoRA / DoRA / rsLoRA adapters as a thin plain-function layer over PEFT.

Why PEFT and not our own LoRA: its adapter format (adapter_config.json + adapter_model.safetensors) is what
every other tool loads, and its merge code is exercised far more than ours would be. This module only fixes
tuneforge's defaults (all linear layers except the output head), keeps everything in safetensors, and turns
PEFT's failure modes into clear TuneforgeErrors.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuneforge.errors import ModelLoadError, TuneforgeError
from tuneforge.fsutil import atomic_dir


def _peft():
    import peft

    return peft


def is_peft_model(model) -> bool:
    return isinstance(model, _peft().PeftModel)


def apply_lora(model, r: int = 16, alpha: float = 32, dropout: float = 0.05,
               target_modules: str | list[str] = "all-linear", use_dora: bool = False,
               use_rslora: bool = False, task_type: str | None = "CAUSAL_LM", adapter_name: str = "default"):
    """Wrap `model` with a fresh, trainable LoRA adapter and return the PeftModel.

    `target_modules="all-linear"` means every nn.Linear except the output head (PEFT's definition); a list
    of module-name suffixes (e.g. ["q_proj", "v_proj"]) restricts it. `use_rslora` scales by alpha/sqrt(r)
    instead of alpha/r, `use_dora` adds DoRA's magnitude vectors. If `model` is already a PeftModel the
    adapter is added under `adapter_name` (several named adapters on one base; switch with `set_adapter`).
    """
    peft = _peft()
    if r <= 0:
        raise TuneforgeError(f"LoRA rank r must be positive, got {r}")
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        raise TuneforgeError("target_modules is an empty list; use 'all-linear' or name some modules")
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
        use_dora=use_dora, use_rslora=use_rslora, task_type=task_type,
    )
    try:
        if is_peft_model(model):
            model.add_adapter(adapter_name, config)
            return model
        return peft.get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
        raise TuneforgeError(f"cannot apply LoRA: {e}") from e


def frozen_linears_to(model, dtype) -> int:
    """Store the frozen weights of the linear layers in `dtype` (the autocast compute dtype), in place; returns how
    many tensors changed. Autocast casts a float32 weight to its compute dtype at every call (a copy of every
    weight each forward, and each decoding step of a rollout); a frozen weight already held in that dtype gives
    the same numbers with half the memory and no copy. Only frozen nn.Linear weights (the LoRA base layers):
    embeddings, norms and anything that trains keep their dtype, so the residual stream stays float32, and a
    head tied to the input embedding (SmolLM2's) is left alone. Only valid while every forward runs under
    autocast (run.py makes sure), and not for DoRA (its magnitude uses the base weight's norm)."""
    import torch
    from torch import nn
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {embedding.weight.data_ptr()} if embedding is not None else set()
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Linear:  # PEFT's wrappers hold their frozen layer as an nn.Linear child
                continue
            for name in ("weight", "bias"):
                p = getattr(module, name)
                if p is None or p.requires_grad or p.dtype == dtype or p.data_ptr() in tied:
                    continue
                p.data = p.data.to(dtype)
                changed += 1
    return changed


def save_adapter(model, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the PEFT adapter folder (adapter_config.json + adapter_model.safetensors), atomically.

    Loadable by `peft.PeftModel.from_pretrained(base, out_dir)` or `load_adapter`. Non-default adapters go
    in sub-folders named after them (PEFT's layout). `base_model`, if given (e.g. "smollm2"), is recorded as
    `base_model_name_or_path` instead of the local cache path, so the folder stays meaningful elsewhere.
    """
    if not is_peft_model(model):
        raise TuneforgeError("save_adapter needs a PeftModel (use apply_lora or load_adapter first)")
    old = {name: cfg.base_model_name_or_path for name, cfg in model.peft_config.items()}
    try:
        if base_model is not None:
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = base_model
        with atomic_dir(out_dir) as tmp:
            # save_embedding_layers=False: "auto" may consult the hub config of the base; embeddings trained
            # through modules_to_save are still saved.
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
    finally:
        for name, value in old.items():
            model.peft_config[name].base_model_name_or_path = value
    return Path(out_dir)


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path` of adapter_config.json), or None."""
    import json

    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def _check_adapter_dir(adapter_dir) -> Path:
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{adapter_dir}: adapter folder not found")
    if not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    if not (path / "adapter_model.safetensors").is_file():
        extra = " (only adapter_model.bin, which would be unpickled: refused)" if (
            path / "adapter_model.bin").exists() else ""
        raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors{extra}")
    return path


def load_adapter(model, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False):
    """Load a saved adapter onto `model` (a base model or a PeftModel) and return the PeftModel.

    On a PeftModel the adapter is added under `adapter_name` next to the existing ones (it does not become
    active: call `set_adapter`). `is_trainable=False` loads it frozen, for evaluation or merging.
    """
    path = _check_adapter_dir(adapter_dir)
    peft = _peft()
    try:
        if is_peft_model(model):
            model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return peft.PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name,
                                              is_trainable=is_trainable)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{adapter_dir}: cannot load adapter onto this model: {e}") from e


def set_adapter(model, adapter_name: str):
    """Make `adapter_name` the active adapter (several adapters may be loaded on one base)."""
    if not is_peft_model(model):
        raise TuneforgeError("set_adapter needs a PeftModel")
    if adapter_name not in model.peft_config:
        raise TuneforgeError(f"no adapter named {adapter_name!r} (loaded: {', '.join(model.peft_config)})")
    model.set_adapter(adapter_name)
    return model


def list_adapters(model) -> list[str]:
    """Names of the adapters loaded on a PeftModel ([] for a plain model)."""
    return list(model.peft_config) if is_peft_model(model) else []


def _is_quantized(model) -> bool:
    base = model.get_base_model() if is_peft_model(model) else model
    config = getattr(base, "config", None)
    return bool(getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None
                or getattr(config, "quantization_config", None))


def merge_to_folder(model_spec_or_model, adapter_dir: str | os.PathLike | None, out_dir: str | os.PathLike,
                    tokenizer=None, dtype="float32") -> Path:
    """Merge an adapter into its base and save a plain HF model folder (safetensors + tokenizer), atomically.

    `model_spec_or_model` is a spec for `load_causal_lm` (then its tokenizer is used unless one is given), a
    base model (then `adapter_dir` is loaded onto it), or a PeftModel (then `adapter_dir` may be None: its
    active adapter is merged). The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and needs
    no PEFT. Merging mutates the base model in place. Quantized bases are refused: merging LoRA deltas into
    quantized weights would silently lose them to rounding.
    """
    model = model_spec_or_model
    if isinstance(model, (str, os.PathLike)):
        from tuneforge.models.load import load_causal_lm

        model, spec_tok = load_causal_lm(model, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else spec_tok
    if _is_quantized(model):
        raise TuneforgeError("refusing to merge into a quantized base model: load the base in float32/bf16 "
                             "(tuneforge converts GGUF to float32), apply the adapter, then merge")
    if adapter_dir is not None:
        name = "merge" if is_peft_model(model) else "default"  # don't collide with a loaded "default"
        model = set_adapter(load_adapter(model, adapter_dir, adapter_name=name), name)
    elif not is_peft_model(model):
        raise TuneforgeError("merge_to_folder: no adapter_dir given and the model has no adapter")
    if tokenizer is None:
        raise TuneforgeError("merge_to_folder needs the tokenizer, so the folder is usable (chat template)")
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)
