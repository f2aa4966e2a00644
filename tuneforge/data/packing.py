"""Packing: several examples in one row, each with position ids restarting at 0 and attention isolated.

Padding is waste: a batch of variable-length chat examples padded to its longest row spends most of its
compute on pad tokens. Packed rows carry `position_ids` that restart per example and no attention mask;
transformers (sdpa and eager paths) then derives a block-diagonal causal mask from the restarts, so examples
in one row never attend to each other. The first token of every example is never a target (its loss mask
is 0), so no example is trained to continue the previous one.

Multi-sequence examples (preference, pair, prompt) pack the same way, by their total length: an example's
sequences always share one row, in order, each with its own restarting positions, and the batch carries
per-sequence bookkeeping (see `collate_packed_sequences`).

A preference pair's prompt is computed once under `share_prompt` (only with tuneforge_varlen attention, which
alone knows continuations, models/attention.py): the row holds [prompt + chosen][rejected], the rejected
answer's positions restarting at p = len(prompt), so RoPE sees the unpacked positions, its queries attend to
the prompt and to itself, and the prompt's gradient is the sum of the two unpacked copies'. Its first token is
predicted from the prompt's last hidden state, not the previous column: the batch then carries
`predictor_index`. Under any other attention transformers would isolate the rejected answer from its prompt,
so the row budget and the layout stay whole sequences there (run.py `batching`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from tuneforge.data.collate import example_margins
from tuneforge.data.example import Example


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: example indices grouped into rows of at most `capacity` tokens (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens (all its sequences together), more than the row "
                             f"capacity {capacity}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            remaining, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (remaining - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - size, len(bins) - 1))
    for b in bins:
        b.sort()  # examples in a row keep data order: easier to read in `data inspect`
    return bins


def example_lengths(examples, share_prompt: bool = False) -> list[int]:
    """Tokens of every example in a packed row (all its sequences; with `share_prompt` its shared prefix once):
    from a token cache's offsets at once where it has them."""
    if hasattr(examples, "lengths"):
        return examples.lengths(share_prompt) if share_prompt else examples.lengths()
    if share_prompt:
        return [ex.packed_length(True) if isinstance(ex, Example) else len(ex) for ex in examples]
    if hasattr(examples, "length"):
        return [examples.length(i) for i in range(len(examples))]
    return [len(ex) for ex in examples]


