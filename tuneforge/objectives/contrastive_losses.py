"""Contrastive losses for embedding models (InfoNCE / MultipleNegativesRankingLoss, SimCSE), as pure functions of
pooled embeddings.

No model code here: the contrastive objective embeds and pools the texts (and L2-normalises them when the method
uses cosine similarity) and calls `info_nce`.

Conventions (B anchors, C >= B candidates, D embedding dimensions):
- `anchors` (B, D), `candidates` (C, D). The first B candidates are the in-batch positives, one per anchor:
  `positive_index[b]` (in [0, B)) is the column of anchor b's positive, normally b. Candidates B.. are hard
  negatives shared by all anchors. Every candidate that is not b's positive is a negative of b: the other anchors'
  positives are the in-batch negatives (Henderson et al. 2017, "Efficient Natural Language Response Suggestion for
  Smart Reply"; sentence-transformers' MultipleNegativesRankingLoss).
- Similarity s[b, c] = anchors[b] . candidates[c]: the cosine when the caller has normalised, which this module
  never does. Logits = s / temperature; temperature 0.05 is sentence-transformers' default scale 20.
  `temperature` is a float or a 0-dim tensor (a learned temperature, `LearnedTemperature`: gradients reach it).
- Per anchor, the cross-entropy of its row of logits against its positive column,
  loss_b = -log softmax(logits[b])[positive_index[b]]: InfoNCE (van den Oord, Li & Vinyals 2018, "Representation
  Learning with Contrastive Predictive Coding", eq. 4) and SimCSE (Gao, Yao & Chen 2021, "SimCSE: Simple Contrastive
  Learning of Sentence Embeddings": unsupervised, the positive being the anchor's own text under another dropout
  mask, or supervised, with hard negatives).
- Masked entries get logit -inf, i.e. leave the softmax; the positive is never masked, whatever the mask says.
  Two sources, combined: `mask` (B, C) from the caller (e.g. `false_negative_mask`: duplicate texts in the batch,
  which are false negatives) and `score_margin` (the GISTEmbed rule, see `info_nce`).
- `symmetric=True` adds the document -> query direction (CLIP, Radford et al. 2021, "Learning Transferable Visual
  Models From Natural Language Supervision", fig. 3): the positive document of anchor b is scored against the B
  anchors, and the per-anchor loss becomes the MEAN of the two cross-entropies,
  loss_b = (CE_query->doc(b) + CE_doc->query(positive_index[b])) / 2, so that its scale stays that of one direction
  (sentence-transformers' MultipleNegativesSymmetricRankingLoss, partition_mode "per_direction").
- Losses are per anchor and not reduced: the caller sums them, the loop divides by the anchor count.
- Metrics, detached, query -> document direction only: `accuracy` (1.0 where the positive's logit is strictly above
  every unmasked negative's), `positive_similarity` s[b, p_b] and `hardest_negative_similarity` (the largest s over
  b's unmasked negatives, -inf when none is left; filter with isfinite before averaging). Similarities are before
  temperature.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

DEFAULT_TEMPERATURE = 0.05  # scale 20
MAX_SCALE = 100.0  # CLIP's clip on the learned logit scale (Radford et al. 2021, sec. 2.5)


@dataclass(frozen=True)
class ContrastiveTerms:
    losses: torch.Tensor  # (B,) per-anchor loss, differentiable
    accuracy: torch.Tensor  # (B,) detached, 1.0 where the positive beats every unmasked negative
    positive_similarity: torch.Tensor  # (B,) detached, before temperature
    hardest_negative_similarity: torch.Tensor  # (B,) detached, before temperature; -inf when no negative is left


# -- validation ------------------------------------------------------------------------------------------------

def _positive_index(positive_index, batch: int, device: torch.device | str) -> torch.Tensor:
    """positive_index as a (B,) long tensor on `device`, checked: one integer per anchor, each in [0, B)."""
    idx = torch.as_tensor(positive_index, device=device)
    if idx.dim() != 1 or idx.shape[0] != batch:
        raise ValueError(f"contrastive loss: positive_index has shape {tuple(idx.shape)}, expected (B,) = ({batch},) "
                         "(one positive column per anchor)")
    if idx.numel() == 0:
        idx = idx.long()  # torch.as_tensor([]) is float
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"contrastive loss: positive_index must hold integers, got dtype {idx.dtype}")
    idx = idx.long()
    if batch and not bool(((idx >= 0) & (idx < batch)).all()):
        raise ValueError(f"contrastive loss: positive_index must lie in [0, B) = [0, {batch}) (the positives are the "
                         f"first B candidates), got {idx.tolist()}")
    return idx


def _check_temperature(temperature) -> float:
    """The value of temperature (a float or a 0-dim tensor), which must be finite and > 0."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"contrastive loss: a tensor temperature must be 0-dim, got shape "
                             f"{tuple(temperature.shape)}")
        value = float(temperature.detach())
    else:
        value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"contrastive loss: temperature must be a finite number > 0, got {value!r}")
    return value


