"""Golden values for the contrastive losses, against hand computations written here in plain Python floats.

The hand version loops over anchors and candidates with its own dot product and log-sum-exp and shares no code with
the torch module; a masked entry is handled by leaving its column out of the hand sum. Gradients are checked with
torch.autograd.gradcheck (float64) and, for the learned temperature, against a central finite difference of the hand
loss. The sentence-transformers comparison runs its MultipleNegativesRankingLoss on the same embeddings.
"""

from __future__ import annotations

import importlib

import math

import pytest
import torch
import torch.nn.functional as F

from tuneforge.objectives.contrastive_losses import (
    ContrastiveTerms,
    LearnedTemperature,
    false_negative_mask,
    info_nce,
)

TAU = 0.05


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


ANCHORS = unit_rows(3, 4, seed=1)  # (B, D)
CANDIDATES = unit_rows(5, 4, seed=2)  # (C, D): 3 in-batch positives, 2 hard negatives
IN_BATCH = CANDIDATES[:3]


# -- the hand computations -------------------------------------------------------------------------------------

def dot(u: list[float], v: list[float]) -> float:
    return sum(x * y for x, y in zip(u, v))


def log_sum_exp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def hand_losses(anchors, candidates, positive, tau, excluded=frozenset(), symmetric=False) -> list[float]:
    """Per-anchor loss; `excluded` holds the (anchor, candidate) pairs left out (the positive pair never is)."""
    a, c = anchors.tolist(), candidates.tolist()
    out = []
    for b in range(len(a)):
        p = positive[b]
        row = [dot(a[b], c[j]) / tau for j in range(len(c)) if j == p or (b, j) not in excluded]
        loss = log_sum_exp(row) - dot(a[b], c[p]) / tau
        if symmetric:  # b's positive document against every anchor k, unless (k, p) is excluded
            col = [dot(a[k], c[p]) / tau for k in range(len(a)) if k == b or (k, p) not in excluded]
            loss = (loss + log_sum_exp(col) - dot(a[b], c[p]) / tau) / 2
        out.append(loss)
    return out


def margin_excluded(anchors, candidates, positive, margin) -> set[tuple[int, int]]:
    """The GISTEmbed rule by hand, query -> doc only: s[b, j] > s[b, p_b] - margin."""
    a, c = anchors.tolist(), candidates.tolist()
    return {(b, j) for b in range(len(a)) for j in range(len(c))
            if j != positive[b] and dot(a[b], c[j]) > dot(a[b], c[positive[b]]) - margin}


def assert_close_list(actual: torch.Tensor, expected: list[float], tol: float = 1e-10) -> None:
    assert actual.shape == (len(expected),)
    for got, want in zip(actual.tolist(), expected):
        assert got == pytest.approx(want, abs=tol, rel=tol)


# -- values ----------------------------------------------------------------------------------------------------

def test_in_batch_only_matches_hand():
    terms = info_nce(ANCHORS, IN_BATCH, [0, 1, 2], TAU)
    assert isinstance(terms, ContrastiveTerms)
    assert_close_list(terms.losses, hand_losses(ANCHORS, IN_BATCH, [0, 1, 2], TAU))


def test_hard_negatives_and_permuted_positives_match_hand():
    for positive in ([0, 1, 2], [2, 0, 1]):
        terms = info_nce(ANCHORS, CANDIDATES, torch.tensor(positive), TAU)
        assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, positive, TAU))
    with_hard = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU).losses
    assert bool((with_hard > info_nce(ANCHORS, IN_BATCH, [0, 1, 2], TAU).losses).all())  # more negatives, more loss


def test_symmetric_matches_hand():
    for positive in ([0, 1, 2], [1, 2, 0]):
        terms = info_nce(ANCHORS, CANDIDATES, positive, TAU, symmetric=True)
        assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, positive, TAU, symmetric=True))
        one_way = info_nce(ANCHORS, CANDIDATES, positive, TAU).losses
        assert not torch.allclose(terms.losses, one_way)


def test_float_and_tensor_temperature_agree():
    as_float = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], 0.1).losses
    as_tensor = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], torch.tensor(0.1, dtype=torch.float64)).losses
    assert torch.allclose(as_float, as_tensor, atol=1e-12)
    assert_close_list(as_float, hand_losses(ANCHORS, CANDIDATES, [0, 1, 2], 0.1))


