"""Token counting for the TRL side of every benchmark here (run.py and gpu.py share it)."""

from __future__ import annotations


def count_batches(trainer) -> list[tuple[int, int]]:
    """Wrap `trainer.data_collator` so that each batch it builds appends (real tokens, supervised next-token
    targets) to the returned list: real = ones of the attention mask (every token of a padding-free packed
    batch), supervised = labels other than -100 after the first position."""
    batches: list[tuple[int, int]] = []
    inner = trainer.data_collator

    def counting(examples):
        out = inner(examples)
        labels = out["labels"]
        real = int(out["attention_mask"].sum()) if "attention_mask" in out else int(labels.numel())
        batches.append((real, int((labels[:, 1:] != -100).sum())))
        return out

    trainer.data_collator = counting
    return batches
