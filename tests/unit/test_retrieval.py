"""Retrieval metrics: hand-worked rankings, ties to the lower index, chunking, Spearman against scipy."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tuneforge.eval.retrieval import (
    corpus_from_pairs,
    evaluate_retrieval,
    retrieval_metrics,
    similarity_ranking,
    spearman,
)


def brute_force_ranking(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> list[list[int]]:
    """Sort every document by (score descending, index ascending) in plain Python."""
    out = []
    for q in queries.tolist():
        scores = [sum(a * b for a, b in zip(q, d)) for d in corpus.tolist()]
        out.append(sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k])
    return out


def grid_embeddings(rows: int, dims: int, seed: int) -> torch.Tensor:
    """Entries in {-1, -0.5, 0, 0.5, 1}: dot products are exact in float32 and ties are frequent."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (rows, dims), generator=g).float() / 2


# -- similarity_ranking ----------------------------------------------------------------------------------------

def test_ranking_hand_example():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    corpus = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0], [2.0, 2.0]])
    # query 0 scores: 3, 1, 0, 2 -> docs 0, 3, 1; query 1 scores: 0, 2, -2, 4 -> docs 3, 1, 0
    scores, indices = similarity_ranking(queries, corpus, k=3)
    assert indices.tolist() == [[0, 3, 1], [3, 1, 0]]
    assert scores.tolist() == [[3.0, 2.0, 1.0], [4.0, 2.0, 0.0]]


def test_ties_go_to_the_lower_corpus_index():
    # 300 identical documents plus one better one at the end: topk alone returns the tied ones in no fixed order.
    corpus = torch.cat([torch.ones(300, 2), torch.tensor([[5.0, 5.0]])])
    scores, indices = similarity_ranking(torch.ones(3, 2), corpus, k=6)
    assert indices.tolist() == [[300, 0, 1, 2, 3, 4]] * 3
    assert scores[:, 1:].eq(2.0).all()
    # a tie straddling the k-th place: scores 1, 2, 2, 2, 0 with k = 2 keep docs 1 and 2
    corpus = torch.tensor([[1.0], [2.0], [2.0], [2.0], [0.0]])
    assert similarity_ranking(torch.ones(1, 1), corpus, k=2)[1].tolist() == [[1, 2]]


@pytest.mark.parametrize("chunk", [1, 4, 37, 1000])
def test_chunking_gives_the_single_chunk_result_and_the_brute_force_order(chunk):
    queries, corpus = grid_embeddings(37, 3, seed=0), grid_embeddings(50, 3, seed=1)
    one_scores, one_indices = similarity_ranking(queries, corpus, k=12, chunk=1024)
    scores, indices = similarity_ranking(queries, corpus, k=12, chunk=chunk)
    assert torch.equal(indices, one_indices) and torch.equal(scores, one_scores)
    assert indices.tolist() == brute_force_ranking(queries, corpus, 12)


def test_ranking_rejects_bad_input():
    q, c = torch.ones(2, 3), torch.ones(4, 3)
    for bad in [dict(k=0), dict(k=5), dict(k=2, chunk=0), dict(k=2.0)]:
        with pytest.raises(ValueError, match="similarity_ranking"):
            similarity_ranking(q, c, **bad)
    with pytest.raises(ValueError, match="dims"):
        similarity_ranking(torch.ones(2, 2), c, k=1)
    with pytest.raises(ValueError, match="2-D"):
        similarity_ranking(torch.ones(3), c, k=1)
    with pytest.raises(ValueError, match="NaN"):
        similarity_ranking(q, torch.tensor([[0.0, float("nan"), 0.0]]), k=1)
    with pytest.raises(ValueError, match="floating"):
        similarity_ranking(q.long(), c, k=1)
    with pytest.raises(ValueError, match="empty"):
        similarity_ranking(torch.ones(0, 3), c, k=1)


# -- retrieval_metrics -----------------------------------------------------------------------------------------

