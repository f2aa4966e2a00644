"""Load a causal LM (or embedding model) and its tokenizer from one user-facing `spec` string.

A spec is, in this order:
1. an embedded short name ("smollm2", "minilm", ...; see `tuneforge.models.embedded`),
2. an existing local path: an HF folder, or a `.gguf` file (converted once into the cache, keyed by the
   file's content hash),
3. a hub id `org/name`, passed to `from_pretrained` (not tested here: no hub access on dev/CI machines).
Anything else is a ModelLoadError naming the path.

Safety: weights are only read from safetensors (`use_safetensors=True`); a folder that only has
`pytorch_model.bin` is refused, because loading it would unpickle a file a user may have received from someone
else. `trust_remote_code` is passed through and defaults to False for the same reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tuneforge.errors import ModelLoadError
from tuneforge.models import embedded

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUGE_MAX_LENGTH = 1_000_000_000  # transformers' "unknown" sentinel is ~1e30; GGUF tokenizers report it
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_spec(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """Turn a spec into ("folder", local_path) or ("hub", repo_id), converting GGUF files on the way."""
    text = os.fspath(spec)
    if embedded.canonical_name(text) is not None:
        return "folder", str(embedded.resolve_embedded(text, cache_dir))
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            folder = embedded.gguf_cache_folder(path, cache_dir)
            return "folder", str(embedded.ensure_gguf_converted(path, folder))
        raise ModelLoadError(f"{text}: is a file; expected a model folder, a .gguf file, an embedded model name "
                             f"or a hub id")
    if _HUB_ID.match(text) and path.suffix.lower() != ".gguf":
        return "hub", text
    known = ", ".join(sorted([*embedded.EMBEDDED, *embedded.ALIASES]))
    raise ModelLoadError(f"{text}: no such file or folder (and not an embedded model name: {known}; "
                         f"nor a hub id of the form org/name)")


def looks_like_path(spec: str | os.PathLike) -> bool:
    """True when `spec` can only mean a local path: not an embedded name, and not of the hub's `org/name`
    form (or a .gguf name, never a hub id). Such a spec must exist; commands check that before loading."""
    text = os.fspath(spec)
    if embedded.canonical_name(text) is not None:
        return False
    return not _HUB_ID.match(text) or Path(text).suffix.lower() == ".gguf"


def check_weights_folder(folder: str | os.PathLike) -> None:
    """Refuse folders we would have to unpickle, and folders without any weights, with a clear message."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: not a model folder (no config.json)")
    names = set(os.listdir(folder))
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) or n.endswith(".bin.index.json"))
    if pickled:
        raise ModelLoadError(
            f"{folder}: has only pickled weights ({', '.join(pickled)}); tuneforge never unpickles weights "
            f"(unsafe for files from others). Convert them to safetensors once, in a trusted environment, "
            f"e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`")
    raise ModelLoadError(f"{folder}: no weights found (expected model.safetensors)")


def _load_config(location: str, trust_remote_code: bool):
    """AutoConfig with the 'unknown model_type' failure turned into a ModelLoadError naming the type."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        detail = ""
        cfg_file = Path(location) / "config.json"
        if cfg_file.is_file():
            try:
                raw = json.loads(cfg_file.read_text())
                detail = f" (model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')})"
            except ValueError:
                detail = " (config.json is not valid JSON)"
        raise ModelLoadError(f"{location}: transformers cannot read this config{detail}: {e}") from e


def check_causal_lm_config(config, location: str) -> None:
    """Refuse configs that transformers can't load as a causal LM, or would load with a random LM head.

    Why the `architectures` check: e.g. BERT's model_type *is* in the causal-LM mapping, so a sentence
    embedder (architectures ["BertModel"]) would load "fine" with a freshly initialised LM head. We accept a
    folder when one of its declared architectures is a causal-LM class (or remote code maps one).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

    causal = set()
    for v in names.values():
        causal.update(v if isinstance(v, (list, tuple)) else [v])
    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:
        return
    if archs:
        if any(a in causal for a in archs):
            return
        raise ModelLoadError(
            f"{location}: architecture {', '.join(archs)} (model_type {config.model_type!r}) is not a causal "
            f"language model transformers can load with AutoModelForCausalLM")
    if config.model_type not in names:
        raise ModelLoadError(f"{location}: model_type {config.model_type!r} has no causal-LM class in "
                             f"transformers")