def _check_embeddings(anchors: torch.Tensor, candidates: torch.Tensor) -> None:
    for name, t in (("anchors", anchors), ("candidates", candidates)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"contrastive loss: {name} must be a 2-dim floating tensor ({name[0].upper()}, D), "
                             f"got {shape}")
    (batch, dim), (count, cand_dim) = anchors.shape, candidates.shape
    if batch < 1:
        raise ValueError("contrastive loss: no anchors (B = 0)")
    if cand_dim != dim:
        raise ValueError(f"contrastive loss: anchors have D = {dim} but candidates have D = {cand_dim}")
    if count < batch:
        raise ValueError(f"contrastive loss: C = {count} candidates for B = {batch} anchors; need C >= B (the first "
                         "B candidates are the anchors' positives)")
    if anchors.dtype != candidates.dtype:
        raise ValueError(f"contrastive loss: anchors are {anchors.dtype} but candidates are {candidates.dtype}")


def _check_mask(mask, shape: torch.Size) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"contrastive loss: mask must be a bool tensor of shape (B, C) = {tuple(shape)}, got {got}")


# -- the mathematics -------------------------------------------------------------------------------------------

def false_negative_mask(anchor_texts: list[str], candidate_texts: list[str],
                        positive_index: torch.Tensor | list[int]) -> torch.Tensor:
    """(B, C) bool on the CPU, True where candidate c must be masked for anchor b: its text equals b's positive's
    text or b's own text (compared after .strip()), and c is not b's own positive column. Such a candidate is a
    duplicate of the positive (or of the query) elsewhere in the batch, and pushing it away would fight the
    positive. The candidates follow `info_nce`'s layout (the first B are the anchors' positives)."""
    for name, texts in (("anchor_texts", anchor_texts), ("candidate_texts", candidate_texts)):
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"false_negative_mask: {name} must be a list of strings")
    batch, count = len(anchor_texts), len(candidate_texts)
    if count < batch:
        raise ValueError(f"false_negative_mask: {count} candidate texts for {batch} anchor texts; need C >= B")
    idx = _positive_index(positive_index, batch, "cpu").tolist()
    columns: dict[str, list[int]] = defaultdict(list)  # stripped text -> the candidate columns holding it
    stripped = [t.strip() for t in candidate_texts]
    for c, text in enumerate(stripped):
        columns[text].append(c)
    mask = torch.zeros(batch, count, dtype=torch.bool)
    for b, anchor in enumerate(anchor_texts):
        for c in columns.get(stripped[idx[b]], []) + columns.get(anchor.strip(), []):
            mask[b, c] = c != idx[b]
    return mask


def _margin_mask(sims: torch.Tensor, positive_sims: torch.Tensor, margin: float) -> torch.Tensor:
    """GISTEmbed's absolute rule on (detached) similarities: True where s > s_positive - margin."""
    return sims.detach() > (positive_sims.detach() - margin).unsqueeze(1)  # (R, K)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row -log softmax(logits)[target]; -inf logits are out of the softmax, the target's must be finite."""
    return torch.logsumexp(logits, dim=1) - logits.gather(1, target.unsqueeze(1)).squeeze(1)  # (R,)


