"""Retrieval evaluation for embedding models: top-k ranking by similarity, recall / MRR / nDCG, Spearman.

Pure functions on tensors and lists; no model code (the contrastive method embeds the texts and calls these).

Conventions (Q queries, N corpus documents, D embedding dims):
- `queries` (Q, D), `corpus` (N, D): embeddings; the score of a pair is their dot product, so callers normalise
  the rows first for cosine similarity.
- `ranked` (Q, K): corpus indices, best first. An entry < 0 means "no document": `evaluate_retrieval` pads
  with -1 when the corpus has fewer than K documents, so that @10 metrics still count every document ranked.
- `relevant`: one set of corpus indices per query (binary relevance), never empty.
- Ties in score are broken by the lower corpus index, so a ranking does not depend on the chunk size or on the
  order in which torch.topk happens to return equal values.

Metrics (Manning, Raghavan & Schuetze 2008, "Introduction to Information Retrieval", ch. 8; nDCG from
Jaervelin & Kekaelaeinen 2002, "Cumulated gain-based evaluation of IR techniques"), each averaged over queries:
- recall@k: the share of the query's relevant documents found in its top k (with one relevant document, the
  hit rate).
- mrr@10: 1 / rank of the first relevant document in the top 10, 0 when there is none.
- ndcg@10: DCG = sum over the top 10 of rel_i / log2(i + 1) (rank i from 1, rel_i in {0, 1}), divided by the
  ideal DCG, that of min(|relevant|, 10) relevant documents at the top.
"""

from __future__ import annotations

import math

import torch

CUTOFF = 10  # the rank cut-off of mrr@10 and ndcg@10


# -- ranking ---------------------------------------------------------------------------------------------------

def check_embeddings(queries: torch.Tensor, corpus: torch.Tensor, what: str = "similarity_ranking") -> None:
    """ValueError unless both are non-empty finite float (rows, D) tensors of the same D (`what` names the caller)."""
    for name, t in (("queries", queries), ("corpus", corpus)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what}: {name} must be a 2-D tensor (rows, dims), got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{what}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{what}: {name} is empty (0 rows)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {name} has a NaN or infinite entry (a broken embedding)")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"{what}: queries have {queries.shape[1]} dims but the corpus has {corpus.shape[1]}")


def _top_k_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row of `scores` (c, N), ties broken by the lower column index.

    torch.topk does not say which of several equal values it returns, so it only finds the k-th largest value;
    every column at least that large is a candidate (k of them unless values tie at the boundary), and the
    candidates are ordered by (score descending, index ascending) with a stable sort of a few columns."""
    n = scores.shape[1]
    kth = scores.topk(k, dim=1).values[:, -1:]  # (c, 1)
    candidate = scores >= kth  # (c, N), at least k per row
    width = int(candidate.sum(dim=1).max())
    # The candidates of each row in ascending column order: the largest keys N - j, the others keyed 0.
    order_key = torch.where(candidate, torch.arange(n, 0, -1, device=scores.device), 0)  # (c, N)
    columns = order_key.topk(width, dim=1).indices  # (c, width)
    picked = scores.gather(1, columns).masked_fill(~candidate.gather(1, columns), -math.inf)
    picked, pos = picked.sort(dim=1, descending=True, stable=True)  # equal scores keep ascending columns
    return picked[:, :k], columns.gather(1, pos)[:, :k]


def similarity_ranking(queries: torch.Tensor, corpus: torch.Tensor, k: int,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The k corpus rows with the largest dot product with each query: (scores (Q, k), indices (Q, k)), best
    first, ties broken by the lower corpus index.

    Queries are scored `chunk` at a time, so memory is O(chunk x N) whatever Q is. Raises ValueError for
    non-2-D, empty, non-finite or mismatched embeddings, k outside 1..N, or chunk < 1."""
    check_embeddings(queries, corpus)
    n = corpus.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"similarity_ranking: k must be an int in 1..{n} (the corpus size), got {k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"similarity_ranking: chunk must be an int >= 1, got {chunk!r}")
    all_scores, all_indices = [], []
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start:start + chunk] @ corpus.T  # (c, N)
        top_scores, top_indices = _top_k_stable(scores, k)
        all_scores.append(top_scores)
        all_indices.append(top_indices)
    return torch.cat(all_scores), torch.cat(all_indices)


