"""Embedding models (method contrastive): an encoder (BERT-like, e.g. the embedded all-MiniLM-L6-v2) or a decoder
LLM body (e.g. SmolLM2) whose final hidden states are pooled into one vector per text.

- Pooling (`contrastive.pooling`): `mean` over the real tokens, `cls` (the first token), `last` (the last real
  token, found by position from the attention mask, never by token id, so right padding is safe for decoders).
- Optional L2 normalisation (`contrastive.normalize`): then a dot product is the cosine similarity.
- Pooling runs inside the TrainModule's forward (models/heads.py `head_fn`), so a data-parallel wrapper sees it.
- Less padding (`embedding_layout`, from data.packing). By default ("sorted") the rows of a batch are sorted by
  length and embedded CHUNK_ROWS at a time, each chunk cut to its own longest text, inside one forward of the
  TrainModule (so data parallelism sees one forward); encoders and decoders alike. With data.packing: true,
  decoder bodies under tuneforge_varlen attention (llama, qwen2, qwen3) lay the real tokens of every row end to
  end in one row, position ids restarting at 0 per text, and attention runs per text (models/attention.py): no
  padding at all. Every layout gives the padded batch's vectors (tested to 1e-5 in float32).
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


def pool_packed(hidden: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """(S, H) sentence vectors from the hidden states (N, H) of S texts laid end to end, `lengths` (S,) tokens each."""
    ends = lengths.cumsum(0)
    if mode == "mean":
        segment = torch.repeat_interleave(torch.arange(lengths.shape[0], device=hidden.device), lengths)
        sums = hidden.new_zeros(lengths.shape[0], hidden.shape[-1]).index_add_(0, segment, hidden)
        return sums / lengths.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[ends - lengths]
    if mode == "last":
        return hidden[ends - 1]
    raise ValueError(f"unknown pooling {mode!r}; use one of {', '.join(POOLING)}")


CHUNK_ROWS = 16  # rows per length-sorted chunk (measured on a 2-core CPU: see BENCHMARKS.md, padding-free batches)
LAYOUTS = ("padded", "sorted", "packed")


def embedding_layout(module, setting) -> str:
    """How `embed` lays out a batch, from data.packing: `auto` (default) "sorted", False "padded", True "packed"
    (only under tuneforge_varlen attention, the one attention that isolates texts by position ids: an encoder's
    bidirectional attention would mix them; a ConfigError otherwise)."""
    if setting is False:
        return "padded"
    if setting is not True:
        return "sorted"
    from tuneforge.models.attention import NAME, is_varlen
    from tuneforge.objectives.functional import unwrap
    if not is_varlen(unwrap(module)):
        from tuneforge.errors import ConfigError
        attention = getattr(getattr(unwrap(module), "config", None), "_attn_implementation", None)
        raise ConfigError(f"packed (padding-free) embedding batches need {NAME} attention (llama, qwen2, qwen3 "
                          f"decoders); this model runs {attention!r}: set data.packing to auto or false",
                          key="data.packing")
    return "packed"


def length_chunks(lengths: torch.Tensor, rows: int = CHUNK_ROWS) -> list[tuple[torch.Tensor, int]]:
    """[(row indices, longest length), ...]: the rows sorted by length (stable), `rows` at a time."""
    order = torch.argsort(lengths, stable=True)
    return [(chunk, int(lengths[chunk].max())) for chunk in order.split(rows)]


def embed(module, batch: dict, pooling: str, normalize: bool, extra=None, layout: str = "padded"):
    """(S, H) float32 (a float64 model: float64) embeddings of every sequence (row) of a padded batch, pooled inside the module's forward;
    with `extra(train_module)`, (embeddings, its result), also computed inside the forward (a learned temperature:
    a parameter that a data-parallel wrapper must see used). `layout` (`embedding_layout`): "padded" rows as they
    are; "sorted": rows of similar length together, each chunk cut to its longest (module docstring); "packed":
    one padding-free row."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown embedding layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    mask = batch["attention_mask"]
    lengths = mask.long().sum(1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if layout == "packed":
        inputs = {"input_ids": batch["input_ids"][mask.bool()].unsqueeze(0),  # right padding: row by row
                  "attention_mask": None,
                  "position_ids": torch.cat([torch.arange(int(n), device=mask.device) for n in lengths]).unsqueeze(0)}
    elif layout == "sorted":
        inputs["row_chunks"] = length_chunks(lengths)

    def head_fn(hidden, tm):
        vectors = (pool_packed(hidden[0], lengths, pooling) if layout == "packed" else pool(hidden, mask, pooling))
        vectors = vectors if vectors.dtype == torch.float64 else vectors.float()  # float32, or a float64 model's
        vectors = F.normalize(vectors, dim=-1) if normalize else vectors
        return vectors if extra is None else (vectors, extra(tm))

    return forward(module, inputs, head_fn)


def load_embedder(cfg, device=None):
    """(model, tokenizer): the bare transformers body (AutoModel: no LM head) of model.name, encoder or decoder."""
    from tuneforge.models.load import load_embedding_model
    model, tokenizer = load_embedding_model(cfg.model.name, dtype=cfg.model.dtype,
                                            trust_remote_code=cfg.model.trust_remote_code)
    from tuneforge.models.attention import NAME, register, supports_varlen
    wanted = cfg.model.attn_implementation
    # a decoder body that tuneforge_varlen computes exactly gets it: right padding without a mask, and the
    # padding-free layout on request (`embedding_layout`)
    if wanted == NAME or (wanted is None and supports_varlen(model.config)):
        model.set_attn_implementation(register())
    elif wanted is not None:
        model.set_attn_implementation(wanted)
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

