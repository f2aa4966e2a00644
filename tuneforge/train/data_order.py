"""Where in the data each training step is: a pure function of the step, the seed and the batch shape.

Data order is a seeded permutation per epoch, so the step counter alone says where a resumed run continues.
One step takes `micro_batch_size * grad_accum * world_size` examples (rows, when packed); under torchrun each
rank takes every world_size-th micro-batch of them, so 2 ranks x 2 micro-batches see exactly the examples
1 rank x 4 micro-batches sees.
"""

from __future__ import annotations

import functools
import math

import torch


def examples_per_step(s, world: int = 1) -> int:
    return s.micro_batch_size * s.grad_accum * world


def steps_per_epoch(n_examples: int, s, world: int = 1) -> int:
    return max(1, math.ceil(n_examples / examples_per_step(s, world)))


def total_steps(n_examples: int, s, world: int = 1) -> int:
    return s.max_steps or max(1, math.ceil(s.epochs * steps_per_epoch(n_examples, s, world)))


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int, lengths: tuple | None, group: int) -> tuple:
    """The seeded example order of one epoch. With `lengths`, examples are sorted by length inside windows of
    `group` examples (less padding per micro-batch) and the windows' micro-batches keep a seeded order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    if lengths is None:
        return tuple(order)
    window, grouped = group * 16, []
    for start in range(0, n, window):
        by_length = sorted(order[start:start + window], key=lambda i: -lengths[i])
        chunks = [by_length[i:i + group] for i in range(0, len(by_length), group)]
        for c in torch.randperm(len(chunks), generator=gen).tolist():  # long and short batches interleave
            grouped += chunks[c]
    return tuple(grouped)


def step_micro_batches(step: int, n: int, s, lengths: tuple | None = None, world: int = 1) -> list[list[int]]:
    """Example indices of each micro-batch of step `step`, all ranks together."""
    per_epoch = steps_per_epoch(n, s, world)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(n, s.seed, epoch, lengths, s.micro_batch_size)
    size = examples_per_step(s, world)
    chunk = order[index * size:(index + 1) * size]
    return [list(chunk[i:i + s.micro_batch_size]) for i in range(0, len(chunk), s.micro_batch_size)]


def step_places(micro_batches: list[list[int]]) -> list[list[int]]:
    """Each example's place (0, 1, ...) in the step's global batch, shaped like `micro_batches`."""
    places, at = [], 0
    for mb in micro_batches:
        places.append(list(range(at, at + len(mb))))
        at += len(mb)
    return places


def rank_share(micro_batches: list, rank: int, world: int) -> list[tuple[list, bool]]:
    """This rank's micro-batches as (indices, real). Every rank gets the same number (DDP needs each rank to
    run the same backward passes); a rank short of data at the end of an epoch repeats one of the step's
    micro-batches with `real` False, which the loop weighs by zero."""
    per_rank = math.ceil(len(micro_batches) / world)
    mine = [(mb, True) for mb in micro_batches[rank::world]]
    return mine + [(micro_batches[0], False)] * (per_rank - len(mine))
