"""The flat completion-token layout of RL and its per-sequence reductions.

Log-probs, values and rewards of rollouts come from the logits-free path over packed rows as one flat (N,)
tensor of completion tokens, with a (N,) `segments` tensor naming each token's sequence: ids 0..S-1, every
sequence's tokens contiguous and in order (so `segments` never decreases). S is passed explicitly because a
sequence may have no completion token and then appears nowhere in `segments`. The reductions here work on that
layout directly; `to_padded` / `from_padded` serve the scans that are easier row by row (GAE).
"""

from __future__ import annotations

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.objectives.logprobs import sequence_logprobs


def check_segments(segments: torch.Tensor, num_sequences: int, *others: tuple[str, torch.Tensor]) -> None:
    """Refuse a layout the reductions would silently get wrong: ids out of range, out of order, or a per-token
    tensor (name, tensor) whose shape differs from `segments`."""
    if segments.dim() != 1 or segments.dtype not in (torch.int32, torch.int64):
        raise TuneforgeError(f"segments must be a 1-D integer tensor, got shape {tuple(segments.shape)} "
                             f"dtype {segments.dtype}")
    if segments.numel():
        if int(segments.min()) < 0 or int(segments.max()) >= num_sequences:
            raise TuneforgeError(f"segments must lie in [0, {num_sequences}), got ids "
                                 f"{int(segments.min())}..{int(segments.max())}")
        if segments.numel() > 1 and bool((segments[1:] < segments[:-1]).any()):
            first = int(torch.nonzero(segments[1:] < segments[:-1])[0]) + 1
            raise TuneforgeError(f"segments must be contiguous and in order (never decreasing); token {first} "
                                 f"has sequence {int(segments[first])} after {int(segments[first - 1])}")
    for name, tensor in others:
        if tuple(tensor.shape) != tuple(segments.shape):
            raise TuneforgeError(f"{name} has shape {tuple(tensor.shape)}, segments {tuple(segments.shape)}: "
                                 "every per-token tensor is (N,)")


def segment_lengths(segments: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Token count of each sequence (S,), long; 0 for a sequence without completion tokens."""
    return torch.bincount(segments, minlength=num_sequences)[:num_sequences]


def segment_sum(values: torch.Tensor, segments: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-sequence sums (S,) of per-token values (N,); differentiable."""
    return sequence_logprobs(values, segments, num_sequences)


def segment_mean(values: torch.Tensor, segments: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-sequence means (S,); 0 for an empty sequence (nothing to average, and no NaN to poison a sum)."""
    lengths = segment_lengths(segments, num_sequences).clamp(min=1).to(values.dtype)
    return segment_sum(values, segments, num_sequences) / lengths


def segment_starts(segments: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Flat index of each sequence's first token (S,) (for an empty sequence: where it would start)."""
    lengths = segment_lengths(segments, num_sequences)
    return torch.cumsum(lengths, 0) - lengths


def positions(segments: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Each token's position inside its own sequence (N,), 0 for the first completion token."""
    starts = segment_starts(segments, num_sequences)
    return torch.arange(segments.numel(), device=segments.device) - starts[segments]


def last_token_index(segments: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Flat index of each sequence's last token (S,); -1 for an empty sequence."""
    lengths = segment_lengths(segments, num_sequences)
    last = torch.cumsum(lengths, 0) - 1
    return torch.where(lengths > 0, last, torch.full_like(last, -1))


def to_padded(values: torch.Tensor, segments: torch.Tensor, num_sequences: int,
              pad: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (N,) -> right-padded (S, L) with L the longest sequence, and its boolean (S, L) token mask."""
    lengths = segment_lengths(segments, num_sequences)
    width = int(lengths.max()) if num_sequences and segments.numel() else 0
    padded = torch.full((num_sequences, width), pad, dtype=values.dtype, device=values.device)
    mask = torch.zeros((num_sequences, width), dtype=torch.bool, device=values.device)
    pos = positions(segments, num_sequences)
    padded[segments, pos] = values
    mask[segments, pos] = True
    return padded, mask


def from_padded(padded: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Right-padded (S, L) -> flat (N,) in the layout of `segments` (the inverse of `to_padded`)."""
    return padded[segments, positions(segments, padded.shape[0])]
