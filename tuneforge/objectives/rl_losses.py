"""The clipped losses of PPO, GRPO and RLOO as pure functions on the flat completion-token layout.

Inputs are per token (N,), in the layout of rl/segments.py: `segments` names each token's sequence (0..S-1,
contiguous and in order). Sequence-level advantages (GRPO, RLOO) reach the tokens as `advantages[segments]`.
`logps` are the policy's log-probs of the sampled tokens now (differentiable), `old_logps` those at sampling
time (detached), `ref_logps` the reference's (detached).

Aggregation follows the loop's contract (objectives/base.py): a loss returns (loss_sum, count) per micro-batch
and the loop divides the sum over the update's micro-batches by the summed count, once. `loss_type` picks what
that division yields:
- "grpo": the mean over sequences of each sequence's token mean (Shao et al. 2024 eq. 3): loss_sum = sum of the
  sequences' token means, count = S. This is exact under gradient accumulation only because a sequence never
  spans micro-batches (the packed rows keep each completion whole); a sequence split across two would be
  averaged twice over partial lengths.
- "dr_grpo": sum over tokens / (S * max_new_tokens) (Liu et al. 2025 sec. 3, a constant normaliser, so long
  answers are not favoured by the 1/|o| of "grpo"): loss_sum = token sum / max_new_tokens, count = S.
- "dapo" (alias "token"): the token-level mean over all tokens of the update (Yu et al. 2025, "DAPO",
  arXiv:2503.14476, sec. 3.3; also PPO's usual mean): loss_sum = token sum, count = N.
A sequence without completion tokens contributes 0 and, for grpo/dr_grpo, still counts as one of the S.

Metrics are (sum, count) pairs the loop adds up over the update and divides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.objectives.base import LossOutput
from tuneforge.rl.kl import kl_per_token
from tuneforge.rl.segments import check_segments, segment_lengths, segment_mean


def _per_sequence_mean(token_losses, segments, num_sequences, max_new_tokens):
    return segment_mean(token_losses, segments, num_sequences).sum(), float(num_sequences)


def _constant_length(token_losses, segments, num_sequences, max_new_tokens):
    if max_new_tokens is None or max_new_tokens < 1:
        raise TuneforgeError(f"loss_type dr_grpo needs max_new_tokens >= 1, got {max_new_tokens}")
    if segments.numel() and int(segment_lengths(segments, num_sequences).max()) > max_new_tokens:
        raise TuneforgeError(f"a completion has {int(segment_lengths(segments, num_sequences).max())} tokens, "
                             f"more than max_new_tokens={max_new_tokens}: dr_grpo's normaliser would be wrong")
    return token_losses.sum() / max_new_tokens, float(num_sequences)


def _token_mean(token_losses, segments, num_sequences, max_new_tokens):
    return token_losses.sum(), float(token_losses.numel())


LOSS_TYPES: dict[str, Callable] = {"grpo": _per_sequence_mean, "dr_grpo": _constant_length,
                                   "dapo": _token_mean, "token": _token_mean}


def aggregate(token_losses: torch.Tensor, segments: torch.Tensor, num_sequences: int, loss_type: str,
              max_new_tokens: int | None = None) -> tuple[torch.Tensor, float]:
    """(loss_sum, count) of per-token losses (N,) for `loss_type` (see the module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise TuneforgeError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    check_segments(segments, num_sequences, ("token_losses", token_losses))
    return LOSS_TYPES[loss_type](token_losses, segments, num_sequences, max_new_tokens)


def _fraction(flags: torch.Tensor) -> tuple[float, float]:
    return float(flags.sum()), float(flags.numel())


def _check_finite(name: str, values: torch.Tensor) -> None:
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise TuneforgeError(f"{name} is not finite at token {first} ({float(values.detach()[first])})")


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        segments: torch.Tensor, num_sequences: int, *, loss_type: str, eps_low: float = 0.2,
                        eps_high: float | None = None, max_new_tokens: int | None = None,
                        ref_logps: torch.Tensor | None = None, beta: float = 0.0,
                        kl_estimator: str = "k3") -> LossOutput:
    """The clipped surrogate of PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7),
    negated to a loss, per token:  max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),  r = exp(logps - old_logps),
    with DAPO's clip-higher (Yu et al. 2025, sec. 3.1: eps_high > eps_low leaves room for unlikely tokens to
    grow; eps_high=None means eps_low, PPO's symmetric range), plus GRPO's per-token KL penalty beta * k to the
    reference (Shao et al. 2024 eq. 3, with k = k3 of eq. 4 by default), then aggregated by `loss_type`.

    Where the clip is active (r above 1 + eps_high with A > 0, or below 1 - eps_low with A < 0) the token's
    surrogate is constant and its gradient zero. Metrics: clip_fraction (with clip_low_fraction and
    clip_high_fraction, its two sides), approx_kl (k3 of the sampling policy against the current one:
    KL(old || new)), ratio_mean, kl (to the reference, when ref_logps is given), all per token; ratio_min and
    ratio_max as (extreme, 1): over several micro-batches the loop reports the mean of their extremes (exact
    with one micro-batch per update; a true min/max over the update needs a min/max reduction in the loop).
    """
    eps_high = eps_low if eps_high is None else eps_high
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise TuneforgeError(f"clip ranges need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    check_segments(segments, num_sequences, ("logps", logps), ("old_logps", old_logps),
                   ("advantages", advantages))
    if beta and ref_logps is None:
        raise TuneforgeError(f"a KL penalty beta={beta} needs the reference log-probs (ref_logps)")
    _check_finite("advantages", advantages)
    log_ratio = logps - old_logps.detach()
    _check_finite("the policy log-ratio", log_ratio)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    token_losses = torch.maximum(unclipped, clipped)
    metrics = {}
    if ref_logps is not None:
        kl = kl_per_token(logps, ref_logps.detach(), kl_estimator)
        if beta:
            token_losses = token_losses + beta * kl
        metrics["kl"] = (float(kl.detach().sum()), float(kl.numel()))
    loss_sum, count = aggregate(token_losses, segments, num_sequences, loss_type, max_new_tokens)

    with torch.no_grad():
        r = ratio.detach()
        low, high = (r < 1.0 - eps_low) & (adv < 0), (r > 1.0 + eps_high) & (adv > 0)
        n = float(r.numel())
        metrics.update(
            clip_fraction=_fraction(low | high), clip_low_fraction=_fraction(low),
            clip_high_fraction=_fraction(high),
            approx_kl=(float(kl_per_token(old_logps.detach(), logps.detach(), "k3").sum()), n),
            ratio_mean=(float(r.sum()), n))
        # the same names from every micro-batch (ranks add them by name); a token-less one adds (0, 0)
        extremes = (float(r.min()), float(r.max()), 1.0) if r.numel() else (0.0, 0.0, 0.0)
        metrics.update(ratio_min=(extremes[0], extremes[2]), ratio_max=(extremes[1], extremes[2]))
    return LossOutput(loss_sum, count, metrics)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       segments: torch.Tensor, num_sequences: int, *, clip_range: float | None, loss_type: str,
                       max_new_tokens: int | None = None) -> LossOutput:
    """PPO's clipped value loss per token, 0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2),
    aggregated by `loss_type` like the policy loss so the two sums share one count.

    Not in the PPO paper: the practice of OpenAI baselines' ppo2, studied by Engstrom et al. 2020
    ("Implementation Matters in Deep Policy Gradients", value function clipping) and Andrychowicz et al. 2021:
    it stops a value from moving further than eps_v from its rollout-time estimate in one batch, the critic's
    analogue of the ratio clip. clip_range=None gives the plain 0.5 * (V - R)^2. Metrics: value_clip_fraction
    (tokens whose clipped error is the larger one, gradient zero), value_error ((V - R)^2), per token.
    """
    check_segments(segments, num_sequences, ("values", values), ("old_values", old_values),
                   ("returns", returns))
    if clip_range is not None and not clip_range > 0:
        raise TuneforgeError(f"the value clip range must be > 0 (or None for no clipping), got {clip_range}")
    _check_finite("returns", returns)
    target = returns.detach().to(values.dtype)
    error = (values - target).square()
    if clip_range is None:
        token_losses, clipped_flags = 0.5 * error, torch.zeros_like(error, dtype=torch.bool)
    else:
        old = old_values.detach().to(values.dtype)
        clipped_error = (torch.clamp(values, old - clip_range, old + clip_range) - target).square()
        token_losses = 0.5 * torch.maximum(error, clipped_error)
        clipped_flags = clipped_error.detach() > error.detach()
    loss_sum, count = aggregate(token_losses, segments, num_sequences, loss_type, max_new_tokens)
    metrics = {"value_clip_fraction": _fraction(clipped_flags),
               "value_error": (float(error.detach().sum()), float(error.numel()))}
    return LossOutput(loss_sum, count, metrics)
