"""Forgetting: the model's perplexity on general text, before and after tuning.

A tuned model that gained on its task may have lost elsewhere; the cheapest sign is its next-token perplexity on
text unlike the task's. Every run of a method whose result is a causal language model measures it before and
after training (results.json "forgetting"), and `tuneforge eval` for base and tuned. The text is
`eval.general_text` (a file or folder, read as continued pre-training reads data.train) or, by default, the set
shipped with tuneforge (tuneforge/data/general/general_text.jsonl: Python standard-library module docstrings and
software licences, made by scripts/make_general_text.py), cut into blocks as `clm` cuts its data and scored on
its first `eval.general_tokens` tokens, by the one held-out evaluation (train.loop.evaluate) with the `clm`
objective.
"""

from __future__ import annotations

from pathlib import Path

GENERAL_TEXT = Path(__file__).resolve().parents[1] / "data" / "general" / "general_text.jsonl"
MAX_BLOCK = 512


def measures_forgetting(cfg) -> bool:
    from tuneforge.methods import method_of
    return bool(cfg.eval.forgetting) and method_of(cfg).causal_lm


def general_blocks(cfg, tokenizer) -> list:
    """The general text as `clm` blocks of min(data.max_length, 512) tokens, the first eval.general_tokens
    tokens of it (token cache shared with the run's data)."""
    from tuneforge.config.schema import RunConfig
    from tuneforge.data.dataset import prepare_data
    path = cfg.eval.general_text or str(GENERAL_TEXT)
    d = cfg.data
    general = RunConfig.model_validate({
        "method": "clm", "model": cfg.model.model_dump(),
        "data": {"train": path, "kind": "text", "max_length": min(d.max_length, MAX_BLOCK),
                 "doc_separator": d.doc_separator, "cache_dir": d.cache_dir},
        "train": {"output_dir": cfg.train.output_dir, "seed": cfg.train.seed}})
    blocks, tokens = [], 0
    for block in prepare_data(general, tokenizer, "text_blocks").train:
        if tokens >= cfg.eval.general_tokens:
            break
        blocks.append(block)
        tokens += len(block)
    return blocks


def general_perplexity(module, tokenizer, blocks: list, batch_size: int, autocast, device) -> dict:
    """{"loss", "perplexity", "tokens"} of `module` (a TrainModule) on the general blocks."""
    from tuneforge.data.collate import collate
    from tuneforge.objectives.clm import CausalLMObjective
    from tuneforge.train.loop import evaluate
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    m = evaluate(module, CausalLMObjective(), blocks, lambda rows: collate(rows, pad), batch_size, autocast, device)
    return {"loss": m["loss"], "perplexity": m["perplexity"], "tokens": int(m["count"])}


def forgetting_row(before: dict | None, after: dict, text: str) -> dict:
    """results.json "forgetting": perplexity before and after and its relative change (+ = forgot)."""
    row = {"general_text": text, "tokens": after["tokens"], "after": after["perplexity"]}
    if before is not None:
        row["before"] = before["perplexity"]
        row["change"] = after["perplexity"] / before["perplexity"] - 1.0
    return row
