"""From a run config to tokenised train and held-out examples, through the on-disk token cache.

Records are streamed from the readers, assigned to a split, rendered (chat) or packed (raw text), audited
and appended to the cache, so a corpus larger than memory is tokenised once and memory-mapped afterwards.
Only held-out chat records are kept in memory (for generation-based evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data import readers
from tuneforge.data.audit import audit_example, audit_totals, summary
from tuneforge.data.cache import (
    CachedExamples, CacheWriter, cache_key, entry_complete, file_fingerprints, tokenizer_fingerprint,
)
from tuneforge.data.chat import RenderStats, TokenizedExample, document_separator, tokenize_chat
from tuneforge.data.records import TextRecord, as_chat
from tuneforge.data.split import in_eval_split, record_key
from tuneforge.fsutil import atomic_dir


@dataclass
class PreparedData:
    train: CachedExamples
    eval: CachedExamples | None
    eval_records: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


class _Packer:
    """Continued pre-training: documents joined by the document separator, cut into fixed-length blocks."""

    def __init__(self, tokenizer, block_size: int, separator: int, writer: CacheWriter, stats: RenderStats):
        self.tok, self.block, self.sep, self.writer, self.stats = tokenizer, block_size, separator, writer, stats
        self.buffer: list[int] = []

    def add(self, record: TextRecord) -> None:
        # verbose=False: a document longer than the model's maximum is expected here (it is cut into blocks), so
        # transformers' "sequence length is longer than the specified maximum" warning would be a false alarm
        self.buffer.extend(self.tok(record.text, add_special_tokens=False, verbose=False)["input_ids"])
        self.buffer.append(self.sep)
        # Blocks are cut at a moving start and the consumed head is deleted once: each token is copied a
        # bounded number of times (re-slicing the remainder per block was quadratic in the document length).
        start = 0
        while len(self.buffer) - start >= self.block:
            self._emit(self.buffer[start:start + self.block])
            start += self.block
        del self.buffer[:start]

    def _emit(self, ids: list[int]) -> None:
        ex = TokenizedExample(ids, [0] + [1] * (len(ids) - 1))
        self.stats.add(ex)
        self.writer.add(ex)

    def close(self) -> None:
        if len(self.buffer) > 1:  # the tail: a shorter block, padded by the collator
            self._emit(self.buffer)
        self.buffer = []


class _Renderer:
    """Instruction and chat fine-tuning: render, mask, truncate or drop, audit."""

    def __init__(self, tokenizer, cfg, writer: CacheWriter, stats: RenderStats):
        self.tok, self.cfg, self.writer, self.stats = tokenizer, cfg, writer, stats

    def add(self, record) -> None:
        chat = as_chat(record)
        d = self.cfg.data
        ex = tokenize_chat(self.tok, chat, d.mask, d.max_length, d.truncation, d.system_prompt)
        if ex is None:
            self.stats.dropped_too_long += 1
            return
        turns = None if d.mask == "all" else (1 if d.mask == "last" else
                                               sum(m.role == "assistant" for m in chat.messages))
        audit_example(ex, turns)
        self.stats.add(ex)
        self.writer.add(ex)

    def close(self) -> None:
        pass


def _sink(cfg, tokenizer, writer, stats):
    if cfg.method == "clm":
        sep = document_separator(tokenizer, cfg.data.doc_separator)
        return _Packer(tokenizer, cfg.data.max_length, sep, writer, stats)
    return _Renderer(tokenizer, cfg, writer, stats)


def _read(cfg, paths, skipped: list):
    d = cfg.data
    return readers.iter_records(paths, kind=d.kind, fields=d.fields, on_error=d.on_error, format=d.format,
                                text_split=d.text_split, on_skip=skipped.append)


def prepare_data(cfg, tokenizer, cache_root: str | Path | None = None, rebuild: bool = False) -> PreparedData:
    """Tokenise (or load from cache) the train and held-out splits described by `cfg.data`."""
    d = cfg.data
    if not d.train:
        from tuneforge.errors import ConfigError
        raise ConfigError("no training data given", key="data.train")
    root = Path(cache_root or d.cache_dir or Path(cfg.train.output_dir).parent / ".tokcache")
    key = cache_key(method=cfg.method, data=d.model_dump(exclude={"cache_dir"}), seed=cfg.train.seed,
                    tokenizer=tokenizer_fingerprint(tokenizer),
                    files=file_fingerprints(d.train) + file_fingerprints(d.eval))
    folder = root / key
    eval_records: list = []
    skipped: list = []
    if d.eval:
        eval_records = list(_read(cfg, d.eval, skipped))
    if not rebuild and entry_complete(folder):
        train = CachedExamples(folder / "train")
        ev = CachedExamples(folder / "eval")
        ev = ev if len(ev) else None
        if not d.eval and ev is not None:
            eval_records = _held_out_records(cfg)
        return PreparedData(train, ev, eval_records, train.meta["stats"])

    # The whole entry (train, eval, meta) is written in one temporary folder, fsynced and renamed into place:
    # a kill at any point leaves the previous entry or none, never a train split without its eval split.
    with atomic_dir(folder) as tmp:
        meta_stats = _build(cfg, tokenizer, tmp, eval_records, skipped)
        (tmp / "meta.json").write_text(json.dumps({"stats": meta_stats}, indent=1))
    train = CachedExamples(folder / "train")
    ev = CachedExamples(folder / "eval")
    return PreparedData(train, ev if len(ev) else None, eval_records, meta_stats)


def _build(cfg, tokenizer, entry: Path, eval_records: list, skipped: list) -> dict:
    """Stream the records through the split and the builder into `entry`/train and `entry`/eval.

    Appends the held-out records of a fraction split to `eval_records`; returns the statistics."""
    d = cfg.data
    eval_keys = {record_key(r) for r in eval_records}
    stats = {"train": RenderStats(), "eval": RenderStats()}
    writers = {"train": CacheWriter(entry / "train"), "eval": CacheWriter(entry / "eval")}
    sinks = {s: _sink(cfg, tokenizer, writers[s], stats[s]) for s in writers}
    duplicates = 0
    for record in eval_records:
        sinks["eval"].add(record)
    for record in _read(cfg, d.train, skipped):
        k = record_key(record)
        if d.eval:
            if k in eval_keys:
                duplicates += 1
                continue
            sinks["train"].add(record)
        elif d.eval_fraction > 0 and in_eval_split(k, d.eval_fraction, cfg.train.seed):
            if k in eval_keys:  # the same record twice in held-out data counts once
                duplicates += 1
                continue
            eval_keys.add(k)
            eval_records.append(record)
            sinks["eval"].add(record)
        else:
            sinks["train"].add(record)
    for s in sinks.values():
        s.close()
    audit_totals(stats["train"], "train")
    meta_stats = {"train": summary(stats["train"]), "eval": summary(stats["eval"]),
                  "skipped_records": len(skipped), "skipped_examples": [str(e) for e in skipped[:5]],
                  "duplicates_removed": duplicates}
    for w in writers.values():
        w.finish({"stats": meta_stats})
    return meta_stats


def _held_out_records(cfg) -> list:
    """Re-derive the held-out records of a seeded fraction split (for generation eval on a cached run)."""
    out, keys = [], set()
    for record in _read(cfg, cfg.data.train, []):
        k = record_key(record)
        if in_eval_split(k, cfg.data.eval_fraction, cfg.train.seed) and k not in keys:
            keys.add(k)
            out.append(record)
    return out