# -- metrics ---------------------------------------------------------------------------------------------------

def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"retrieval metrics: ks must be a non-empty sequence of ints >= 1, got {ks!r}")
    return ks


def _check_ranked(ranked: torch.Tensor, relevant: list[set[int]], width: int) -> None:
    if not isinstance(ranked, torch.Tensor) or ranked.dim() != 2 or ranked.is_floating_point():
        shape = tuple(ranked.shape) if isinstance(ranked, torch.Tensor) else type(ranked).__name__
        raise ValueError(f"retrieval_metrics: ranked must be a 2-D integer tensor (Q, K) of corpus indices, "
                         f"got {shape}")
    q, k = ranked.shape
    if q == 0:
        raise ValueError("retrieval_metrics: no queries (ranked has 0 rows)")
    if k < width:
        raise ValueError(f"retrieval_metrics: ranked has K = {k} columns, but the metrics need the top "
                         f"{width} (max(ks) and the @{CUTOFF} of mrr/ndcg); rank deeper")
    if len(relevant) != q:
        raise ValueError(f"retrieval_metrics: {len(relevant)} relevant sets for {q} queries (one per query)")
    for i, rel in enumerate(relevant):
        if not rel:
            raise ValueError(f"retrieval_metrics: query {i} has no relevant document; its recall is undefined "
                             "(drop the query, or give it its positive)")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in rel):
            raise ValueError(f"retrieval_metrics: query {i}'s relevant set must hold corpus indices >= 0, "
                             f"got {sorted(rel, key=repr)!r}")
    top = ranked[:, :width].sort(dim=1).values
    repeated = (top[:, 1:] == top[:, :-1]) & (top[:, 1:] >= 0)  # (Q, width - 1)
    if bool(repeated.any()):
        i = int(repeated.any(dim=1).nonzero()[0])
        raise ValueError(f"retrieval_metrics: query {i} ranks a corpus index twice in its top {width} "
                         "(it would count twice as a hit)")


def retrieval_metrics(ranked: torch.Tensor, relevant: list[set[int]], ks=(1, 5, 10)) -> dict[str, float]:
    """recall@k for each k in ks, mrr@10 and ndcg@10 of a ranking (see the module docstring), averaged over
    queries. Keys "recall@{k}", "mrr@10", "ndcg@10".

    Raises ValueError when ranked has fewer than max(max(ks), 10) columns, when a query has no relevant
    document, on a repeated index in a query's top ranks, or when len(relevant) != Q."""
    ks = _check_ks(ks)
    width = max(max(ks), CUTOFF)
    _check_ranked(ranked, relevant, width)
    rows = ranked[:, :width].tolist()
    hits = torch.tensor([[d in rel for d in row] for row, rel in zip(rows, relevant)],
                        dtype=torch.float64)  # (Q, width), 1 where the document at that rank is relevant
    n_relevant = torch.tensor([len(rel) for rel in relevant], dtype=torch.float64)  # (Q,)
    metrics = {f"recall@{k}": float((hits[:, :k].sum(dim=1) / n_relevant).mean()) for k in ks}

    top = hits[:, :CUTOFF]  # (Q, 10)
    ranks = torch.arange(1, CUTOFF + 1, dtype=torch.float64)  # (10,), rank i from 1
    first = torch.where(top.any(dim=1), top.argmax(dim=1).to(torch.float64) + 1, math.inf)  # (Q,) first hit
    metrics[f"mrr@{CUTOFF}"] = float((1.0 / first).mean())
    discount = 1.0 / torch.log2(ranks + 1)  # (10,)
    dcg = (top * discount).sum(dim=1)  # (Q,)
    ideal = torch.cumsum(discount, 0)[n_relevant.clamp(max=CUTOFF).long() - 1]  # (Q,) min(|rel|, 10) at the top
    metrics[f"ndcg@{CUTOFF}"] = float((dcg / ideal).mean())
    return metrics


