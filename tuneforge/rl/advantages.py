"""Rewards to advantages: PPO's per-token rewards and GAE, whitening, and the critic-free group baselines of
GRPO and RLOO. Pure functions on the flat completion-token layout (rl/segments.py); no gradients flow here (the
inputs are rollout statistics), so everything runs under `torch.no_grad`.

Scores are per sequence (S,). For GRPO and RLOO the S sequences are groups of `num_generations` completions of
the same prompt, each group contiguous: sequence s belongs to prompt s // num_generations.
"""

from __future__ import annotations

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.rl.segments import check_segments, from_padded, last_token_index, to_padded


def _check_finite(name: str, values: torch.Tensor) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        first = int(torch.nonzero(bad.flatten())[0])
        raise TuneforgeError(f"{name} is not finite at index {first} ({float(values.flatten()[first])})")


@torch.no_grad()
def ppo_token_rewards(kl_tokens: torch.Tensor, scores: torch.Tensor, segments: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """Per-token PPO rewards (N,): -kl_coef * KL on every token, plus the sequence's score on its last token.

    Ziegler et al. 2019 sec. 2.2 (and Ouyang et al. 2022 eq. 2): R(x, y) = r(x, y) - beta * log(pi / pi_ref),
    the KL spread over the tokens that incurred it so GAE can assign it, the score where the completion ends.
    """
    num_sequences = scores.numel()
    check_segments(segments, num_sequences, ("kl_tokens", kl_tokens))
    _check_finite("scores", scores)
    _check_finite("kl_tokens", kl_tokens)
    last = last_token_index(segments, num_sequences)
    if bool((last < 0).any()):
        raise TuneforgeError(f"sequence {int(torch.nonzero(last < 0)[0])} has no completion token: its score "
                             "has no token to go on")
    rewards = -float(kl_coef) * kl_tokens
    rewards[last] += scores.to(rewards.dtype)
    return rewards


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, segments: torch.Tensor, num_sequences: int,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16), per sequence: returns (advantages (N,), returns (N,)).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, returns R_t = A_t + V_t (the
    value target, TD(lambda)). A completion ends its episode: V after its last token is 0, whether it stopped
    at the end-of-turn token or at the length limit (the reward model scored it as it is).
    """
    check_segments(segments, num_sequences, ("rewards", rewards), ("values", values))
    r, mask = to_padded(rewards, segments, num_sequences)  # (S, L); padding 0 past each sequence's end
    v, _ = to_padded(values, segments, num_sequences)
    advantages = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0]) if r.shape[1] else r.new_zeros(num_sequences)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(r.shape[1])):  # a scan over length, vectorised over sequences
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = torch.where(mask[:, t], delta + gamma * lam * next_adv, torch.zeros_like(delta))
        advantages[:, t] = adv
        next_value = torch.where(mask[:, t], v[:, t], torch.zeros_like(delta))
        next_adv = adv
    flat = from_padded(advantages, segments)
    return flat, flat + values


@torch.no_grad()
def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           mask: torch.Tensor | None = None, all_sum=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and variance over the update's tokens (those of `mask` if given;
    the flat layout holds only real tokens, so it needs none). Computed in `prepare` over all micro-batches of
    the update, not per micro-batch, so gradient accumulation does not change the advantages.

    PPO advantages use shift_mean=True (the InstructGPT/TRL practice): zero-mean advantages make the update
    raise as many tokens as it lowers, which steadies PPO when the critic is still poor. shift_mean=False adds
    the mean back and only rescales: for rewards, whose sign means something. The variance is the population
    variance (divide by n): defined for a single token and n/(n-1) off the sample variance, which is nothing
    over an update's hundreds of tokens. Tokens outside `mask` come back as 0 (and count for nothing).
    `all_sum` (train/distributed.py's: element-wise sums over ranks): the mean and variance of every rank's
    tokens (float64 sums, two passes), so 2 ranks whiten as 1 rank holding the whole batch does.
    """
    chosen = values if mask is None else values[mask.bool()]
    if all_sum is None:
        if chosen.numel() == 0:
            raise TuneforgeError("whitening needs at least one token")
        mean = chosen.mean()
        var = (chosen - mean).square().mean()
    else:
        total, n = all_sum([float(chosen.double().sum()), float(chosen.numel())])
        if n == 0:
            raise TuneforgeError("whitening needs at least one token")
        squares = all_sum([float((chosen.double() - total / n).square().sum())])[0]
        mean = torch.tensor(total / n, dtype=values.dtype, device=values.device)
        var = torch.tensor(squares / n, dtype=values.dtype, device=values.device)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else torch.where(mask.bool(), out, torch.zeros_like(out))


def _groups(scores: torch.Tensor, num_generations: int, method: str) -> torch.Tensor:
    if scores.dim() != 1:
        raise TuneforgeError(f"{method} scores must be one per sequence (S,), got shape {tuple(scores.shape)}")
    if num_generations < 2:
        raise TuneforgeError(f"{method} needs num_generations >= 2 (a group of one has no baseline: its "
                             f"advantage is always 0), got {num_generations}")
    if scores.numel() % num_generations:
        raise TuneforgeError(f"{scores.numel()} scores do not split into groups of num_generations="
                             f"{num_generations}")
    _check_finite("scores", scores)
    return scores.reshape(-1, num_generations)  # (P, G)


def _zero_flat_groups(grouped: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """A group whose scores are all equal teaches nothing: its advantage is exactly 0 (r - mean computed in
    floating point would leave rounding noise, and dividing that by eps would amplify it)."""
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (P, 1)
    return torch.where(flat, torch.zeros_like(advantages), advantages)


@torch.no_grad()
def group_advantages(scores: torch.Tensor, num_generations: int, scale_rewards: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervision advantages (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2, used in eq. 3):
    per sequence (S,), (r - mean(group)) / (std(group) + eps). With scale_rewards=False, Dr. GRPO's r - mean
    (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783, sec. 3): dividing by the std
    gives more weight to prompts that are too easy or too hard. The std is the sample std (n - 1), as in the
    open GRPO implementations, so numbers compare with them. Broadcast to tokens with `advantages[segments]`.
    """
    grouped = _groups(scores, num_generations, "GRPO")
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return _zero_flat_groups(grouped, centred).reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO's leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740, sec. 3, the RLOO estimator):
    r_i - mean_{j != i} r_j per sequence (S,). Each sample's baseline is the mean of the others of its group,
    independent of the sample, so the estimate stays unbiased.
    """
    grouped = _groups(scores, num_generations, "RLOO")
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return _zero_flat_groups(grouped, grouped - others).reshape(-1)
