"""Contrastive learning of embeddings (method contrastive): InfoNCE over pairs with in-batch and hard negatives.

A batch of pair examples holds, example by example, an anchor, its positive and its hard negatives (role ids
from the pair builder: anchor 0, positive 1, negative 2). Every sequence is embedded (models/embedder.py: pooled,
optionally normalised); the candidates of the batch are all positives, then all hard negatives, so each anchor's
negatives are the other anchors' positives and every hard negative of the batch. The maths is
contrastive_losses.py `info_nce`; candidates whose text equals an anchor's positive (or the anchor) are false
negatives, masked in the loss itself (`false_negative_mask`), so no duplicate-free sampler is needed.

The negative pool is the whole update: train.micro_batch_size x train.grad_accum pairs (this rank's share under
torchrun). With one micro-batch the loss is computed directly. With several, cached mini-batching (GradCache,
Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): `begin_update` embeds
every micro-batch without gradients, computes the loss of the whole update and its gradient with respect to the
embeddings; then `loss` re-embeds with gradients under the same random state (dropout masks identical in both
passes) and back-propagates the surrogate sum(embedding * cached gradient), whose gradient with respect to the
weights is that of the full-update loss. The texts embedded together are not the loader's micro-batches but
`length_groups` of them: every text of the update sorted by length and dealt into as many groups, each with an
even share of the update's tokens (more short texts together than long ones), so that each forward pads less (the
loss and its gradients do not depend on which texts share a forward), the longest texts' group first. Memory is
that of one micro-batch's share of the update's tokens; gradients equal one full-batch pass
(tests/objectives/test_contrastive.py).

Held-out evaluation adds retrieval over the held-out pairs (eval/retrieval.py): each anchor a query, the
held-out positives (deduplicated), plus the documents of `contrastive.corpus` when given, the candidates:
recall@1/5/10, MRR@10, nDCG@10. SimCSE examples (text records: anchor and positive the same text) are left out
of retrieval, which they would pass trivially. Pairs with a `score` also give `spearman`: Spearman's rank
correlation between the score and the cosine similarity of anchor and positive (the STS benchmark's measure).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tuneforge.errors import TuneforgeError
from tuneforge.eval.retrieval import corpus_from_pairs, evaluate_retrieval, spearman
from tuneforge.models.embedder import embed, embedding_layout
from tuneforge.train import distributed as dist
from tuneforge.objectives.base import LossOutput, Objective
from tuneforge.objectives.contrastive_losses import LearnedTemperature, false_negative_mask, info_nce

ANCHOR, POSITIVE, NEGATIVE = 0, 1, 2  # role ids: the pair builder's role order
TEMPERATURE_HEAD = "temperature"


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replay(state: tuple, device: torch.device):
    """Run with the random state `state` (as `_rng_state` took it), then restore the state from before."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def balanced_sizes(lengths: list[int], parts: int) -> list[int]:
    """Sizes of `parts` consecutive groups of ascending `lengths` whose largest cost (rows x longest length: the
    padded tokens that a group's forward holds) is as small as it can be: the smallest budget that a greedy fill
    meets in `parts` groups or fewer (binary search), then the costliest groups halved until there are `parts`."""
    if not 1 <= parts <= len(lengths):
        raise ValueError(f"cannot deal {len(lengths)} rows into {parts} non-empty groups")

    def fill(budget: int) -> list[int]:
        sizes, start = [], 0
        for i, n in enumerate(lengths):
            if (i - start + 1) * n > budget:  # ascending: the newest row is the group's longest
                sizes.append(i - start)
                start = i
        return sizes + [len(lengths) - start]

    low, high = lengths[-1], len(lengths) * lengths[-1]  # one row of the longest; everything in one group
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(fill(mid)) <= parts else (mid + 1, high)
    sizes = fill(low)
    while len(sizes) < parts:
        ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
        k = max((k for k in range(len(sizes)) if sizes[k] > 1), key=lambda k: sizes[k] * lengths[ends[k] - 1])
        sizes[k:k + 1] = [sizes[k] // 2, sizes[k] - sizes[k] // 2]
    return sizes


def length_groups(batches: list[dict], pad_id: int) -> list[dict]:
    """The rows of right-padded `batches`, sorted by length (stable) and dealt into len(batches) groups of
    consecutive lengths with equal padded tokens as near as whole rows allow (`balanced_sizes`: more short texts
    in a group than long ones, so that no group's forward holds more than an even share of the update's tokens):
    each group a right-padded batch (input_ids, attention_mask) cut to its longest row, with `rows` its rows'
    places in the batches' concatenation."""
    width = max(b["input_ids"].shape[1] for b in batches)
    ids = torch.cat([F.pad(b["input_ids"], (0, width - b["input_ids"].shape[1]), value=pad_id) for b in batches])
    mask = torch.cat([F.pad(b["attention_mask"], (0, width - b["attention_mask"].shape[1])) for b in batches])
    lengths = mask.long().sum(1)
    order = torch.argsort(lengths, stable=True)
    groups = []
    for rows in order.split(balanced_sizes(lengths[order].tolist(), len(batches))):
        longest = int(lengths[rows].max())
        groups.append({"input_ids": ids[rows, :longest], "attention_mask": mask[rows, :longest], "rows": rows})
    return groups


class _Parts:
    """One micro-batch's embeddings by role, the texts the false-negative mask compares, the temperature."""

    def __init__(self, batch: dict, vectors: torch.Tensor, temperature):
        role = batch["sequence_role"]
        if not bool((role == ANCHOR).any()) or int((role == ANCHOR).sum()) != int((role == POSITIVE).sum()):
            raise TuneforgeError("method contrastive needs pair data: one anchor and one positive per example "
                                 "(records with anchor, positive, optional negatives)")
        self.anchors = vectors[role == ANCHOR]  # (B, H)
        self.positives = vectors[role == POSITIVE]  # (B, H)
        self.negatives = vectors[role == NEGATIVE]  # (N, H)
        self.temperature = temperature  # a float, or a 0-dim tensor (learned)
        texts = batch["texts"]
        self.texts = ([t["anchor"] for t in texts], [t["positive"] for t in texts],
                      [n for t in texts for n in t["negatives"]])

    def sizes(self) -> tuple[int, int, int]:
        return self.anchors.shape[0], self.positives.shape[0], self.negatives.shape[0]

    def detached(self) -> tuple:
        """(anchors, positives, negatives) on the CPU without gradients, and the texts: what ranks exchange."""
        return tuple(t.detach().cpu() for t in (self.anchors, self.positives, self.negatives)) + (self.texts,)


class ContrastiveObjective(Objective):
    unit = "pairs"

    def __init__(self, pooling: str = "mean", normalize: bool = True, temperature: float = 0.05,
                 symmetric: bool = False, learn_temperature: bool = False, score_margin: float | None = None,
                 corpus: tuple[list[str], list[list[int]]] | None = None, pad_id: int = 0,
                 packing: bool | str = "auto"):
        """`corpus`: (texts, token ids) of extra held-out retrieval candidates (`contrastive_corpus`), embedded
        at each evaluation with rows padded by `pad_id`. `packing` (data.packing): padding-free batches where the
        attention allows (models/embedder.py `embedding_layout`)."""
        self.pooling, self.normalize, self.symmetric = pooling, normalize, symmetric
        self.temperature, self.learn_temperature, self.score_margin = temperature, learn_temperature, score_margin
        self.corpus, self.pad_id, self.packing = corpus, pad_id, packing
        self._cache: dict[int, tuple] = {}

    def _learned(self, tm):
        if TEMPERATURE_HEAD not in tm.heads:
            raise TuneforgeError("contrastive.learn_temperature needs the temperature head (the method's `heads` "
                                 "entry builds it); this model has none")
        return tm.heads[TEMPERATURE_HEAD]()

    def _embed(self, module, batch: dict) -> tuple:
        """(vectors (S, H), temperature) of the rows of a padded batch: a float, or the learned 0-dim tensor."""
        layout = embedding_layout(module, self.packing)
        if not self.learn_temperature:
            return embed(module, batch, self.pooling, self.normalize, layout=layout), self.temperature
        return embed(module, batch, self.pooling, self.normalize, extra=self._learned, layout=layout)

    def _parts(self, module, batch: dict) -> _Parts:
        return _Parts(batch, *self._embed(module, batch))

    def _terms(self, anchors, positives, negatives, texts, temperature):
        candidates = torch.cat([positives, negatives])  # (B + N, H): positives first, then hard negatives
        index = list(range(anchors.shape[0]))
        mask = false_negative_mask(texts[0], texts[1] + texts[2], index)
        return info_nce(anchors, candidates, index, temperature, mask=mask, symmetric=self.symmetric,
                        score_margin=self.score_margin)

    @staticmethod
    def _metrics(terms) -> dict:
        n = float(terms.losses.numel())
        hardest = terms.hardest_negative_similarity
        finite = torch.isfinite(hardest)
        return {"accuracy": (float(terms.accuracy.sum()), n),
                "positive_similarity": (float(terms.positive_similarity.sum()), n),
                "hardest_negative_similarity": (float(hardest[finite].sum()), float(finite.sum()))}

    def begin_update(self, module, micro_batches: list[dict], autocast) -> None:
        """The cached pass (module docstring) when the update has several micro-batches or ranks; else nothing.

        Under torchrun the ranks exchange their (detached) embeddings and texts, so that every rank computes the
        loss of the whole global batch: the negative pool, and the result, are those of one rank."""
        self._cache = {}
        world = dist.world_size()
        if len(micro_batches) < 2 and world == 1:
            return
        device = micro_batches[0]["input_ids"].device
        real_batches = [b for b in micro_batches if b.get("is_real", True)]  # padding adds no pairs
        # the longest texts' group first: each later group's tensors are no larger, so they fit in the memory the
        # earlier ones freed (glibc reuses the holes; ascending, each group's attention outgrew them: +0.4 GB
        # peak at 1024 pairs in 32 groups, measured)
        groups = length_groups(real_batches, self.pad_id)[::-1] if real_batches else []
        states, group_vectors, temperature = [], [], None
        for group in groups:
            states.append(_rng_state(device))
            with torch.no_grad(), autocast():
                vectors, temperature = self._embed(module, group)
            group_vectors.append(vectors)
        if not groups:  # this rank's share of the update is all padding: one pass for the temperature's value
            with torch.no_grad(), autocast():
                temperature = self._embed(module, micro_batches[0])[1]
        sizes = [b["input_ids"].shape[0] for b in real_batches]
        flat = None
        if groups:
            flat = group_vectors[0].new_empty((sum(sizes), group_vectors[0].shape[1]))
            for group, vectors in zip(groups, group_vectors):
                flat[group["rows"]] = vectors
        parts = [_Parts(b, v, temperature) for b, v in zip(real_batches, flat.split(sizes))] if groups else []
        local = [p.detached() for p in parts]
        shares = dist.gather_objects(local) if world > 1 else [local]  # rank order
        everything = [piece for share in shares for piece in share]
        leaves = [torch.cat([piece[k] for piece in everything]).to(device).requires_grad_() for k in range(3)]
        texts = tuple(sum((piece[3][k] for piece in everything), []) for k in range(3))
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.detach().requires_grad_()
        terms = self._terms(*leaves, texts, temperature)
        terms.losses.sum().backward()  # gradients w.r.t. the embeddings and the temperature, not the weights
        # every rank holds the same temperature gradient of the global loss: each of the update's forwards adds
        # its share, so that the sum over micro-batches and ranks (DDP averages, the loop multiplies by ranks) is one
        t_grad = temperature.grad / (len(micro_batches) * world) if isinstance(temperature, torch.Tensor) else None
        offsets = [sum(piece[k].shape[0] for share in shares[:dist.rank()] for piece in share) for k in range(3)]
        row_grads, results = [], []
        for batch, p in zip(real_batches, parts):
            sizes = p.sizes()
            role = batch["sequence_role"]
            grad = leaves[0].new_zeros((role.shape[0], leaves[0].shape[1]))
            for k, (leaf, o, n) in enumerate(zip(leaves, offsets, sizes)):
                grad[role == (ANCHOR, POSITIVE, NEGATIVE)[k]] = leaf.grad[o:o + n]
            row_grads.append(grad)
            a0, b = offsets[0], sizes[0]
            sliced = type(terms)(*(t.detach()[a0:a0 + b] for t in (terms.losses, terms.accuracy,
                                                                    terms.positive_similarity,
                                                                    terms.hardest_negative_similarity)))
            results.append((float(sliced.losses.sum()), self._metrics(sliced)))
            offsets = [o + n for o, n in zip(offsets, sizes)]
        flat_grad = torch.cat(row_grads) if row_grads else None
        for batch, state, group, (value, metrics) in zip(real_batches, states, groups, results):
            self._cache[id(batch)] = (state, group, flat_grad[group["rows"]], t_grad, value, metrics)
        for batch in micro_batches:
            if not batch.get("is_real", True):  # its own rows again, weighed by zero: every rank runs every forward
                self._cache[id(batch)] = (_rng_state(device), batch, torch.zeros((), device=device), t_grad, 0.0, {})

    def loss(self, module, batch: dict) -> LossOutput:
        cached = self._cache.pop(id(batch), None)
        if cached is None:
            p = self._parts(module, batch)
            terms = self._terms(p.anchors, p.positives, p.negatives, p.texts, p.temperature)
            return LossOutput(terms.losses.sum(), float(terms.losses.numel()), self._metrics(terms))
        state, group, grads, t_grad, value, metrics = cached
        with _replay(state, batch["input_ids"].device):  # the dropout masks of the cached pass
            vectors, temperature = self._embed(module, group)  # this micro-batch's length group, not its own rows
        surrogate = (vectors * grads).sum()
        if t_grad is not None:
            surrogate = surrogate + temperature * t_grad
        count = float((batch["sequence_role"] == ANCHOR).sum()) if batch.get("is_real", True) else 0.0
        if not metrics:  # a padding micro-batch: the same metric names, counted as nothing
            metrics = {k: (0.0, 0.0) for k in ("accuracy", "positive_similarity", "hardest_negative_similarity")}
        return LossOutput(surrogate, count, metrics, value=value)

    @torch.no_grad()
    def evaluate(self, module, batches, autocast) -> dict:
        """Held-out loss (in-batch negatives of each evaluation batch), retrieval over all held-out pairs (and the
        corpus), Spearman of scored pairs (module docstring)."""
        totals = {"loss": [0.0, 0.0]}
        anchors, positives, anchor_texts, positive_texts, scores = [], [], [], [], []
        for batch in batches:
            with autocast():
                p = self._parts(module, batch)
                terms = self._terms(p.anchors, p.positives, p.negatives, p.texts, p.temperature)
            totals["loss"][0] += float(terms.losses.sum())
            totals["loss"][1] += float(terms.losses.numel())
            for k, (s, c) in self._metrics(terms).items():
                acc = totals.setdefault(k, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + s, acc[1] + c
            anchors.append(p.anchors.float())
            positives.append(p.positives.float())
            anchor_texts += p.texts[0]
            positive_texts += p.texts[1]
            scores += [t.get("score") for t in batch["texts"]]
        out = {k: tuple(v) for k, v in totals.items()}
        if not anchor_texts:
            return out
        anchors, positives = torch.cat(anchors), torch.cat(positives)
        paired = [i for i, (a, b) in enumerate(zip(anchor_texts, positive_texts)) if a.strip() != b.strip()]
        if paired:  # SimCSE examples (a text its own positive) would find themselves trivially
            extra = None
            if self.corpus is not None and self.corpus[0]:
                extra = (self.corpus[0], embed_ids(module, self.corpus[1], self.pad_id, self.pooling,
                                                   self.normalize, autocast=autocast, packing=self.packing))
            out.update(retrieval_sums(anchors[paired], positives[paired], [anchor_texts[i] for i in paired],
                                      [positive_texts[i] for i in paired], extra))
        out.update(spearman_sums(anchors, positives, scores))
        return out


def spearman_sums(anchors: torch.Tensor, positives: torch.Tensor, scores: list) -> dict:
    """{"spearman": (rho x n, n)} over the n pairs that carry a score (rank correlation of the score with the
    cosine similarity of anchor and positive); {} when fewer than 2 pairs carry one or they are all equal."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    labels = [float(scores[i]) for i in scored]
    if len(scored) < 2 or min(labels) == max(labels):
        return {}
    cosine = F.cosine_similarity(anchors[scored].double(), positives[scored].double(), dim=-1).tolist()
    if min(cosine) == max(cosine):  # an embedder that maps every text to one vector ranks nothing
        return {"spearman": (0.0, float(len(scored)))}
    n = float(len(scored))
    return {"spearman": (spearman(cosine, labels) * n, n)}


def pair_corpus(positives: torch.Tensor, anchor_texts: list[str], positive_texts: list[str]):
    """(corpus texts, corpus vectors (N, H), relevant sets): the distinct positives of some pairs as a retrieval
    corpus (eval/retrieval.py `corpus_from_pairs`), each text's vector taken from its first pair."""
    corpus_texts, relevant = corpus_from_pairs(anchor_texts, positive_texts)
    first = {}
    for i, text in enumerate(positive_texts):
        first.setdefault(text.strip(), i)
    return corpus_texts, positives[[first[t] for t in corpus_texts]], relevant


def new_documents(known: list[str], texts: list[str]) -> list[int]:
    """Indices of the `texts` whose stripped text is none of `known` (an extra corpus beside the pairs' positives)."""
    seen = {t.strip() for t in known}
    return [i for i, t in enumerate(texts) if t.strip() not in seen]


def retrieval_sums(anchors: torch.Tensor, positives: torch.Tensor, anchor_texts: list[str],
                   positive_texts: list[str], extra: tuple[list[str], torch.Tensor] | None = None) -> dict:
    """Retrieval metrics of anchors (Q, H) against the deduplicated positives, plus the `extra` (texts, vectors)
    candidates whose text is none of the positives', as (value x Q, Q) pairs."""
    texts, corpus, relevant = pair_corpus(positives, anchor_texts, positive_texts)
    if extra is not None:
        keep = new_documents(texts, extra[0])
        corpus = torch.cat([corpus, extra[1][keep].to(corpus)])
    metrics = evaluate_retrieval(anchors, corpus, relevant)
    q = float(anchors.shape[0])
    return {k: (v * q, q) for k, v in metrics.items() if k not in ("queries", "corpus")}


@torch.no_grad()
def embed_ids(module, sequences: list[list[int]], pad_id: int, pooling: str, normalize: bool, batch_size: int = 32,
              autocast=contextlib.nullcontext, packing: bool | str = "auto") -> torch.Tensor:
    """(N, H) float32 embeddings on the CPU of token id lists (as the pair builder tokenised them), in eval mode,
    `batch_size` rows at a time (padding-free where `packing` and the attention allow)."""
    from tuneforge.data.collate import pad_rows
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    layout = embedding_layout(module, packing)
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            ids, mask = pad_rows(sequences[i:i + batch_size], pad_id)
            with autocast():
                out.append(embed(module, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, pooling,
                                 normalize, layout=layout).float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def embed_pairs(module, examples: list, pad_id: int, pooling: str, normalize: bool, batch_size: int = 32,
                packing: bool | str = "auto"):
    """(anchors (E, H), positives (E, H)) of pair examples as the builder tokenised them, in eval mode."""
    anchors = [list(ex["anchor"].input_ids) for ex in examples]
    positives = [list(ex["positive"].input_ids) for ex in examples]
    vectors = embed_ids(module, anchors + positives, pad_id, pooling, normalize, batch_size, packing=packing)
    return vectors[:len(examples)], vectors[len(examples):]


def corpus_documents(cfg, tokenizer) -> tuple[list[str], list[list[int]]] | None:
    """(texts, token ids) of `contrastive.corpus`: its text records, stripped and deduplicated, each tokenised as
    a document (document prefix, data.max_length); None without a corpus. Bad records fail (or are skipped, with
    data.on_error: skip) with file, line and field."""
    from tuneforge.data.builders import embedder_ids
    from tuneforge.data.readers import iter_records
    c, d = cfg.contrastive, cfg.data
    if not c.corpus:
        return None
    texts, seen = [], set()
    for record in iter_records(c.corpus, kind="text", on_error=d.on_error, text_split=d.text_split):
        text = record.text.strip()
        if text not in seen:
            seen.add(text)
            texts.append(text)
    if not texts:
        raise TuneforgeError(f"contrastive.corpus {c.corpus} holds no text")
    prefix = c.document_prefix or ""
    return texts, [embedder_ids(tokenizer, prefix + t, d.max_length)[0] for t in texts]


def make_contrastive(cfg, tokenizer=None) -> ContrastiveObjective:
    c = cfg.contrastive
    corpus = corpus_documents(cfg, tokenizer) if tokenizer is not None else None
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    return ContrastiveObjective(c.pooling, c.normalize, c.temperature, c.symmetric, c.learn_temperature,
                                c.score_margin, corpus, pad, cfg.data.packing)


def temperature_heads(cfg, model) -> dict:
    """{"temperature": LearnedTemperature} when contrastive.learn_temperature, else no heads."""
    c = cfg.contrastive
    return {TEMPERATURE_HEAD: LearnedTemperature(c.temperature)} if c.learn_temperature else {}
