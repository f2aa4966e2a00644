"""Batching: right padding for training, with masks carried by position (never by token id)."""

from __future__ import annotations

import torch

from tuneforge.data.chat import TokenizedExample
from tuneforge.data.example import Example


def pad_rows(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, T) long: token id lists right-padded to the longest."""
    longest = max((len(ids) for ids in sequences), default=0)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, :len(ids)] = 1
    return input_ids, attention


def collate(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Returns input_ids, attention_mask and loss_mask, all (B, T).

    Padding positions get attention 0 and loss 0 because of where they are, so a pad id equal to the
    end-of-turn id (SmolLM2) never hides a real end-of-turn token from the loss. Multi-sequence examples
    (Example) go to `collate_sequences`: one sequence per row.
    """
    if isinstance(examples[0], Example):
        return collate_sequences(examples, pad_id)
    input_ids, attention = pad_rows([ex.input_ids for ex in examples], pad_id)
    loss_mask = torch.zeros_like(input_ids)
    for row, ex in enumerate(examples):
        loss_mask[row, :len(ex.input_ids)] = torch.tensor(ex.loss_mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def flat_sequences(examples: list[Example]) -> list[tuple[TokenizedExample, int, int]]:
    """(sequence, example index in the batch, role id) for every sequence, example by example."""
    return [(seq, e, role) for e, ex in enumerate(examples) for seq, role in zip(ex.sequences, ex.roles)]


def example_margins(examples: list[Example]) -> dict[str, torch.Tensor]:
    """{"margin": (E,) float32}, one per example in batch order (what `sequence_example` indexes), for
    preference examples: how much better the chosen answer is, 0.0 where the data gives no margin or scores.
    Empty for other examples (pair, prompt), which have no chosen answer. With reference log-probs attached
    to every example (objectives/dpo.py `with_reference`), also `ref_logps` (S,), one per sequence in batch
    order."""
    if not examples or "chosen" not in examples[0].role_names:
        return {}
    out = {"margin": torch.tensor([float((ex.texts or {}).get("margin", 0.0)) for ex in examples],
                                  dtype=torch.float32)}
    if all("ref_logps" in (ex.texts or {}) for ex in examples):  # precomputed reference (DPO, full fine-tuning)
        out["ref_logps"] = torch.tensor([v for ex in examples for v in ex.texts["ref_logps"]], dtype=torch.float32)
    return out


def collate_sequences(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Multi-sequence examples, one sequence per row, right-padded: S rows for S sequences.

    Returns input_ids, attention_mask, loss_mask, sequence_ids, all (S, T); sequence_example, sequence_role and
    last_index, all (S,); num_real; for preference examples `margin` (E,) (see `example_margins`).
    `sequence_ids` is the row's sequence index (-1 on padding);
    `sequence_example` the index of its example in `examples`; `sequence_role` its role id (the builder's role
    order); `last_index` the flat index row * T + col of its last real token (reward heads, last-token pooling:
    found by position, never by token id)."""
    seqs = flat_sequences(examples)
    input_ids, attention = pad_rows([seq.input_ids for seq, _, _ in seqs], pad_id)
    rows, longest = input_ids.shape
    loss_mask = torch.zeros_like(input_ids)
    sequence_ids = torch.full((rows, longest), -1, dtype=torch.long)
    lengths = []
    for row, (seq, _, _) in enumerate(seqs):
        n = len(seq.input_ids)
        loss_mask[row, :n] = torch.tensor(seq.loss_mask, dtype=torch.long)
        sequence_ids[row, :n] = row
        lengths.append(n)
    n = torch.tensor(lengths, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "sequence_ids": sequence_ids,
            "sequence_example": torch.tensor([e for _, e, _ in seqs], dtype=torch.long),
            "sequence_role": torch.tensor([r for _, _, r in seqs], dtype=torch.long),
            "last_index": torch.arange(rows) * longest + n - 1,
            "num_real": n.sum(), **example_margins(examples)}
