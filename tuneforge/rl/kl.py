"""The KL leash of RL fine-tuning: per-token estimators and the coefficient controllers.

Estimators (Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html): tokens x are
sampled from the policy q, the reference is p, and r = p(x) / q(x), so log r = ref_logps - logps. Each is a
per-token sample whose expectation under q relates to KL(q || p):
- k1 = -log r: unbiased, high variance, negative on some tokens;
- k2 = (log r)^2 / 2: biased (low for small KL), low variance, never negative;
- k3 = (r - 1) - log r: unbiased and never negative (GRPO's KL term, Shao et al. 2024 eq. 4).
All are differentiable in `logps`; whether one's gradient is the KL gradient depends on where it is used (the
PPO reward takes it detached, GRPO's loss term back-propagates it).

Controllers give the coefficient beta of the KL penalty: fixed, or the adaptive controller of Ziegler et al.
2019 ("Fine-Tuning Language Models from Human Preferences", sec. 2.2), which moves beta to hold the measured KL
near a target. Their state is a dict of floats, saved with a checkpoint so that a resume continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneforge.errors import TuneforgeError
from tuneforge.rl.segments import check_segments, segment_mean, segment_sum


def _k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


def _k2(log_r: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_r.square()


def _k3(log_r: torch.Tensor) -> torch.Tensor:
    # expm1 keeps (r - 1) accurate when r is near 1, which is where training spends its time
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate (N,) from the log-probs of policy-sampled tokens under the
    policy (`logps`) and the reference (`ref_logps`), by Schulman's k1, k2 or k3 (see the module docstring)."""
    if estimator not in KL_ESTIMATORS:
        raise TuneforgeError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    if logps.shape != ref_logps.shape:
        raise TuneforgeError(f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape")
    return KL_ESTIMATORS[estimator](ref_logps - logps)


def sequence_kl(kl_tokens: torch.Tensor, segments: torch.Tensor, num_sequences: int,
                reduction: str = "sum") -> torch.Tensor:
    """Per-sequence KL (S,): the "sum" over a completion's tokens is the sequence-level KL that the PPO reward
    pays and the KL budget watches; the "mean" per token compares completions of different lengths."""
    check_segments(segments, num_sequences, ("kl_tokens", kl_tokens))
    reducers = {"sum": segment_sum, "mean": segment_mean}
    if reduction not in reducers:
        raise TuneforgeError(f"unknown reduction {reduction!r}; choose sum or mean")
    return reducers[reduction](kl_tokens, segments, num_sequences)


class FixedKLController:
    """A constant coefficient: `update` records nothing, the state is the coefficient alone."""

    def __init__(self, coef: float):
        if not coef >= 0:
            raise TuneforgeError(f"KL coefficient must be >= 0, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        _check_kl(current_kl)
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        _check_state(state, {"coef"})
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: e = clip(KL / target - 1, -0.2, 0.2), beta <- beta * (1 + K_beta e).

    The paper's K_beta is written here, as in its released code (openai/lm-human-preferences), as
    n_steps / horizon: n_steps is how many rollouts the measured KL covers, so beta moves by the same total
    amount per rollout whatever the batch size; `horizon` rollouts at the clipped error of 0.2 change it by
    about a factor e^(+-0.2). The clip keeps one noisy batch from swinging beta.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if not init_coef > 0:
            raise TuneforgeError(f"the adaptive KL controller needs an initial coefficient > 0, got {init_coef}")
        if not target > 0:
            raise TuneforgeError(f"the adaptive KL controller needs a target KL > 0, got {target}")
        if not horizon > 0:
            raise TuneforgeError(f"the adaptive KL controller needs a horizon > 0, got {horizon}")
        self.coef, self.target, self.horizon = float(init_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust beta after a batch whose mean sequence KL was `current_kl`, over `n_steps` rollouts; returns
        the new coefficient (for the next batch)."""
        _check_kl(current_kl)
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        _check_state(state, {"coef", "target", "horizon"})
        if (float(state["target"]), float(state["horizon"])) != (self.target, self.horizon):
            raise TuneforgeError(f"the checkpoint's KL controller has target {state['target']} and horizon "
                                 f"{state['horizon']}, the config {self.target} and {self.horizon}: resuming "
                                 "would not continue the same run")
        self.coef = float(state["coef"])


def _check_kl(current_kl: float) -> None:
    kl = float(current_kl)
    if kl != kl or kl in (float("inf"), float("-inf")):
        raise TuneforgeError(f"the measured KL is {kl}: the policy's or the reference's log-probs are not finite")


def _check_state(state: dict, keys: set[str]) -> None:
    if set(state) != keys:
        raise TuneforgeError(f"KL controller state has keys {sorted(state)}, expected {sorted(keys)}: the "
                             "checkpoint was written by another controller")
