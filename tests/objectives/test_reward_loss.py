"""Reward model maths: the Bradley-Terry loss against a hand computation, and the reward read by position."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.data.chat import TokenizedExample
from tuneforge.data.collate import collate
from tuneforge.data.example import Example
from tuneforge.data.packing import collate_packed
from tuneforge.models.attention import register
from tuneforge.models.heads import TrainModule
from tuneforge.models.load import load_causal_lm
from tuneforge.objectives.reward import RewardObjective, bradley_terry_loss


def test_bradley_terry_golden_values():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # by hand: -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-1) = log(1 + e) = 1.313262
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)) + math.log1p(math.e), abs=1e-6)
    assert loss.item() == pytest.approx(0.313262 + 1.313262, abs=1e-5)
    assert metrics == {"accuracy": (1.0, 2.0), "reward_margin": (0.0, 2.0), "reward_chosen": (2.5, 2.0),
                       "reward_rejected": (2.5, 2.0)}
    margin = torch.tensor([1.0, 0.0])  # pair 1 must win by 1: -log sigmoid(0) = log 2
    loss_m, _ = bradley_terry_loss(chosen, rejected, margin)
    assert loss_m.item() == pytest.approx(math.log(2) + math.log1p(math.e), abs=1e-6)
    # centring: + coef * (r_c + r_r)^2 per pair = 0.1 * (9 + 4)
    loss_c, _ = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert loss_c.item() == pytest.approx(loss.item() + 1.3, abs=1e-5)


def _seq(ids):
    return TokenizedExample(list(ids), [0] + [1] * (len(ids) - 1))


class _RecordingHead(torch.nn.Module):
    """Returns the first hidden feature: what position the reward was read at is then visible."""

    def forward(self, h):
        return h[:, :1]


def _examples(eot):
    # every answer ends with the end-of-turn id, which is also the pad id (SmolLM2): a reader that looks for
    # the last non-pad token, or the first pad token, lands on the wrong position. Each pair shares its first
    # token (the "prompt", unsupervised).
    return [Example([_seq([5, 6, 7, eot]), _seq([5, 6, eot, 9, 10, eot])], [0, 1], ("chosen", "rejected"),
                    shared_prefix=1),
            Example([_seq([5, eot]), _seq([5, 8, 8, eot])], [0, 1], ("chosen", "rejected"), shared_prefix=1)]


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_reward_is_read_at_the_last_real_token_by_position(layout, tiny_model_dir):
    """"shared": packed with each pair's prompt once (tuneforge_varlen): the rejected answer's last token sits
    after the chosen answer without the prompt again, and its reward is still the one of prompt + rejected."""
    model, tok = load_causal_lm(str(tiny_model_dir))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == eot
    examples = _examples(eot)
    packed = layout != "padded"
    if layout == "shared":
        model.set_attn_implementation(register())
    batch = (collate_packed([examples], eot, share_prompt=layout == "shared") if packed
             else collate(examples, eot))
    module = TrainModule(model, {"reward": torch.nn.Linear(32, 1, bias=False)})
    with torch.no_grad():
        module.heads["reward"].weight.normal_()
        hidden = module(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        padded = collate(examples, eot)
        hidden_u = module(padded["input_ids"], padded["attention_mask"])
    flat = hidden.reshape(-1, hidden.shape[-1])
    want = module.heads["reward"](flat[batch["last_index"]]).squeeze(-1).detach()
    unpacked = module.heads["reward"](hidden_u.reshape(-1, hidden.shape[-1])[padded["last_index"]]).squeeze(-1)
    torch.testing.assert_close(want, unpacked, rtol=1e-5, atol=1e-6)  # every layout reads the same rewards
    # the positions themselves, from the sequence lengths alone
    ids = batch["input_ids"].reshape(-1)
    lengths = [len(s.input_ids) - (e.shared_prefix if layout == "shared" and k else 0)
               for e in examples for k, s in enumerate(e.sequences)]
    assert layout != "shared" or lengths == [4, 5, 2, 3]
    assert [int(ids[i]) for i in batch["last_index"]] == [eot] * 4
    T = batch["input_ids"].shape[1]
    if packed:  # one row, the sequences end to end (the rejected ones without their prompt when shared)
        assert batch["last_index"].tolist() == [sum(lengths[:k + 1]) - 1 for k in range(4)]
    else:
        assert batch["last_index"].tolist() == [r * T + n - 1 for r, n in enumerate(lengths)]
        # reading by pad id (HF's rightmost non-pad token) picks other positions here
        by_id = [r * T + int((batch["input_ids"][r] != eot).nonzero().max()) for r in range(4)]
        assert by_id != batch["last_index"].tolist()
    out = RewardObjective().loss(module, batch)
    chosen, rejected = want[[0, 2]], want[[1, 3]]
    expected = -torch.nn.functional.logsigmoid(chosen - rejected).sum()
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-6, atol=1e-6)
    assert out.count == 2.0
    assert out.metrics["reward_chosen"][0] == pytest.approx(float(chosen.sum()), abs=1e-6)


def test_padded_and_packed_rewards_agree(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir))
    eot = tok.pad_token_id
    module = TrainModule(model, {"reward": torch.nn.Linear(32, 1, bias=False)})
    examples = _examples(eot)
    padded = RewardObjective().loss(module, collate(examples, eot))
    packed = RewardObjective().loss(module, collate_packed([examples], eot))
    torch.testing.assert_close(padded.loss_sum, packed.loss_sum, rtol=1e-5, atol=1e-6)
    for key in padded.metrics:
        assert padded.metrics[key][0] == pytest.approx(packed.metrics[key][0], abs=1e-5)


def test_margin_from_the_batch_is_used(tiny_model_dir):
    model, tok = load_causal_lm(str(tiny_model_dir))
    module = TrainModule(model, {"reward": torch.nn.Linear(32, 1, bias=False)})
    batch = collate(_examples(tok.pad_token_id), tok.pad_token_id)
    plain = RewardObjective().loss(module, batch).loss_sum
    shifted = RewardObjective().loss(module, {**batch, "margin": torch.tensor([2.0, 2.0])}).loss_sum
    assert shifted.item() > plain.item() + 1.0  # a required margin of 2 costs more than 1 nat over 2 pairs