class PackedExamples(Sequence):
    """Rows of examples: item i is the list of examples packed into row i. An example counts with its total
    length (all its sequences; its shared prefix once under `share_prompt`, as `collate_packed` then lays it
    out), so a multi-sequence example is never split across rows: `capacity` must hold the largest one."""

    def __init__(self, examples, capacity: int, share_prompt: bool = False):
        self.examples, self.capacity, self.share_prompt = examples, capacity, share_prompt
        self.rows = pack_bins(example_lengths(examples, share_prompt), capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return [self.examples[j] for j in self.rows[i]]


def collate_packed(rows: list[list], pad_id: int, width: int | None = None,
                   share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples: input_ids, position_ids (restarting per example), loss_mask, all
    (B, T), and `num_real` (real tokens, for throughput). No attention mask: isolation comes from positions.
    T is the longest row, or `width` when given (one shape for every batch, which torch.compile wants).
    Rows of multi-sequence examples (Example) go to `collate_packed_sequences` (with `share_prompt`)."""
    if isinstance(rows[0][0], Example):
        return collate_packed_sequences(rows, pad_id, width, share_prompt)
    longest = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    longest = max(longest, width or 0)
    batch = len(rows)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    loss_mask = torch.zeros((batch, longest), dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex.input_ids)
            input_ids[r, at:at + n] = torch.tensor(ex.input_ids, dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            loss_mask[r, at:at + n] = torch.tensor(ex.loss_mask, dtype=torch.long)
            loss_mask[r, at] = 0  # never predict an example's first token from the previous example
            at += n
        real += at
        position_ids[r, at:] = torch.arange(longest - at)  # trailing pad: its own isolated "sequence"
    return {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask,
            "num_real": torch.tensor(real)}


def collate_packed_sequences(rows: list[list[Example]], pad_id: int, width: int | None = None,
                             share_prompt: bool = False) -> dict:
    """Rows of multi-sequence examples: every sequence of a row's examples end to end, positions restarting
    per sequence, no attention mask. With `share_prompt` (tuneforge_varlen attention only), an example's later
    sequences leave out its `shared_prefix` p and continue from position p: [prompt + chosen][rejected].

    Returns input_ids, position_ids, loss_mask, sequence_ids, all (B, T); sequence_example, sequence_role and
    last_index, all (S,) over the S sequences of the batch in row order; num_real (the tokens computed, a
    shared prompt once); for preference examples `margin` (E,), one per example, in the order
    `sequence_example` counts them; where a prompt was shared, `predictor_index` (N,): for each supervised
    token in row-major order, the flat index row * T + col of the position that predicts it (the previous
    column, or for a continuation's first token its prompt's last). `sequence_ids` is each token's sequence
    index (-1 on padding; a shared prompt counts as its first sequence's); `sequence_example` the index of the
    sequence's example, counted over the batch in row order; `last_index` the flat index of its last real
    token. Loss masks are the builder's own: LM builders never supervise a sequence's first token (so no
    sequence is trained to continue the one before it), and pair sequences keep their all-ones pooling mask."""
    longest = max(max(sum(ex.packed_length(share_prompt) for ex in row) for row in rows), width or 0)
    batch = len(rows)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    loss_mask = torch.zeros((batch, longest), dtype=torch.long)
    sequence_ids = torch.full((batch, longest), -1, dtype=torch.long)
    seq_example, seq_role, last_index = [], [], []
    continuations = []  # (flat index of a continuation's first token, flat index of its prompt's last token)
    examples = 0
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            prompt_end = r * longest + at + ex.shared_prefix - 1
            for k, (seq, role) in enumerate(zip(ex.sequences, ex.roles)):
                skip = ex.shared_prefix if share_prompt and k else 0
                n = len(seq.input_ids) - skip
                input_ids[r, at:at + n] = torch.tensor(seq.input_ids[skip:], dtype=torch.long)
                position_ids[r, at:at + n] = torch.arange(skip, skip + n)
                loss_mask[r, at:at + n] = torch.tensor(seq.loss_mask[skip:], dtype=torch.long)
                sequence_ids[r, at:at + n] = len(seq_example)
                if skip:
                    continuations.append((r * longest + at, prompt_end))
                seq_example.append(examples)
                seq_role.append(role)
                last_index.append(r * longest + at + n - 1)
                at += n
            examples += 1
        position_ids[r, at:] = torch.arange(longest - at)  # trailing pad: its own isolated "sequence"
    out = {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask,
           "sequence_ids": sequence_ids, "sequence_example": torch.tensor(seq_example, dtype=torch.long),
           "sequence_role": torch.tensor(seq_role, dtype=torch.long),
           "last_index": torch.tensor(last_index, dtype=torch.long), "num_real": (sequence_ids >= 0).sum(),
           **example_margins([ex for row in rows for ex in row])}
    if continuations:
        out["predictor_index"] = _predictor_index(loss_mask, continuations)
    return out


def _predictor_index(loss_mask: torch.Tensor, continuations: list[tuple[int, int]]) -> torch.Tensor:
    """(N,) flat index of the position predicting each supervised token (row-major): the previous column,
    except a continuation's first token, predicted from its prompt's last position."""
    if bool(loss_mask[:, 0].any()):  # its "previous column" would be the row before's last
        raise ValueError("a packed row supervises its first token: nothing in the row predicts it")
    predictor = torch.arange(loss_mask.numel()) - 1  # (B * T,)
    first, prompt_end = zip(*continuations)
    predictor[list(first)] = torch.tensor(prompt_end, dtype=torch.long)
    return predictor[loss_mask.flatten().bool()]


def real_tokens(batch: dict) -> int:
    """Non-pad tokens of a padded or packed batch."""
    if "num_real" in batch:
        return int(batch["num_real"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel()) if "input_ids" in batch else 0
