"""The DPO family of pairwise preference losses, as pure functions of per-answer log-prob sums.

No model code here: the DPO objective computes the log-probs (logprobs.py) and calls `preference_loss`.

Conventions (P preference pairs, every tensor (P,)):
- `policy_chosen`, `policy_rejected`: SUMMED log-probs of the answer tokens under the policy, differentiable.
- `ref_chosen`, `ref_rejected`: the same under the reference model, no gradient; None for the reference-free
  variants (`REFERENCE_FREE`: simpo, orpo), which never read them.
- `chosen_lengths`, `rejected_lengths`: answer token counts, for the variants that average per token.
- h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), the log-ratio difference of DPO.
- Rewards: beta * (policy - reference) for the DPO-style variants (DPO's implicit reward, Rafailov et al.
  2023 sec. 5); simpo and orpo define their own. Always detached: they are metrics.
- Losses are per pair and not reduced: the caller sums them, the loop divides by the pair count.

`beta` is the one strength parameter: DPO's beta, IPO's tau, the hinge's gamma (RSO), SimPO's beta and ORPO's
lambda (the weight of its odds-ratio term). `label_smoothing` is the label-flip rate eps of robust and cdpo;
the variants that do not read it refuse a non-zero value rather than ignore it (older TRL used it inside
"sigmoid", so a config carried over from there must not silently change meaning).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceTerms:
    losses: torch.Tensor  # (P,) per-pair loss, differentiable
    chosen_rewards: torch.Tensor  # (P,) detached
    rejected_rewards: torch.Tensor  # (P,) detached


@dataclass(frozen=True)
class _Pairs:
    """The validated inputs of one call (see the module docstring for what each tensor is)."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    chosen_nll: torch.Tensor | None
    beta: float
    label_smoothing: float
    simpo_gamma: float


# -- shared pieces ---------------------------------------------------------------------------------------------