def prepare_tokenizer(tok, config=None):
    """Fix the tokenizer quirks every trainer trips over, in one place; returns `tok` (modified in place).

    - `model_max_length`: GGUF-converted and some hub tokenizers report ~1e30 ("unknown"); set it to the
      model's context length (capped at 8192 so default truncation stays CPU-friendly), and never above it.
    - pad token: set to eos when missing. For SmolLM2 pad == eos == `<|im_end|>`; that's fine because the
      data code masks by position, never by token id.
    """
    ctx = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        ctx = getattr(config, attr, None) if config is not None else None
        if isinstance(ctx, int) and ctx > 0:
            break
        ctx = None
    current = getattr(tok, "model_max_length", None)
    if current is None or current >= _HUGE_MAX_LENGTH:
        tok.model_max_length = min(ctx, embedded.MAX_DEFAULT_CONTEXT) if ctx else 2048
    elif ctx and current > ctx:
        tok.model_max_length = ctx
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if config is not None and getattr(config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        config.pad_token_id = tok.pad_token_id
    return tok


def _torch_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ModelLoadError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or auto)")
    return getattr(torch, name)


def _prepare_location(spec, cache_dir, trust_remote_code, causal: bool):
    kind, location = resolve_spec(spec, cache_dir)
    if kind == "folder":
        check_weights_folder(location)
    try:
        config = _load_config(location, trust_remote_code)
    except OSError as e:  # hub id that isn't reachable or doesn't exist
        raise ModelLoadError(f"{spec}: not a local path, and loading it as a hub id failed: {e}") from e
    if causal:
        check_causal_lm_config(config, location)
    return location, config


def load_causal_lm(spec, dtype="float32", trust_remote_code: bool = False, cache_dir=None,
                   attn_implementation: str | None = None):
    """Load (model, tokenizer) for training or generation; see the module docstring for accepted specs."""
    from transformers import AutoModelForCausalLM

    location, config = _prepare_location(spec, cache_dir, trust_remote_code, causal=True)
    kwargs = {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if attn_implementation:
        from tuneforge.models import attention
        if attn_implementation == attention.NAME:
            attention.register()
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(location, config=config, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{spec}: cannot load the model: {e}") from e
    tok = _load_tokenizer_from(location, trust_remote_code)
    prepare_tokenizer(tok, model.config)
    return model, tok


def _load_tokenizer_from(location: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{location}: cannot load the tokenizer: {e}") from e


def load_tokenizer(spec, trust_remote_code: bool = False, cache_dir=None):
    """The prepared tokenizer alone, for data tools; a GGUF spec is still converted once (then cached)."""
    location, config = _prepare_location(spec, cache_dir, trust_remote_code, causal=False)
    return prepare_tokenizer(_load_tokenizer_from(location, trust_remote_code), config)


def load_embedding_model(spec="minilm", dtype="float32", trust_remote_code: bool = False, cache_dir=None):
    """(AutoModel encoder, tokenizer) for embedding/contrastive work, e.g. the embedded all-MiniLM-L6-v2.

    Returns the bare encoder (last_hidden_state); pooling (mean for MiniLM, see its 1_Pooling/config.json)
    is the caller's job.
    """
    from transformers import AutoModel

    location, config = _prepare_location(spec, cache_dir, trust_remote_code, causal=False)
    try:
        model = AutoModel.from_pretrained(location, config=config, dtype=_torch_dtype(dtype),
                                          trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{spec}: cannot load the embedding model: {e}") from e
    tok = _load_tokenizer_from(location, trust_remote_code)
    prepare_tokenizer(tok, model.config)
    return model, tok