def _doc_to_query(sims: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None, score_margin: float | None,
                  temperature) -> torch.Tensor:
    """Per-anchor cross-entropy of the document -> query direction: row b scores b's positive document (column
    idx[b]) against the B anchors, the target being anchor b (the diagonal). The caller's mask transposed: anchor a
    is out of row b when mask[a, idx[b]] (that document is a false negative for a)."""
    rows = torch.arange(idx.shape[0], device=sims.device)
    doc_sims = sims[:, idx].T  # (B, B): doc_sims[b, a] = s[a, idx[b]]
    excluded = torch.zeros_like(doc_sims, dtype=torch.bool) if mask is None else mask[:, idx].T
    if score_margin is not None:
        excluded = excluded | _margin_mask(doc_sims, doc_sims.diagonal(), score_margin)
    excluded[rows, rows] = False  # never the positive pair
    logits = (doc_sims / temperature).masked_fill(excluded, -math.inf)
    return _cross_entropy(logits, rows)  # (B,)


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, positive_index: torch.Tensor | list[int],
             temperature: float | torch.Tensor = DEFAULT_TEMPERATURE, *, mask: torch.Tensor | None = None,
             symmetric: bool = False, score_margin: float | None = None) -> ContrastiveTerms:
    """Per-anchor InfoNCE losses and detached metrics (layout, masking and `symmetric`: the module docstring).

    anchors (B, D), candidates (C, D), C >= B, positive_index (B,) in [0, B); mask (B, C) bool or None.
    `score_margin` (GISTEmbed, Solatorio 2024, "GISTEmbed: Guided In-sample Selection of Training Negatives for
    Text Embedding Fine-tuning", with the absolute margin of sentence-transformers' GISTEmbedLoss): also mask, per
    anchor, every candidate whose similarity is above the positive's minus the margin, s[b, c] > s[b, p_b] -
    score_margin. Here the guide is the model itself (its detached similarities, before temperature); a margin of 0
    drops the negatives that already outscore the positive, a positive margin also those within `score_margin` below
    it, a negative one only those more than |score_margin| above it. In the symmetric direction the same rule holds
    per document row, against that row's positive pair. None (default) is off; to filter with a separate guide
    model, pass its verdict as `mask`.
    Raises ValueError on bad shapes or dtypes, positive_index out of range (or repeated, when symmetric), C < B, a
    temperature that is not finite and > 0, or a non-finite score_margin.
    """
    _check_embeddings(anchors, candidates)
    batch, count = anchors.shape[0], candidates.shape[0]
    idx = _positive_index(positive_index, batch, anchors.device)
    _check_temperature(temperature)
    _check_mask(mask, torch.Size((batch, count)))
    if symmetric and torch.unique(idx).numel() != batch:
        raise ValueError(f"contrastive loss: symmetric=True needs each of the first B columns to be exactly one "
                         f"anchor's positive, but positive_index repeats a column: {idx.tolist()}")
    if score_margin is not None:
        score_margin = float(score_margin)
        if not math.isfinite(score_margin):
            raise ValueError(f"contrastive loss: score_margin must be finite or None, got {score_margin!r}")
    mask = None if mask is None else mask.to(anchors.device)

    rows = torch.arange(batch, device=anchors.device)
    sims = anchors @ candidates.T  # (B, C)
    positive_sims = sims[rows, idx]  # (B,)
    is_positive = torch.zeros_like(sims, dtype=torch.bool)
    is_positive[rows, idx] = True
    excluded = torch.zeros_like(is_positive) if mask is None else mask.clone()  # (B, C)
    if score_margin is not None:
        excluded |= _margin_mask(sims, positive_sims, score_margin)
    excluded &= ~is_positive
    logits = (sims / temperature).masked_fill(excluded, -math.inf)  # (B, C)
    losses = _cross_entropy(logits, idx)  # (B,)
    if symmetric:
        losses = (losses + _doc_to_query(sims, idx, mask, score_margin, temperature)) / 2

    negatives = sims.detach().masked_fill(excluded | is_positive, -math.inf)  # (B, C)
    hardest = negatives.max(dim=1).values  # (B,), -inf when every negative is masked
    positive_sims = positive_sims.detach()
    return ContrastiveTerms(losses, (positive_sims > hardest).to(sims.dtype), positive_sims, hardest)


class LearnedTemperature(torch.nn.Module):
    """A learned softmax temperature, stored as the log of the scale 1/temperature (CLIP's "logit scale", Radford
    et al. 2021, sec. 2.5: a learned temperature, "clipped to prevent scaling the logits by more than 100 which
    we found necessary to prevent training instability").

    `log_scale` is the parameter, initialised to log(1 / temperature); forward() returns the 0-dim temperature
    exp(-min(log_scale, log max_scale)), so the scale never exceeds `max_scale`. The clip is in the forward pass:
    while log_scale is above the bound its gradient is 0 and the temperature stays at 1 / max_scale.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, *, max_scale: float = MAX_SCALE) -> None:
        super().__init__()
        temperature, max_scale = float(temperature), float(max_scale)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"LearnedTemperature: temperature must be a finite number > 0, got {temperature!r}")
        if not (math.isfinite(max_scale) and max_scale > 0):
            raise ValueError(f"LearnedTemperature: max_scale must be a finite number > 0, got {max_scale!r}")
        if 1.0 / temperature > max_scale:
            raise ValueError(f"LearnedTemperature: initial temperature {temperature!r} is a scale of "
                             f"{1.0 / temperature:g} > max_scale {max_scale:g}; use a temperature >= "
                             f"{1.0 / max_scale:g}")
        self.max_scale = max_scale
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self) -> torch.Tensor:
        return torch.exp(-self.log_scale.clamp(max=math.log(self.max_scale)))  # 0-dim

    def extra_repr(self) -> str:
        return f"temperature={float(self.forward().detach()):g}, max_scale={self.max_scale:g}"