def test_metrics_match_hand_and_are_detached():
    anchors, candidates = ANCHORS.clone().requires_grad_(), CANDIDATES.clone().requires_grad_()
    terms = info_nce(anchors, candidates, [0, 1, 2], TAU)
    a, c = ANCHORS.tolist(), CANDIDATES.tolist()
    for b in range(3):
        positive = dot(a[b], c[b])
        hardest = max(dot(a[b], c[j]) for j in range(5) if j != b)
        assert terms.positive_similarity[b].item() == pytest.approx(positive, abs=1e-12)
        assert terms.hardest_negative_similarity[b].item() == pytest.approx(hardest, abs=1e-12)
        assert terms.accuracy[b].item() == float(positive > hardest)
    assert terms.losses.requires_grad
    assert not any(t.requires_grad for t in (terms.accuracy, terms.positive_similarity,
                                             terms.hardest_negative_similarity))


def test_accuracy_counts_only_a_positive_on_top():
    anchors = torch.eye(2, dtype=torch.float64)
    right = info_nce(anchors, anchors.clone(), [0, 1], TAU)  # each anchor's positive is itself: on top
    wrong = info_nce(anchors, anchors.flip(0), [0, 1], TAU)  # each positive is orthogonal, the negative identical
    assert right.accuracy.tolist() == [1.0, 1.0]
    assert wrong.accuracy.tolist() == [0.0, 0.0]
    tie = info_nce(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64), [0, 1], TAU)
    assert tie.accuracy.tolist() == [0.0, 0.0]  # a tie is not a success


# -- masks -----------------------------------------------------------------------------------------------------

# Anchors 0 and 2 share the positive text "p0" (two questions, one answer); anchor 1's own text is also hard
# negative 4 ("q1" mined as a negative of itself); hard negative 3 is unrelated.
ANCHOR_TEXTS = ["q0", "q1", "q2"]
CANDIDATE_TEXTS = ["p0", "p1", " p0\n", "n3", "q1 "]


def test_false_negative_mask_by_hand():
    mask = false_negative_mask(ANCHOR_TEXTS, CANDIDATE_TEXTS, [0, 1, 2])
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [False, False, True, False, False],  # anchor 0: column 2 is its positive's text again
        [False, False, False, False, True],  # anchor 1: column 4 is its own text
        [True, False, False, False, False],  # anchor 2: column 0 is its positive's text, column 2 its own positive
    ]


def test_false_negative_mask_never_marks_the_own_positive():
    # SimCSE unsupervised: the positive IS the anchor's text; a duplicate sentence elsewhere is masked.
    mask = false_negative_mask(["a", "b", "a"], ["a", "b", "a"], [0, 1, 2])
    assert mask.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    assert not bool(mask[torch.arange(3), torch.tensor([0, 1, 2])].any())


def test_masked_duplicate_positive_equals_hand_loss_without_its_column():
    mask = false_negative_mask(ANCHOR_TEXTS, CANDIDATE_TEXTS, [0, 1, 2])
    excluded = {(0, 2), (1, 4), (2, 0)}
    terms = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU, mask=mask)
    assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, [0, 1, 2], TAU, excluded))
    # anchor 0 literally without column 2: the same loss as dropping that candidate from the batch
    without = torch.cat([CANDIDATES[:2], CANDIDATES[3:]])
    assert terms.losses[0].item() == pytest.approx(hand_losses(ANCHORS, without, [0, 1, 2], TAU)[0], abs=1e-10)
    unmasked = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU).losses
    assert bool((terms.losses <= unmasked).all()) and bool((terms.losses < unmasked - 1.0).any())
    hardest = max(dot(ANCHORS[0].tolist(), CANDIDATES[j].tolist()) for j in (1, 3, 4))
    assert terms.hardest_negative_similarity[0].item() == pytest.approx(hardest, abs=1e-12)


def test_symmetric_mask_is_the_transposed_mask_on_the_positives():
    mask = false_negative_mask(ANCHOR_TEXTS, CANDIDATE_TEXTS, [0, 1, 2])
    terms = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU, mask=mask, symmetric=True)
    excluded = {(0, 2), (1, 4), (2, 0)}
    assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, [0, 1, 2], TAU, excluded, symmetric=True))


def test_symmetric_with_an_asymmetric_mask_and_permuted_positives():
    # anchor 0 masks column 2 (anchor 1's positive), anchor 2 masks column 1 (anchor 0's positive) and a hard
    # negative: in the doc -> query rows, doc 2 loses anchor 0 and doc 1 loses anchor 2, not the other way round.
    positive, excluded = [1, 2, 0], {(0, 2), (2, 1), (2, 4)}
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for b, c in excluded:
        mask[b, c] = True
    terms = info_nce(ANCHORS, CANDIDATES, positive, TAU, mask=mask, symmetric=True)
    assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, positive, TAU, excluded, symmetric=True))