def _log_ratios(x: _Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    return x.policy_chosen - x.ref_chosen, x.policy_rejected - x.ref_rejected  # (P,), (P,)


def _dpo_terms(x: _Pairs, losses: torch.Tensor) -> PreferenceTerms:
    chosen, rejected = _log_ratios(x)
    return PreferenceTerms(losses, (x.beta * chosen).detach(), (x.beta * rejected).detach())


def _h(x: _Pairs) -> torch.Tensor:
    chosen, rejected = _log_ratios(x)
    return chosen - rejected  # (P,)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"):
    log(-expm1(x)) near 0, where 1 - exp(x) cancels, and log1p(-exp(x)) below -ln 2, where expm1 loses digits."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# -- the variants ----------------------------------------------------------------------------------------------

def sigmoid_loss(x: _Pairs) -> PreferenceTerms:
    """DPO, Rafailov et al. 2023, eq. 7: -log sigmoid(beta * h).
    Reads policy_chosen, policy_rejected, ref_chosen, ref_rejected."""
    return _dpo_terms(x, -F.logsigmoid(x.beta * _h(x)))


def ipo_loss(x: _Pairs) -> PreferenceTerms:
    """IPO, Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human Preferences"),
    eq. 17: (h - 1/(2 beta))^2, beta being the paper's tau.
    Reads policy_chosen, policy_rejected, ref_chosen, ref_rejected.

    h is built from SUMMED log-probs, as in the paper, where h is the log of a ratio of sequence
    probabilities. TRL instead divides each log-ratio by the answer's token count (its code comment says the
    IPO authors confirmed that normalised form); with sums the target margin 1/(2 beta) is per sequence, so
    long answers need a smaller beta than TRL's for the same pull."""
    return _dpo_terms(x, (_h(x) - 1.0 / (2.0 * x.beta)) ** 2)


def hinge_loss(x: _Pairs) -> PreferenceTerms:
    """Hinge on the normalised likelihood, relu(1 - beta * h): the "hinge-norm" loss of RSO, Liu et al. 2023
    ("Statistical Rejection Sampling Improves Preference Optimization"), beta being their gamma; SLiC-HF
    (Zhao et al. 2023) is the same hinge without the reference model.
    Reads policy_chosen, policy_rejected, ref_chosen, ref_rejected."""
    return _dpo_terms(x, torch.relu(1.0 - x.beta * _h(x)))


def robust_loss(x: _Pairs) -> PreferenceTerms:
    """Robust DPO (rDPO), Chowdhury, Kini & Natarajan 2024 ("Provably Robust DPO: Aligning Language Models
    with Noisy Feedback"), their de-biased loss for a known label-flip rate eps = label_smoothing < 1/2:
    ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps).
    Its expectation under flips equals the clean DPO loss; eps = 0 is DPO.
    Reads policy_chosen, policy_rejected, ref_chosen, ref_rejected."""
    eps, z = x.label_smoothing, x.beta * _h(x)
    losses = ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _dpo_terms(x, losses)


def cdpo_loss(x: _Pairs) -> PreferenceTerms:
    """Conservative DPO, Mitchell 2023 ("A note on DPO with noisy preferences & relationship to IPO"): the
    binary cross-entropy against a smoothed label, the chosen answer preferred with probability 1 - eps:
    (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h); eps = label_smoothing, eps = 0 is DPO.
    Unlike rDPO both terms are losses (the flipped pair is also fitted), so beta h stays finite at the optimum.
    Reads policy_chosen, policy_rejected, ref_chosen, ref_rejected."""
    eps, z = x.label_smoothing, x.beta * _h(x)
    return _dpo_terms(x, (1.0 - eps) * -F.logsigmoid(z) + eps * -F.logsigmoid(-z))


def simpo_loss(x: _Pairs) -> PreferenceTerms:
    """SimPO, Meng, Xia & Chen 2024, eq. 6: -log sigmoid(beta/|y_w| log p_w - beta/|y_l| log p_l - gamma),
    gamma = simpo_gamma the target reward margin (absolute, not the gamma/beta ratio of their scripts).
    Rewards: their eq. 4, beta/|y| log p(y), the length-averaged log-prob scaled by beta.
    Reads policy_chosen, policy_rejected, chosen_lengths, rejected_lengths; no reference."""
    chosen = x.beta * x.policy_chosen / x.chosen_lengths  # (P,)
    rejected = x.beta * x.policy_rejected / x.rejected_lengths
    losses = -F.logsigmoid(chosen - rejected - x.simpo_gamma)
    return PreferenceTerms(losses, chosen.detach(), rejected.detach())


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp). A mean log-prob of exactly 0 (every token certain) has
    infinite odds; it is capped at -eps of its dtype so that the loss and its gradient stay finite."""
    capped = mean_logp.clamp(max=-torch.finfo(mean_logp.dtype).eps)
    return capped - log1mexp(capped)


def orpo_loss(x: _Pairs) -> PreferenceTerms:
    """ORPO, Hong, Lee & Thorne 2024, eq. 6-7: L_SFT + lambda * L_OR, with lambda = beta here,
    L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)), odds(y) = p(y) / (1 - p(y)) and p(y) the
    length-normalised likelihood exp(log p(y) / |y|) the paper uses, and L_SFT the chosen answer's NLL per token
    (chosen_nll / |y_w|; chosen_nll defaults to -policy_chosen).
    Rewards: beta * log p(y) / |y| (the length-averaged log-prob, as TRL's ORPO trainer logs it).
    Reads policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, chosen_nll; no reference."""
    mean_chosen = x.policy_chosen / x.chosen_lengths  # (P,)
    mean_rejected = x.policy_rejected / x.rejected_lengths
    odds_ratio_loss = -F.logsigmoid(_log_odds(mean_chosen) - _log_odds(mean_rejected))
    nll = -x.policy_chosen if x.chosen_nll is None else x.chosen_nll
    losses = nll / x.chosen_lengths + x.beta * odds_ratio_loss
    return PreferenceTerms(losses, (x.beta * mean_chosen).detach(), (x.beta * mean_rejected).detach())


@dataclass(frozen=True)
class _Variant:
    fn: Callable[[_Pairs], PreferenceTerms]
    needs_reference: bool
    needs_lengths: bool
    max_label_smoothing: float | None  # None: the variant does not read label_smoothing
    max_inclusive: bool = False


_VARIANTS: dict[str, _Variant] = {
    "sigmoid": _Variant(sigmoid_loss, needs_reference=True, needs_lengths=False, max_label_smoothing=None),
    "ipo": _Variant(ipo_loss, needs_reference=True, needs_lengths=False, max_label_smoothing=None),
    "hinge": _Variant(hinge_loss, needs_reference=True, needs_lengths=False, max_label_smoothing=None),
    # rDPO divides by 1 - 2 eps: eps = 1/2 is undefined.
    "robust": _Variant(robust_loss, needs_reference=True, needs_lengths=False, max_label_smoothing=0.5),
    # cDPO at eps = 1/2 is a constant-target BCE (no preference), legal but pointless; above it labels flip.
    "cdpo": _Variant(cdpo_loss, needs_reference=True, needs_lengths=False, max_label_smoothing=0.5,
                     max_inclusive=True),
    "simpo": _Variant(simpo_loss, needs_reference=False, needs_lengths=True, max_label_smoothing=None),
    "orpo": _Variant(orpo_loss, needs_reference=False, needs_lengths=True, max_label_smoothing=None),
}

VARIANTS: tuple[str, ...] = tuple(sorted(_VARIANTS))
REFERENCE_FREE: frozenset[str] = frozenset(name for name, v in _VARIANTS.items() if not v.needs_reference)


def needs_reference(variant: str) -> bool:
    """Whether `variant` reads reference log-probs (the caller can skip the reference forward when not)."""
    return _lookup(variant).needs_reference


def _lookup(variant: str) -> _Variant:
    if variant not in _VARIANTS:
        raise ValueError(f"unknown preference loss variant {variant!r}; known variants: {', '.join(VARIANTS)}")
    return _VARIANTS[variant]


def _why_needed(name: str) -> str:
    if name.startswith("ref_"):
        return ("compares the policy to a reference model; pass the reference log-prob sums "
                f"(reference-free variants: {', '.join(sorted(REFERENCE_FREE))})")
    if name.endswith("_lengths"):
        return "averages log-probs per answer token; pass the answer token counts"
    return "needs the policy's log-prob sums"


def _check_args(variant: str, spec: _Variant, tensors: dict, beta: float, label_smoothing: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"preference loss {variant!r}: beta must be a finite number > 0, got {beta!r}")
    limit = spec.max_label_smoothing
    if limit is None and label_smoothing != 0:
        readers = ", ".join(n for n in VARIANTS if _VARIANTS[n].max_label_smoothing is not None)
        raise ValueError(f"preference loss {variant!r} does not use label_smoothing (got {label_smoothing!r}); "
                         f"only {readers} read it")
    if limit is not None and not (0 <= label_smoothing < limit or (spec.max_inclusive and label_smoothing == limit)):
        bound = f"<= {limit}" if spec.max_inclusive else f"< {limit}"
        raise ValueError(f"preference loss {variant!r}: label_smoothing must satisfy 0 <= eps {bound}, "
                         f"got {label_smoothing!r}")
    required = ["policy_chosen", "policy_rejected"]
    required += ["ref_chosen", "ref_rejected"] if spec.needs_reference else []
    required += ["chosen_lengths", "rejected_lengths"] if spec.needs_lengths else []
    for name in required:
        if tensors[name] is None:
            raise ValueError(f"preference loss {variant!r}: {name} is None, but this variant {_why_needed(name)}")
    shape = tensors["policy_chosen"].shape
    for name, t in tensors.items():
        if t is not None and (t.dim() != 1 or t.shape != shape):
            raise ValueError(f"preference loss {variant!r}: {name} has shape {tuple(t.shape)}, expected "
                             f"(P,) = {tuple(shape)} like policy_chosen (one entry per preference pair)")
    for name in ("chosen_lengths", "rejected_lengths"):
        t = tensors[name]
        if spec.needs_lengths and t is not None and bool((t < 1).any()):
            raise ValueError(f"preference loss {variant!r}: {name} has an entry < 1 (an answer without tokens)")


def preference_loss(variant: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.5, chosen_lengths=None,
                    rejected_lengths=None, chosen_nll=None) -> PreferenceTerms:
    """Per-pair losses and detached rewards of preference loss `variant` (one of VARIANTS).

    Every tensor is (P,), see the module docstring; arguments a variant does not read are ignored, except a
    non-zero label_smoothing, which is refused. Raises ValueError for an unknown variant, a missing input the
    variant needs, mismatched shapes, or an out-of-range beta / label_smoothing.
    """
    spec = _lookup(variant)
    beta, label_smoothing = float(beta), float(label_smoothing)
    tensors = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "ref_chosen": ref_chosen,
               "ref_rejected": ref_rejected, "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths,
               "chosen_nll": chosen_nll}
    _check_args(variant, spec, tensors, beta, label_smoothing)
    dtype = policy_chosen.dtype
    lengths = [None if t is None else t.to(dtype) for t in (chosen_lengths, rejected_lengths)]  # ints -> float
    pairs = _Pairs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths[0], lengths[1], chosen_nll,
                   beta, label_smoothing, float(simpo_gamma))
    return spec.fn(pairs)
