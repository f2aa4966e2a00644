"""From a run config to tokenised train and held-out examples, through the on-disk token cache.

Records are streamed from the readers, assigned to a split, turned into examples by the data builder the
caller names (builders.py: text blocks, chat, preference, pair, prompt), audited and appended to the cache, so
a corpus larger than memory is tokenised once and memory-mapped afterwards. Only held-out records are kept in
memory (for generation-based evaluation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.data import readers
from tuneforge.data.audit import audit_totals
from tuneforge.data.builders import BUILDERS, BuildStats
from tuneforge.data.cache import (
    CachedExamples, CacheWriter, cache_key, entry_complete, file_fingerprints, tokenizer_fingerprint,
)
from tuneforge.data.split import in_eval_split, record_key
from tuneforge.fsutil import atomic_dir


@dataclass
class PreparedData:
    train: CachedExamples
    eval: CachedExamples | None
    eval_records: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def _read(cfg, paths, skipped: list):
    d = cfg.data
    return readers.iter_records(paths, kind=d.kind, fields=d.fields, on_error=d.on_error, format=d.format,
                                text_split=d.text_split, on_skip=skipped.append)


def prepare_data(cfg, tokenizer, builder: str, cache_root: str | Path | None = None,
                 rebuild: bool = False, options: dict | None = None) -> PreparedData:
    """Tokenise (or load from cache) the train and held-out splits described by `cfg.data`, through the data
    builder named `builder` (a key of builders.BUILDERS; the caller's method decides which) with the method's
    builder `options` (settings outside cfg.data that change the tokens, such as contrastive prefixes)."""
    d = cfg.data
    if builder not in BUILDERS:
        raise ValueError(f"unknown data builder {builder!r}; known: {', '.join(BUILDERS)}")
    if not d.train:
        from tuneforge.errors import ConfigError
        raise ConfigError("no training data given", key="data.train")
    root = Path(cache_root or d.cache_dir or Path(cfg.train.output_dir).parent / ".tokcache")
    options = dict(options or {})
    key = cache_key(builder=builder, data=d.model_dump(exclude={"cache_dir"}), seed=cfg.train.seed,
                    **({"options": options} if options else {}),
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
        meta_stats = _build(cfg, tokenizer, BUILDERS[builder], tmp, eval_records, skipped, options)
        (tmp / "meta.json").write_text(json.dumps({"builder": builder, "stats": meta_stats}, indent=1))
    train = CachedExamples(folder / "train")
    ev = CachedExamples(folder / "eval")
    return PreparedData(train, ev if len(ev) else None, eval_records, meta_stats)


def _build(cfg, tokenizer, make, entry: Path, eval_records: list, skipped: list, options: dict) -> dict:
    """Stream the records through the split and the builder class `make` into `entry`/train and `entry`/eval.

    Appends the held-out records of a fraction split to `eval_records`; returns the statistics."""
    d = cfg.data
    eval_keys = {record_key(r) for r in eval_records}
    stats = {"train": BuildStats(), "eval": BuildStats()}
    writers = {s: CacheWriter(entry / s, make.example_type, make.role_names) for s in ("train", "eval")}
    sinks = {s: make(tokenizer, d, writers[s], stats[s], options) for s in writers}
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
    _audit(stats["train"], make.supervised)
    meta_stats = {"train": stats["train"].summary(), "eval": stats["eval"].summary(),
                  "skipped_records": len(skipped), "skipped_examples": [str(e) for e in skipped[:5]],
                  "duplicates_removed": duplicates}
    for w in writers.values():
        w.finish({"stats": meta_stats})
    return meta_stats


def _audit(stats: BuildStats, supervised: bool) -> None:
    if supervised:
        audit_totals(stats, "train")
    elif stats.examples == 0:  # prompts supervise nothing by design; an empty split is still an error
        from tuneforge.errors import AuditError
        raise AuditError(f"no train examples left after reading and length filtering "
                         f"({stats.dropped_too_long} dropped as longer than data.max_length)")


def _held_out_records(cfg) -> list:
    """Re-derive the held-out records of a seeded fraction split (for generation eval on a cached run)."""
    out, keys = [], set()
    for record in _read(cfg, cfg.data.train, []):
        k = record_key(record)
        if in_eval_split(k, cfg.data.eval_fraction, cfg.train.seed) and k not in keys:
            keys.add(k)
            out.append(record)
    return out