def evaluate_retrieval(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor,
                       relevant: list[set[int]], ks=(1, 5, 10)) -> dict:
    """Rank the corpus for each query (similarity_ranking) and score the ranking (retrieval_metrics).

    Returns the metrics plus "queries": Q and "corpus": N. A corpus smaller than the deepest cut-off is ranked
    whole and padded with "no document", so recall@10 of a 6-document corpus counts all 6. Raises ValueError as
    the two functions do, and for a relevant index outside the corpus."""
    ks = _check_ks(ks)
    check_embeddings(query_embeddings, corpus_embeddings, "evaluate_retrieval")
    q, n = query_embeddings.shape[0], corpus_embeddings.shape[0]
    for i, rel in enumerate(relevant):
        outside = [d for d in rel if isinstance(d, int) and d >= n]
        if outside:
            raise ValueError(f"evaluate_retrieval: query {i}'s relevant index {outside[0]} is outside the corpus "
                             f"of {n} documents")
    width = max(max(ks), CUTOFF)
    _, ranked = similarity_ranking(query_embeddings, corpus_embeddings, min(width, n))
    if n < width:
        ranked = torch.cat([ranked, ranked.new_full((q, width - n), -1)], dim=1)  # (Q, width)
    return {**retrieval_metrics(ranked, relevant, ks), "queries": q, "corpus": n}


# -- rank correlation ------------------------------------------------------------------------------------------

def _average_ranks(values: list[float]) -> list[float]:
    """Ranks from 1, equal values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (ties share their mean rank,
    as in scipy.stats.spearmanr). Raises ValueError for lists of different lengths, fewer than 2 items, a
    non-finite value, or a constant list (no ranking, the correlation is undefined)."""
    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"spearman: x has {len(x)} items but y has {len(y)}")
    if len(x) < 2:
        raise ValueError(f"spearman: needs at least 2 items, got {len(x)}")
    for name, values in (("x", x), ("y", y)):
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"spearman: {name} has a NaN or infinite value")
        if min(values) == max(values):
            raise ValueError(f"spearman: {name} is constant, so its ranks carry no order (correlation undefined)")
    rx, ry = _average_ranks(x), _average_ranks(y)
    mean = (len(x) + 1) / 2  # the mean of ranks 1..n, ties or not
    dx, dy = [r - mean for r in rx], [r - mean for r in ry]
    cov = math.fsum(a * b for a, b in zip(dx, dy))
    rho = cov / math.sqrt(math.fsum(a * a for a in dx) * math.fsum(b * b for b in dy))
    return max(-1.0, min(1.0, rho))


# -- the held-out corpus ---------------------------------------------------------------------------------------

def corpus_from_pairs(anchors: list[str], positives: list[str]) -> tuple[list[str], list[set[int]]]:
    """The candidate corpus of held-out (anchor, positive) pairs: their positives, stripped and deduplicated by
    exact text (first appearance order), and for each anchor the set of corpus indices equal to its positive
    (a single index, since the corpus has no duplicates). Raises ValueError for lists of different lengths,
    no pairs, a non-string entry, or a positive that is empty after strip."""
    if len(anchors) != len(positives):
        raise ValueError(f"corpus_from_pairs: {len(anchors)} anchors but {len(positives)} positives")
    if not anchors:
        raise ValueError("corpus_from_pairs: no pairs")
    index: dict[str, int] = {}
    relevant: list[set[int]] = []
    for i, (anchor, positive) in enumerate(zip(anchors, positives)):
        if not isinstance(anchor, str) or not isinstance(positive, str):
            raise ValueError(f"corpus_from_pairs: pair {i} is not two strings "
                             f"({type(anchor).__name__}, {type(positive).__name__})")
        text = positive.strip()
        if not text:
            raise ValueError(f"corpus_from_pairs: pair {i} has an empty positive")
        relevant.append({index.setdefault(text, len(index))})
    return list(index), relevant
