"""Hard-negative mining: the positive, a duplicate-text positive and near-duplicates above the relative margin are
skipped; widening, running out of corpus, chunking, bad input.

Embeddings are built so that every score is exact: the anchor is (1, 0) and a document (s, y) scores s.
"""

from __future__ import annotations

import random

import pytest
import torch

from tuneforge.data.mining import mine_hard_negatives


def docs(*scores: float) -> torch.Tensor:
    """Documents scoring `scores` against the anchor (1, 0); the second dim only makes them distinct."""
    return torch.tensor([[s, 0.1 * i] for i, s in enumerate(scores)], dtype=torch.float64)


ANCHOR = torch.tensor([[1.0, 0.0]], dtype=torch.float64)


def test_skips_the_positive_and_candidates_above_the_margin():
    # positive doc 0 scores 0.8; margin 0.05 -> threshold 0.76: doc 1 (0.9) and doc 2 (0.77, just above) are
    # skipped, doc 3 (0.75, just below) is the hardest negative kept.
    corpus = docs(0.8, 0.9, 0.77, 0.75, 0.3, 0.5)
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=3) == [[3, 5, 4]]
    # margin 0: only candidates scoring above the positive itself go (doc 1); 0.77 is kept
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=3, relative_margin=0.0) == [[2, 3, 5]]
    # a wider margin, 0.2 -> threshold 0.64: 0.75 goes too
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=3, relative_margin=0.2) == [[5, 4]]


def test_skips_a_duplicate_text_of_the_positive():
    corpus = docs(0.8, 0.6, 0.5, 0.4)
    texts = ["the answer", "other", " the answer ", "third"]  # doc 2 is the positive under another index
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=2) == [[1, 2]]
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=2, corpus_texts=texts) == [[1, 3]]
    # explicit positive texts win over corpus_texts[positive_index]
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=2, corpus_texts=texts, positive_texts=["other\n"]) == [[2, 3]]


def test_negative_positive_score_still_skips_candidates_scoring_like_the_positive():
    # positive scores -0.5 -> threshold -0.5 - 0.05 * 0.5 = -0.525: -0.51 is skipped, -0.6 kept
    corpus = docs(-0.5, -0.51, -0.6)
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=2) == [[2]]


def test_widens_when_many_candidates_are_skipped_and_stops_when_the_corpus_runs_out():
    # 40 near-duplicates above the threshold before the first real negative: the first pass (depth 2k = 4)
    # finds nothing and must widen.
    corpus = docs(0.8, *[0.79] * 40, 0.1, 0.2, 0.3)
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=2) == [[43, 42]]
    assert mine_hard_negatives(ANCHOR, corpus, [0], k=5) == [[43, 42, 41]]  # only 3 qualify


def reference_mining(anchors, corpus, positive_index, k, margin):
    out = []
    for q, p in zip(anchors.tolist(), positive_index):
        scores = [sum(a * b for a, b in zip(q, d)) for d in corpus.tolist()]
        threshold = scores[p] - margin * abs(scores[p])
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        out.append([j for j in order if j != p and scores[j] <= threshold][:k])
    return out


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_many_anchors_match_a_brute_force_reference_for_any_chunk(chunk):
    rng = random.Random(0)
    corpus = torch.tensor([[rng.randint(-4, 4) / 4 for _ in range(3)] for _ in range(60)], dtype=torch.float64)
    anchors = torch.tensor([[rng.randint(-4, 4) / 4 for _ in range(3)] for _ in range(11)], dtype=torch.float64)
    positive_index = [rng.randrange(60) for _ in range(11)]
    got = mine_hard_negatives(anchors, corpus, positive_index, k=7, relative_margin=0.1, chunk=chunk)
    assert got == reference_mining(anchors, corpus, positive_index, 7, 0.1)


def test_rejects_bad_input():
    corpus = docs(0.8, 0.5, 0.4)
    for kwargs, message in [(dict(k=0), "k must be"), (dict(k=1, relative_margin=1.0), "relative_margin"),
                            (dict(k=1, relative_margin=-0.1), "relative_margin"),
                            (dict(k=1, positive_texts=["x"]), "without corpus_texts"),
                            (dict(k=1, corpus_texts=["a", "b"]), "2 corpus texts for 3"),
                            (dict(k=1, corpus_texts=["a", "b", "c"], positive_texts=[]), "0 positive texts")]:
        with pytest.raises(ValueError, match=message):
            mine_hard_negatives(ANCHOR, corpus, [0], **kwargs)
    with pytest.raises(ValueError, match="positive index"):
        mine_hard_negatives(ANCHOR, corpus, [3], k=1)
    with pytest.raises(ValueError, match="2 positive indices for 1 anchors"):
        mine_hard_negatives(ANCHOR, corpus, [0, 1], k=1)
    with pytest.raises(ValueError, match="dims"):
        mine_hard_negatives(torch.ones(1, 3, dtype=torch.float64), corpus, [0], k=1)