def test_a_mask_on_the_positive_is_ignored():
    on_positive = torch.zeros(3, 5, dtype=torch.bool)
    on_positive[[0, 1, 2], [0, 1, 2]] = True
    plain = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU)
    masked = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU, mask=on_positive)
    assert torch.equal(plain.losses, masked.losses)


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_negatives_masked_leaves_only_the_positive(symmetric):
    anchors, candidates = ANCHORS.clone().requires_grad_(), CANDIDATES.clone().requires_grad_()
    terms = info_nce(anchors, candidates, [0, 1, 2], TAU, mask=torch.ones(3, 5, dtype=torch.bool),
                     symmetric=symmetric)
    assert terms.losses.tolist() == [0.0, 0.0, 0.0]
    assert terms.accuracy.tolist() == [1.0, 1.0, 1.0]
    assert terms.hardest_negative_similarity.tolist() == [-math.inf] * 3
    terms.losses.sum().backward()
    assert torch.isfinite(anchors.grad).all() and torch.isfinite(candidates.grad).all()


def test_single_anchor_without_negatives_is_zero_and_finite():
    terms = info_nce(ANCHORS[:1], CANDIDATES[:1], [0], TAU, symmetric=True)
    assert terms.losses.tolist() == [0.0]
    assert terms.hardest_negative_similarity.tolist() == [-math.inf]


@pytest.mark.parametrize("margin", [0.0, 0.3, -0.2])
def test_score_margin_matches_the_hand_rule(margin):
    excluded = margin_excluded(ANCHORS, CANDIDATES, [0, 1, 2], margin)
    assert excluded  # the data gives the rule something to drop at every margin tested
    terms = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU, score_margin=margin)
    assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, [0, 1, 2], TAU, excluded))
    assert not torch.allclose(terms.losses, info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU).losses)


def test_score_margin_symmetric_uses_each_rows_own_positive():
    margin, a, c = 0.1, ANCHORS.tolist(), CANDIDATES.tolist()
    expected = []
    for b in range(3):
        positive = dot(a[b], c[b])
        row = [dot(a[b], c[j]) for j in range(5) if j == b or not dot(a[b], c[j]) > positive - margin]
        col = [dot(a[k], c[b]) for k in range(3) if k == b or not dot(a[k], c[b]) > positive - margin]
        expected.append((log_sum_exp([s / TAU for s in row]) + log_sum_exp([s / TAU for s in col])) / 2
                        - positive / TAU)
    terms = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], TAU, symmetric=True, score_margin=margin)
    assert_close_list(terms.losses, expected)


# -- gradients -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_anchors_candidates_and_temperature(symmetric):
    mask = false_negative_mask(ANCHOR_TEXTS, CANDIDATE_TEXTS, [0, 1, 2])
    anchors, candidates = ANCHORS.clone().requires_grad_(), CANDIDATES.clone().requires_grad_()
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def fn(a, c, t):
        return info_nce(a, c, [1, 2, 0], t, mask=mask, symmetric=symmetric).losses

    assert torch.autograd.gradcheck(fn, (anchors, candidates, temperature))


def test_learned_temperature_value_and_gradient_against_finite_difference():
    module = LearnedTemperature(0.05).double()
    assert module().dim() == 0
    assert module().item() == pytest.approx(0.05, rel=1e-6)  # log(20) was stored in float32
    with torch.no_grad():
        module.log_scale.fill_(math.log(12.0))  # temperature 1/12, inside the clip
    loss = info_nce(ANCHORS, CANDIDATES, [0, 1, 2], module(), symmetric=True).losses.sum()
    assert loss.item() == pytest.approx(sum(hand_losses(ANCHORS, CANDIDATES, [0, 1, 2], 1 / 12, symmetric=True)),
                                        rel=1e-10)
    loss.backward()

    def hand(log_scale: float) -> float:
        return sum(hand_losses(ANCHORS, CANDIDATES, [0, 1, 2], math.exp(-log_scale), symmetric=True))

    h = 1e-6
    finite_difference = (hand(math.log(12.0) + h) - hand(math.log(12.0) - h)) / (2 * h)
    assert module.log_scale.grad.item() == pytest.approx(finite_difference, rel=1e-6)
    assert abs(finite_difference) > 1e-3