def test_metrics_hand_example():
    ranked = torch.tensor([
        [3, 0, 1, 2, 4, 5, 6, 7, 8, 9],   # relevant {3} at rank 1
        [0, 2, 1, 4, 5, 6, 8, 7, 9, 10],  # relevant {2, 7} at ranks 2 and 8
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],   # relevant {11} not in the top 10
    ])
    relevant = [{3}, {2, 7}, {11}]
    m = retrieval_metrics(ranked, relevant)
    assert list(m) == ["recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    # recall@1: (1 + 0 + 0) / 3; recall@5: (1 + 1/2 + 0) / 3; recall@10: (1 + 2/2 + 0) / 3
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(0.5)
    assert m["recall@10"] == pytest.approx(2 / 3)
    # MRR: (1/1 + 1/2 + 0) / 3
    assert m["mrr@10"] == pytest.approx(0.5)
    # nDCG: query 0 is perfect (1); query 1 has DCG 1/log2(3) + 1/log2(9) over ideal 1/log2(2) + 1/log2(3)
    # = 0.94639 / 1.63093 = 0.58028; query 2 scores 0. Mean 0.52676.
    q1 = (1 / math.log2(3) + 1 / math.log2(9)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((1 + q1 + 0) / 3)
    assert m["ndcg@10"] == pytest.approx(0.52676, abs=1e-5)


def test_ideal_dcg_counts_at_most_ten_relevant_documents():
    ranked = torch.arange(10).unsqueeze(0)
    m = retrieval_metrics(ranked, [set(range(12))])  # 12 relevant, the top 10 all relevant
    assert m["ndcg@10"] == pytest.approx(1.0)
    assert m["recall@10"] == pytest.approx(10 / 12)
    assert m["recall@1"] == pytest.approx(1 / 12)
    assert m["mrr@10"] == 1.0


def test_metrics_keys_follow_ks_and_ranks_beyond_ten():
    ranked = torch.arange(20).unsqueeze(0)
    m = retrieval_metrics(ranked, [{15}], ks=(3, 20))
    assert m == {"recall@3": 0.0, "recall@20": 1.0, "mrr@10": 0.0, "ndcg@10": 0.0}


def test_metrics_reject_bad_input():
    ranked = torch.arange(10).repeat(2, 1)
    with pytest.raises(ValueError, match="K = 9"):
        retrieval_metrics(ranked[:, :9], [{1}, {2}])
    with pytest.raises(ValueError, match="top 20"):
        retrieval_metrics(ranked, [{1}, {2}], ks=(1, 20))
    with pytest.raises(ValueError, match="query 1 has no relevant"):
        retrieval_metrics(ranked, [{1}, set()])
    with pytest.raises(ValueError, match="1 relevant sets for 2 queries"):
        retrieval_metrics(ranked, [{1}])
    with pytest.raises(ValueError, match="twice"):
        retrieval_metrics(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 0]]), [{0}])
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(ranked, [{1}, {2}], ks=())
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(ranked.float(), [{1}, {2}])


# -- evaluate_retrieval ----------------------------------------------------------------------------------------

def test_evaluate_matches_ranking_plus_metrics():
    queries, corpus = grid_embeddings(9, 4, seed=2), grid_embeddings(30, 4, seed=3)
    relevant = [{i, (3 * i) % 30} for i in range(9)]
    _, ranked = similarity_ranking(queries, corpus, k=10)
    result = evaluate_retrieval(queries, corpus, relevant)
    assert result == {**retrieval_metrics(ranked, relevant), "queries": 9, "corpus": 30}


def test_evaluate_on_a_corpus_smaller_than_ten():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corpus = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    # query 0 ranks 0, 1, 3 (score 1, lower index first), then 2, 4; its relevant doc 1 is at rank 2.
    # query 1 ranks 2, 3, 0, 1, 4; its relevant doc 2 is at rank 1. All 5 docs are within the top 10.
    m = evaluate_retrieval(queries, corpus, [{1}, {2}])
    assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0 and m["recall@10"] == 1.0
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert (m["queries"], m["corpus"]) == (2, 5)
    with pytest.raises(ValueError, match="outside the corpus"):
        evaluate_retrieval(queries, corpus, [{1}, {5}])


# -- spearman --------------------------------------------------------------------------------------------------

def test_spearman_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4 -> deviations (-1.5, 0, 0, 1.5), (-1.5, 0.5, -0.5, 1.5):
    # cov 4.5, |dx|^2 4.5, |dy|^2 5 -> 4.5 / sqrt(22.5) = 0.948683
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_scipy_with_and_without_ties(seed):
    from scipy import stats  # installed with sentence-transformers, a test dependency
    rng = random.Random(seed)
    n = rng.randint(3, 40)
    if seed % 2:  # heavy ties
        x, y = [rng.randint(0, 4) for _ in range(n)], [rng.randint(0, 3) for _ in range(n)]
    else:
        x, y = [rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
    if len(set(x)) < 2 or len(set(y)) < 2:
        x[0], y[0] = x[0] + 10, y[0] + 10  # never constant
    assert spearman(x, y) == pytest.approx(float(stats.spearmanr(x, y).statistic), abs=1e-12)


def test_spearman_rejects_bad_input():
    for x, y, message in [([1.0], [2.0], "at least 2"), ([1, 2, 3], [1, 2], "3 items"),
                          ([1, 1, 1], [1, 2, 3], "x is constant"), ([1, 2], [5, 5], "y is constant"),
                          ([1, float("nan")], [1, 2], "NaN"), ([], [], "at least 2")]:
        with pytest.raises(ValueError, match=message):
            spearman(x, y)


# -- corpus_from_pairs -----------------------------------------------------------------------------------------

def test_corpus_from_pairs_deduplicates_stripped_positives():
    texts, relevant = corpus_from_pairs(["q0", "q1", "q2", "q3"], [" Paris ", "Rome", "Paris", "paris"])
    assert texts == ["Paris", "Rome", "paris"]  # exact text after strip: case still matters
    assert relevant == [{0}, {1}, {0}, {2}]


def test_corpus_from_pairs_rejects_bad_input():
    with pytest.raises(ValueError, match="2 anchors but 1 positives"):
        corpus_from_pairs(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="no pairs"):
        corpus_from_pairs([], [])
    with pytest.raises(ValueError, match="pair 1 has an empty positive"):
        corpus_from_pairs(["a", "b"], ["x", "  "])
    with pytest.raises(ValueError, match="pair 0 is not two strings"):
        corpus_from_pairs(["a"], [None])
