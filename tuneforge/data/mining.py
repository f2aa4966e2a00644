"""Hard-negative mining for contrastive training: for each anchor, the most similar corpus documents that are
not its positive.

The most similar documents to a query are often unlabelled positives (a paraphrase of the positive, the same
passage from another source); training them away as negatives hurts. NV-Retriever (Moreira et al. 2024,
"NV-Retriever: Improving text embedding models with effective hard-negative mining", sec. 4, "TopK-PercPos")
keeps only candidates scoring below a share of the positive's score: with relative_margin m, a candidate is a
false-negative suspect when sim(q, c) > (1 - m) * sim(q, p), and is skipped.

Conventions (Q anchors, N corpus documents, D dims):
- `anchor_emb` (Q, D), `corpus_emb` (N, D): embeddings, scored by dot product (normalise for cosine).
- `positive_index[q]`: the corpus index of anchor q's positive, which is never returned; with texts, neither is
  any document whose stripped text equals the positive's (a duplicate of it under another index).
- The threshold is sim(q, p) - m * |sim(q, p)|, which is (1 - m) * sim(q, p) for the usual positive score and
  stays below sim(q, p) when the positive scores below 0 (where (1 - m) * sim would admit candidates scoring
  higher than the positive).
- Candidates come in similarity_ranking's order (score descending, ties to the lower index), so the result is
  deterministic and does not depend on the chunk size.
"""

from __future__ import annotations

import torch

from tuneforge.eval.retrieval import check_embeddings, similarity_ranking


def _check_mining_args(anchor_emb, corpus_emb, positive_index, k, relative_margin, corpus_texts,
                       positive_texts) -> None:
    check_embeddings(anchor_emb, corpus_emb, "mine_hard_negatives")
    q, n = anchor_emb.shape[0], corpus_emb.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"mine_hard_negatives: k must be an int >= 1, got {k!r}")
    if not (isinstance(relative_margin, (int, float)) and 0 <= relative_margin < 1):
        raise ValueError(f"mine_hard_negatives: relative_margin must satisfy 0 <= m < 1, got {relative_margin!r}")
    if len(positive_index) != q:
        raise ValueError(f"mine_hard_negatives: {len(positive_index)} positive indices for {q} anchors")
    for i, p in enumerate(positive_index):
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < n:
            raise ValueError(f"mine_hard_negatives: anchor {i}'s positive index must be an int in 0..{n - 1} "
                             f"(a corpus row), got {p!r}")
    if corpus_texts is None and positive_texts is not None:
        raise ValueError("mine_hard_negatives: positive_texts given without corpus_texts (nothing to compare "
                         "them with)")
    if corpus_texts is not None and len(corpus_texts) != n:
        raise ValueError(f"mine_hard_negatives: {len(corpus_texts)} corpus texts for {n} corpus embeddings")
    if positive_texts is not None and len(positive_texts) != q:
        raise ValueError(f"mine_hard_negatives: {len(positive_texts)} positive texts for {q} anchors")


def _thresholds(anchor_emb: torch.Tensor, corpus_emb: torch.Tensor, positive_index: list[int],
                relative_margin: float) -> list[float]:
    """Per anchor, the score above which a candidate is a near-duplicate of the positive."""
    positives = corpus_emb[torch.tensor(positive_index, dtype=torch.long, device=corpus_emb.device)]  # (Q, D)
    sim = (anchor_emb * positives).sum(dim=1).double()  # (Q,)
    return (sim - relative_margin * sim.abs()).tolist()


def _keep(candidates: list[int], scores: list[float], positive: int, threshold: float, k: int,
          texts: list[str] | None, positive_text: str | None) -> list[int]:
    kept = []
    for c, s in zip(candidates, scores):
        if c == positive or s > threshold or (texts is not None and texts[c] == positive_text):
            continue
        kept.append(c)
        if len(kept) == k:
            break
    return kept