def test_learned_temperature_is_clipped_at_scale_100():
    module = LearnedTemperature(0.05).double()
    with torch.no_grad():
        module.log_scale.fill_(math.log(400.0))
    assert module().item() == pytest.approx(0.01, rel=1e-12)
    info_nce(ANCHORS, CANDIDATES, [0, 1, 2], module()).losses.sum().backward()
    assert module.log_scale.grad.item() == 0.0
    assert LearnedTemperature(0.01)().item() == pytest.approx(0.01, rel=1e-6)  # the bound itself is allowed


# -- the same mathematics as sentence-transformers --------------------------------------------------------------

def test_mean_equals_cross_entropy_on_scaled_cosine():
    # What MultipleNegativesRankingLoss computes: cross_entropy(scale * cos_sim(anchors, candidates), arange(B)).
    g = torch.Generator().manual_seed(7)
    raw_a, raw_c = torch.randn(4, 6, generator=g), torch.randn(7, 6, generator=g)
    a, c = F.normalize(raw_a, dim=1), F.normalize(raw_c, dim=1)
    reference = F.cross_entropy(20.0 * a @ c.T, torch.arange(4))
    assert info_nce(a, c, torch.arange(4)).losses.mean().item() == pytest.approx(reference.item(), abs=1e-6)


def test_mean_equals_sentence_transformers_multiple_negatives_ranking_loss():
    # sentence-transformers' own loss on precomputed embeddings, through its public compute_loss_from_embeddings
    # (the model is only used by forward(), so a dummy module stands in). It normalises (cos_sim) itself.
    # a test dependency (pyproject test extra): imported, never skipped
    mnrl = importlib.import_module("sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking")
    g = torch.Generator().manual_seed(11)
    queries, positives, negatives = (torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a = F.normalize(queries, dim=1)
    cases = [
        ({}, [positives], False),
        ({}, [positives, negatives], False),
        ({"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
         [positives, negatives], True),
    ]
    for kwargs, docs, symmetric in cases:
        loss_fn = mnrl.MultipleNegativesRankingLoss(torch.nn.Identity(), scale=20.0, **kwargs)
        theirs = loss_fn.compute_loss_from_embeddings([queries, *docs], labels=None)
        c = F.normalize(torch.cat(docs), dim=1)
        ours = info_nce(a, c, torch.arange(4), 0.05, symmetric=symmetric).losses.mean()
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ({"anchors": ANCHORS[0]}, "2-dim"),
    ({"candidates": CANDIDATES[:, :3]}, "D = 4"),
    ({"candidates": CANDIDATES[:2]}, "C >= B"),
    ({"candidates": CANDIDATES.float()}, "float32"),
    ({"anchors": ANCHORS[:0], "positive_index": []}, "no anchors"),
    ({"positive_index": [0, 1]}, "shape"),
    ({"positive_index": [0, 1, 3]}, r"\[0, B\)"),
    ({"positive_index": [0, -1, 2]}, r"\[0, B\)"),
    ({"positive_index": [0.0, 1.0, 2.0]}, "integers"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -0.05}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": torch.tensor([0.05])}, "0-dim"),
    ({"mask": torch.zeros(3, 4, dtype=torch.bool)}, "mask"),
    ({"mask": torch.zeros(3, 5)}, "mask"),
    ({"score_margin": math.nan}, "score_margin"),
    ({"positive_index": [0, 0, 2], "symmetric": True}, "repeats"),
])
def test_bad_input_raises(case, message):
    args = {"anchors": ANCHORS, "candidates": CANDIDATES, "positive_index": [0, 1, 2], "temperature": TAU}
    args.update(case)
    with pytest.raises(ValueError, match=message):
        info_nce(**args)


def test_repeated_positive_is_fine_one_way():
    terms = info_nce(ANCHORS, CANDIDATES, [0, 0, 2], TAU)
    assert_close_list(terms.losses, hand_losses(ANCHORS, CANDIDATES, [0, 0, 2], TAU))


def test_bad_false_negative_mask_and_temperature_module_input_raise():
    with pytest.raises(ValueError, match="C >= B"):
        false_negative_mask(["a", "b"], ["a"], [0, 1])
    with pytest.raises(ValueError, match=r"\[0, B\)"):
        false_negative_mask(["a", "b"], ["a", "b"], [0, 2])
    with pytest.raises(ValueError, match="strings"):
        false_negative_mask(["a", None], ["a", "b"], [0, 1])
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            LearnedTemperature(bad)
    with pytest.raises(ValueError, match="max_scale"):
        LearnedTemperature(0.005)
