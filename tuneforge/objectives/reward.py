"""Reward modelling: a scalar reward per answer, trained on preference pairs with the Bradley-Terry loss.

Each preference example is two sequences (roles "chosen", "rejected": prompt + answer); the reward of each is
the reward head on the final hidden state of its last real token (models/reward.py), read by position. The
loss sums over pairs and the loop divides by the pairs of the whole step (unit "pairs").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.errors import TuneforgeError
from tuneforge.models.reward import HEAD, rewards_at
from tuneforge.objectives.base import LossOutput, Objective
from tuneforge.objectives.functional import forward

CHOSEN, REJECTED = 0, 1  # role ids: the preference builder's role order ("chosen", "rejected")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float = 0.0):
    """(loss sum over the P pairs, detached (sum, count) metrics) for rewards (P,) of chosen and rejected answers.

    Bradley-Terry (Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022, eq. 1):
        loss = -log sigmoid(r_chosen - r_rejected - margin)
    with an optional per-pair margin (Touvron et al. 2023, Llama 2, eq. 2), plus optional reward centring
    (Eisenstein et al. 2023): + center_coef * (r_chosen + r_rejected)^2 per pair, which pins the free offset
    of the rewards near 0 (the Bradley-Terry term alone is unchanged by adding a constant to every reward).
    """
    diff = chosen_rewards - rejected_rewards  # (P,)
    shifted = diff if margin is None else diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(shifted).sum()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).sum()
    pairs = float(diff.numel())
    d = diff.detach()
    metrics = {"accuracy": (float((d > 0).sum()), pairs), "reward_margin": (float(d.sum()), pairs),
               "reward_chosen": (float(chosen_rewards.detach().sum()), pairs),
               "reward_rejected": (float(rejected_rewards.detach().sum()), pairs)}
    return loss, metrics


def pair_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (P,) into the batch's sequences of each pair's chosen and rejected answer, pair k of example k.

    The collators emit sequences example by example in role order, so the k-th chosen and the k-th rejected
    sequence belong to the same example; checked, not assumed."""
    role, example = batch["sequence_role"], batch["sequence_example"]
    chosen = torch.nonzero(role == CHOSEN).squeeze(-1)
    rejected = torch.nonzero(role == REJECTED).squeeze(-1)
    if chosen.numel() != rejected.numel() or not torch.equal(example[chosen], example[rejected]):
        raise TuneforgeError("a reward batch must hold one chosen and one rejected sequence per example "
                             "(preference data)")
    return chosen, rejected


class RewardObjective(Objective):
    unit = "pairs"

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    def loss(self, module, batch: dict) -> LossOutput:
        if "last_index" not in batch:
            raise TuneforgeError("method reward needs preference data (prompt, chosen, rejected records)")
        chosen, rejected = pair_rows(batch)

        def head_fn(hidden, tm):
            if HEAD not in tm.heads:
                raise TuneforgeError("method reward needs the model's reward head (built by the method's "
                                     "`heads` entry); this model has none")
            return rewards_at(hidden, batch["last_index"], tm.heads[HEAD])  # (S,)

        rewards = forward(module, batch, head_fn)
        loss, metrics = bradley_terry_loss(rewards[chosen], rewards[rejected], batch.get("margin"),
                                           self.center_coef)
        return LossOutput(loss, float(chosen.numel()), metrics)
