"""Which examples each step and each rank sees: a pure function of step, seed and batch shape."""

from __future__ import annotations

from types import SimpleNamespace

from tuneforge.train.data_order import rank_share, step_micro_batches, total_steps


def _settings(micro, accum, seed=3):
    return SimpleNamespace(micro_batch_size=micro, grad_accum=accum, seed=seed, max_steps=None, epochs=1.0)


def test_ranks_split_a_step_without_overlap_into_what_one_rank_sees():
    n = 37  # not a multiple of the global batch: the last step is short
    one, two = _settings(2, 4), _settings(2, 2)
    assert total_steps(n, one, 1) == total_steps(n, two, 2) == 5
    for step in range(5):
        single = step_micro_batches(step, n, one, world=1)
        both = step_micro_batches(step, n, two, world=2)
        assert both == single  # the same micro-batches, in the same order
        shares = [rank_share(both, r, 2) for r in range(2)]
        assert len(shares[0]) == len(shares[1])  # every rank runs as many backward passes
        real = [i for share in shares for mb, is_real in share if is_real for i in mb]
        assert sorted(real) == sorted(i for mb in single for i in mb)  # no example twice, none left out
    seen = [i for step in range(5) for mb in step_micro_batches(step, n, one) for i in mb]
    assert sorted(seen) == list(range(n))


def test_a_rank_short_of_data_repeats_a_micro_batch_marked_not_real():
    share = rank_share([[0, 1], [2, 3], [4]], rank=1, world=2)
    assert share == [([2, 3], True), ([0, 1], False)]