def mine_hard_negatives(anchor_emb: torch.Tensor, corpus_emb: torch.Tensor, positive_index: list[int], k: int,
                        relative_margin: float = 0.05, corpus_texts: list[str] | None = None,
                        positive_texts: list[str] | None = None, chunk: int = 1024) -> list[list[int]]:
    """Up to k hard negatives per anchor: corpus indices, most similar first, skipping the positive (by index,
    and by stripped text when corpus_texts are given; positive_texts default to corpus_texts[positive_index])
    and near-duplicates of it (the relative-margin rule, see the module docstring).

    Ranks `chunk` anchors at a time (similarity_ranking); an anchor that loses too many candidates to the rules
    is ranked again with twice the depth, until it has k or the corpus runs out (then it gets fewer than k).
    Raises ValueError for bad embeddings, k < 1, relative_margin outside [0, 1), a positive index outside the
    corpus, or texts whose counts do not match the embeddings."""
    _check_mining_args(anchor_emb, corpus_emb, positive_index, k, relative_margin, corpus_texts, positive_texts)
    n = corpus_emb.shape[0]
    texts = None if corpus_texts is None else [t.strip() for t in corpus_texts]
    if texts is None:
        wanted = [None] * len(positive_index)
    elif positive_texts is None:
        wanted = [texts[p] for p in positive_index]
    else:
        wanted = [t.strip() for t in positive_texts]
    thresholds = _thresholds(anchor_emb, corpus_emb, positive_index, float(relative_margin))

    negatives: list[list[int]] = [[] for _ in positive_index]
    pending = list(range(len(positive_index)))
    depth = min(n, k + max(k, 8))  # room for the positive and a few near-duplicates without a second pass
    while pending:
        rows = torch.tensor(pending, dtype=torch.long, device=anchor_emb.device)
        scores, indices = similarity_ranking(anchor_emb[rows], corpus_emb, depth, chunk)  # (P, depth) each
        still = []
        for i, row_scores, row_indices in zip(pending, scores.double().tolist(), indices.tolist()):
            negatives[i] = _keep(row_indices, row_scores, positive_index[i], thresholds[i], k, texts, wanted[i])
            if len(negatives[i]) < k and depth < n:
                still.append(i)
        pending, depth = still, min(n, 2 * depth)
    return negatives


def mine_for_config(cfg, out_path, k: int = 3, relative_margin: float = 0.05) -> dict:
    """`tuneforge data mine-negatives`: the training pairs of `cfg` (a contrastive config) with k hard negatives
    each, mined with the config's model as it is (the base, before training) among all distinct training
    positives and the documents of `contrastive.corpus`, written as pair JSONL to `out_path` (atomically); a
    pair's score is kept. Returns counts."""
    import json

    from tuneforge.errors import ConfigError
    from tuneforge.fsutil import atomic_write_text
    from tuneforge.models.heads import TrainModule
    from tuneforge.objectives.contrastive import corpus_documents, embed_ids, embed_pairs, new_documents, pair_corpus
    from tuneforge.run import load_model_and_tokenizer, prepare, setup_runtime
    if cfg.method != "contrastive":
        raise ConfigError(f"mine-negatives needs a contrastive config (method: contrastive), not {cfg.method}",
                          key="method")
    device = setup_runtime(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, device)
    data = prepare(cfg, tokenizer)
    texts = [ex.texts for ex in data.train]
    anchors, positives = [t["anchor"] for t in texts], [t["positive"] for t in texts]
    if any(a.strip() == p.strip() for a, p in zip(anchors, positives)):
        raise ConfigError("mine-negatives needs pair records (anchor, positive): text records (SimCSE) have no "
                          "positive to mine around", key="data.train")
    c = cfg.contrastive
    body = TrainModule(model)
    anchor_emb, positive_emb = embed_pairs(body, list(data.train), tokenizer.pad_token_id, c.pooling, c.normalize,
                                           packing=cfg.data.packing)
    corpus, corpus_emb, relevant = pair_corpus(positive_emb, anchors, positives)
    extra = corpus_documents(cfg, tokenizer)
    keep = [] if extra is None else new_documents(corpus, extra[0])
    if keep:
        vectors = embed_ids(body, [extra[1][i] for i in keep], tokenizer.pad_token_id, c.pooling, c.normalize,
                            packing=cfg.data.packing)
        corpus, corpus_emb = corpus + [extra[0][i] for i in keep], torch.cat([corpus_emb, vectors])
    positive_index = [next(iter(r)) for r in relevant]
    mined = mine_hard_negatives(anchor_emb, corpus_emb, positive_index, k, relative_margin, corpus, positives)
    lines = [json.dumps({"anchor": t["anchor"], "positive": t["positive"],
                         "negatives": list(t["negatives"]) + [corpus[j] for j in found],
                         **({"score": t["score"]} if "score" in t else {})}, ensure_ascii=False)
             for t, found in zip(texts, mined)]
    atomic_write_text(out_path, "".join(line + "\n" for line in lines))
    return {"pairs": len(lines), "corpus": len(corpus), "negatives": sum(len(m) for m in mined)}
