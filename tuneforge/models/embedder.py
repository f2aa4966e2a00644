"""Embedding models (method contrastive): an encoder (BERT-like, e.g. the embedded all-MiniLM-L6-v2) or a decoder
LLM body (e.g. SmolLM2) whose final hidden states are pooled into one vector per text.

- Pooling (`contrastive.pooling`): `mean` over the real tokens, `cls` (the first token), `last` (the last real
  token, found by position from the attention mask, never by token id, so right padding is safe for decoders).
- Optional L2 normalisation (`contrastive.normalize`): then a dot product is the cosine similarity.
- Pooling runs inside the TrainModule's forward (models/heads.py `head_fn`), so a data-parallel wrapper sees it.
- Saved as a sentence-transformers folder (`save_embedder`): the transformers model and tokenizer at
  the top (so `transformers.AutoModel` loads it too) plus modules.json, 1_Pooling/ and, when normalised,
  2_Normalize/, which `sentence_transformers.SentenceTransformer(path)` reads. Under LoRA the adapter is saved
  beside it in `adapter/` and the top-level model is the merged copy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneforge.objectives.functional import forward

POOLING = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(S, H) sentence vectors from hidden states (S, T, H) and the attention mask (S, T) of right-padded rows."""
    if mode == "mean":
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (S, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = attention_mask.long().sum(1).clamp(min=1) - 1  # (S,) last real column of each row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; use one of {', '.join(POOLING)}")


def embed(module, batch: dict, pooling: str, normalize: bool, extra=None):
    """(S, H) float32 embeddings of every sequence (row) of a padded batch, pooled inside the module's forward;
    with `extra(train_module)`, (embeddings, its result), also computed inside the forward (a learned temperature:
    a parameter that a data-parallel wrapper must see used)."""

    def head_fn(hidden, tm):
        vectors = pool(hidden, batch["attention_mask"], pooling).float()
        vectors = F.normalize(vectors, dim=-1) if normalize else vectors
        return vectors if extra is None else (vectors, extra(tm))

    return forward(module, {k: batch[k] for k in ("input_ids", "attention_mask")}, head_fn)


def load_embedder(cfg, device=None):
    """(model, tokenizer): the bare transformers body (AutoModel: no LM head) of model.name, encoder or decoder."""
    from tuneforge.models.load import load_embedding_model
    model, tokenizer = load_embedding_model(cfg.model.name, dtype=cfg.model.dtype,
                                            trust_remote_code=cfg.model.trust_remote_code)
    if device is not None:
        model.to(device)
    return model, tokenizer


def _pooling_config(dim: int, mode: str) -> dict:
    return {"word_embedding_dimension": dim, "pooling_mode_cls_token": mode == "cls",
            "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": mode == "last", "include_prompt": True}


def write_sentence_transformer_files(folder: Path, dim: int, pooling: str, normalize: bool,
                                     max_length: int, prompts: dict[str, str] | None = None) -> None:
    """The sentence-transformers module files around a transformers model folder (format of its 3.x-6.x).
    `prompts` ({"query": prefix, "document": prefix}) are what `encode(..., prompt_name=...)` puts before a text."""
    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(dim, pooling), indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length,
                                                                  "do_lower_case": False}, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SentenceTransformer", "prompts": dict(prompts or {}), "default_prompt_name": None,
         "similarity_fn_name": "cosine" if normalize else "dot"}, indent=2))


def save_embedder(cfg, module, tokenizer, folder: Path) -> None:
    """`folder`: a sentence-transformers folder of the tuned embedder (LoRA merged into a copy of the base), and
    under LoRA the adapter in PEFT format in folder/adapter."""
    model = module.model
    folder = Path(folder)
    if cfg.lora.enabled:
        from tuneforge.adapters.lora import save_adapter
        from tuneforge.run import adapter_base_name
        save_adapter(model, folder / "adapter", base_model=adapter_base_name(cfg))
        plain = copy.deepcopy(model).merge_and_unload()
    else:
        plain = model
    plain.save_pretrained(folder, safe_serialization=True)
    c = cfg.contrastive
    prompts = {name: p for name, p in (("query", c.query_prefix), ("document", c.document_prefix)) if p}
    write_sentence_transformer_files(folder, plain.config.hidden_size, c.pooling, c.normalize, cfg.data.max_length,
                                     prompts)

