"""Golden values for the preference losses, against hand computations written here with plain `math`.

The hand versions are scalar, one pair at a time, and share no code with the torch module; gradients are
checked against a central finite difference of the hand versions in float64 (and, for DPO, against the
derivative worked out by hand).
"""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.objectives.preference_losses import (
    REFERENCE_FREE,
    VARIANTS,
    PreferenceTerms,
    log1mexp,
    needs_reference,
    preference_loss,
)

# Three pairs, chosen so that: the hinge is inactive on pair 0 (beta h = 1.25 > 1) and active on the others; pair 1
# prefers the rejected answer (h < 0); pair 2's chosen answer is nearly certain (mean log-prob -0.01, where ORPO's
# log(1 - p) must not cancel).
POLICY_CHOSEN = [-10.5, -30.0, -0.03]
POLICY_REJECTED = [-14.0, -28.5, -9.0]
REF_CHOSEN = [-12.5, -29.0, -0.5]
REF_REJECTED = [-13.5, -29.5, -8.0]
CHOSEN_LENGTHS = [5, 12, 3]
REJECTED_LENGTHS = [7, 10, 4]
BETA = 0.5
EPS = 0.2  # label smoothing for robust / cdpo
GAMMA = 0.3  # SimPO's margin


# -- the hand computations -------------------------------------------------------------------------------------

def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def hand_h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def hand_dpo_rewards(pc, pr, rc, rr):
    return BETA * (pc - rc), BETA * (pr - rr)


def hand_sigmoid(pc, pr, rc, rr, cl, rl):
    return -log_sigmoid(BETA * hand_h(pc, pr, rc, rr)), *hand_dpo_rewards(pc, pr, rc, rr)


def hand_ipo(pc, pr, rc, rr, cl, rl):
    return (hand_h(pc, pr, rc, rr) - 1 / (2 * BETA)) ** 2, *hand_dpo_rewards(pc, pr, rc, rr)


def hand_hinge(pc, pr, rc, rr, cl, rl):
    return max(0.0, 1 - BETA * hand_h(pc, pr, rc, rr)), *hand_dpo_rewards(pc, pr, rc, rr)


def hand_robust(pc, pr, rc, rr, cl, rl, eps=EPS):
    z = BETA * hand_h(pc, pr, rc, rr)
    loss = ((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps)
    return loss, *hand_dpo_rewards(pc, pr, rc, rr)


def hand_cdpo(pc, pr, rc, rr, cl, rl, eps=EPS):
    z = BETA * hand_h(pc, pr, rc, rr)
    return (1 - eps) * -log_sigmoid(z) + eps * -log_sigmoid(-z), *hand_dpo_rewards(pc, pr, rc, rr)


def hand_simpo(pc, pr, rc, rr, cl, rl):
    chosen, rejected = BETA * pc / cl, BETA * pr / rl
    return -log_sigmoid(chosen - rejected - GAMMA), chosen, rejected


def hand_log_odds(mean_logp):
    return mean_logp - math.log(-math.expm1(mean_logp))  # log p - log(1 - p), p = exp(mean_logp)


def hand_orpo(pc, pr, rc, rr, cl, rl, nll=None):
    nll = -pc if nll is None else nll
    odds_ratio_loss = -log_sigmoid(hand_log_odds(pc / cl) - hand_log_odds(pr / rl))
    return nll / cl + BETA * odds_ratio_loss, BETA * pc / cl, BETA * pr / rl


HAND = {"sigmoid": hand_sigmoid, "ipo": hand_ipo, "hinge": hand_hinge, "robust": hand_robust, "cdpo": hand_cdpo,
        "simpo": hand_simpo, "orpo": hand_orpo}
SMOOTHING = {"robust": EPS, "cdpo": EPS}


def _rows():
    return list(zip(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LENGTHS, REJECTED_LENGTHS))


def _tensors(dtype=torch.float64):
    def t(values, grad=False):
        return torch.tensor(values, dtype=dtype, requires_grad=grad)
    return (t(POLICY_CHOSEN, True), t(POLICY_REJECTED, True), t(REF_CHOSEN), t(REF_REJECTED),
            torch.tensor(CHOSEN_LENGTHS), torch.tensor(REJECTED_LENGTHS))


def _ours(variant, dtype=torch.float64, **kw):
    pc, pr, rc, rr, cl, rl = _tensors(dtype)
    if variant in REFERENCE_FREE:
        rc = rr = None
    kw.setdefault("label_smoothing", SMOOTHING.get(variant, 0.0))
    terms = preference_loss(variant, pc, pr, rc, rr, beta=BETA, simpo_gamma=GAMMA, chosen_lengths=cl,
                            rejected_lengths=rl, **kw)
    return terms, pc, pr


def test_every_variant_has_a_hand_computation():
    assert set(HAND) == set(VARIANTS)


# -- golden values ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(HAND))
def test_losses_and_rewards_equal_the_hand_computation(variant):
    terms, _, _ = _ours(variant)
    assert isinstance(terms, PreferenceTerms)
    expected = [HAND[variant](*row) for row in _rows()]
    for got, column in zip((terms.losses, terms.chosen_rewards, terms.rejected_rewards), zip(*expected)):
        assert got.shape == (3,)
        for g, e in zip(got.tolist(), column):
            assert g == pytest.approx(e, rel=1e-6, abs=1e-6), (variant, got.tolist(), column)
    assert not terms.chosen_rewards.requires_grad and not terms.rejected_rewards.requires_grad
    assert terms.losses.requires_grad


def test_the_pairs_exercise_both_sides_of_the_hinge():
    losses = [hand_hinge(*row)[0] for row in _rows()]
    assert losses[0] == 0.0 and losses[1] > 0 and losses[2] > 0


def _finite_difference(fn, row, index, step=1e-5):
    up, down = list(row), list(row)
    up[index] += step
    down[index] -= step
    return (fn(*up)[0] - fn(*down)[0]) / (2 * step)


@pytest.mark.parametrize("variant", sorted(HAND))
def test_gradients_equal_the_finite_difference_of_the_hand_computation(variant):
    terms, pc, pr = _ours(variant)
    grad_chosen, grad_rejected = torch.autograd.grad(terms.losses.sum(), [pc, pr])
    for i, row in enumerate(_rows()):
        assert grad_chosen[i].item() == pytest.approx(_finite_difference(HAND[variant], row, 0), abs=1e-6)
        assert grad_rejected[i].item() == pytest.approx(_finite_difference(HAND[variant], row, 1), abs=1e-6)


def test_dpo_gradient_equals_the_derivative_worked_by_hand():
    # d/d policy_chosen of -log sigmoid(beta h) = -beta * sigmoid(-beta h); policy_rejected gets the opposite.
    terms, pc, pr = _ours("sigmoid")
    grad_chosen, grad_rejected = torch.autograd.grad(terms.losses.sum(), [pc, pr])
    for i, row in enumerate(_rows()):
        expected = -BETA / (1 + math.exp(BETA * hand_h(*row[:4])))
        assert grad_chosen[i].item() == pytest.approx(expected, abs=1e-9)
        assert grad_rejected[i].item() == pytest.approx(-expected, abs=1e-9)


def test_orpo_reads_a_given_chosen_nll_instead_of_the_policy_sum():
    nll = [11.0, 31.5, 0.25]  # e.g. an NLL over a different token set than the log-prob sum
    terms, pc, _ = _ours("orpo", chosen_nll=torch.tensor(nll, dtype=torch.float64))
    for got, row, n in zip(terms.losses.tolist(), _rows(), nll):
        assert got == pytest.approx(hand_orpo(*row, nll=n)[0], rel=1e-6, abs=1e-6)
    (grad_chosen,) = torch.autograd.grad(terms.losses.sum(), [pc])
    for i, (row, n) in enumerate(zip(_rows(), nll)):  # only the odds-ratio term depends on policy_chosen now
        fd = _finite_difference(lambda *r, n=n: hand_orpo(*r, nll=n), row, 0)
        assert grad_chosen[i].item() == pytest.approx(fd, abs=1e-6)


# -- properties the DPO objective relies on --------------------------------------------------------------------

@pytest.mark.parametrize("variant,eps", [("sigmoid", 0.0), ("cdpo", 0.3), ("robust", 0.3)])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(variant, eps):
    # Step 0 of DPO: the policy starts as the reference, so h = 0 and -log sigmoid(0) = ln 2 for every pair
    # (label smoothing keeps it: both of its terms are ln 2 there).
    logps = torch.tensor([-3.0, -41.5, -0.2], dtype=torch.float64)
    other = torch.tensor([-7.0, -12.0, -60.0], dtype=torch.float64)
    terms = preference_loss(variant, logps.clone(), other.clone(), logps, other, beta=0.1, label_smoothing=eps)
    assert terms.losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-12)
    assert terms.chosen_rewards.tolist() == [0.0] * 3 and terms.rejected_rewards.tolist() == [0.0] * 3


@pytest.mark.parametrize("variant", ["robust", "cdpo"])
def test_zero_label_smoothing_is_dpo(variant):
    smoothed, pc_s, pr_s = _ours(variant, label_smoothing=0.0)
    plain, pc_p, pr_p = _ours("sigmoid")
    torch.testing.assert_close(smoothed.losses, plain.losses, rtol=0, atol=1e-12)
    grads_s = torch.autograd.grad(smoothed.losses.sum(), [pc_s, pr_s])
    grads_p = torch.autograd.grad(plain.losses.sum(), [pc_p, pr_p])
    for gs, gp in zip(grads_s, grads_p):
        torch.testing.assert_close(gs, gp, rtol=0, atol=1e-12)


def test_float32_inputs_stay_float32_and_match_float64():
    for variant in VARIANTS:
        single, _, _ = _ours(variant, dtype=torch.float32)
        double, _, _ = _ours(variant)
        assert single.losses.dtype == torch.float32
        torch.testing.assert_close(single.losses.double(), double.losses.detach(), rtol=1e-5, atol=1e-5)


def test_log1mexp_is_accurate_near_zero_and_far_below():
    xs = [-1e-10, -1e-4, -0.3, -math.log(2), -0.9, -5.0, -40.0]
    ours = log1mexp(torch.tensor(xs, dtype=torch.float32)).tolist()
    for x, got in zip(xs, ours):
        assert got == pytest.approx(math.log(-math.expm1(x)), rel=1e-6)


def test_orpo_stays_finite_when_the_model_is_certain():
    # A mean log-prob of exactly 0 means p = 1 and infinite odds; the loss and its gradient must stay finite.
    pc = torch.tensor([0.0, -2.0], requires_grad=True)
    pr = torch.tensor([0.0, -1e-9], requires_grad=True)
    lengths = torch.tensor([4, 4])
    terms = preference_loss("orpo", pc, pr, None, None, beta=0.1, chosen_lengths=lengths, rejected_lengths=lengths)
    terms.losses.sum().backward()
    assert torch.isfinite(terms.losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# -- refused inputs --------------------------------------------------------------------------------------------

def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown preference loss variant 'dpo'") as info:
        _ours("dpo")
    for name in VARIANTS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known variants"):
        needs_reference("kto")


def test_reference_free_variants_are_simpo_and_orpo():
    assert REFERENCE_FREE == {"simpo", "orpo"}
    assert [v for v in VARIANTS if not needs_reference(v)] == ["orpo", "simpo"]


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - REFERENCE_FREE))
@pytest.mark.parametrize("missing", ["ref_chosen", "ref_rejected"])
def test_reference_variants_refuse_a_missing_reference(variant, missing):
    pc, pr, rc, rr, _, _ = _tensors()
    refs = {"ref_chosen": rc, "ref_rejected": rr, missing: None}
    with pytest.raises(ValueError, match=f"'{variant}': {missing} is None, but this variant compares the policy"):
        preference_loss(variant, pc, pr, refs["ref_chosen"], refs["ref_rejected"], beta=BETA)


@pytest.mark.parametrize("variant", sorted(REFERENCE_FREE))
def test_reference_free_variants_refuse_missing_lengths(variant):
    pc, pr, _, _, cl, _ = _tensors()
    with pytest.raises(ValueError, match="rejected_lengths is None, but this variant averages log-probs per answer"):
        preference_loss(variant, pc, pr, None, None, beta=BETA, chosen_lengths=cl)
    with pytest.raises(ValueError, match="chosen_lengths has an entry < 1"):
        preference_loss(variant, pc, pr, None, None, beta=BETA, chosen_lengths=torch.tensor([3, 0, 2]),
                        rejected_lengths=cl)


def test_label_smoothing_is_refused_where_it_is_not_read_and_out_of_range():
    pc, pr, rc, rr, _, _ = _tensors()
    with pytest.raises(ValueError, match="'sigmoid' does not use label_smoothing .* only cdpo, robust read it"):
        preference_loss("sigmoid", pc, pr, rc, rr, beta=BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"'robust': label_smoothing must satisfy 0 <= eps < 0.5, got 0.5"):
        preference_loss("robust", pc, pr, rc, rr, beta=BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"'cdpo': label_smoothing must satisfy 0 <= eps <= 0.5, got -0.1"):
        preference_loss("cdpo", pc, pr, rc, rr, beta=BETA, label_smoothing=-0.1)
    preference_loss("cdpo", pc, pr, rc, rr, beta=BETA, label_smoothing=0.5)  # allowed: the bound is inclusive


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_beta_must_be_positive_and_finite(beta):
    pc, pr, rc, rr, _, _ = _tensors()
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        preference_loss("ipo", pc, pr, rc, rr, beta=beta)


def test_mismatched_shapes_name_the_argument():
    pc, pr, rc, rr, _, _ = _tensors()
    with pytest.raises(ValueError, match=r"ref_rejected has shape \(2,\), expected \(P,\) = \(3,\)"):
        preference_loss("sigmoid", pc, pr, rc, rr[:2], beta=BETA)
    with pytest.raises(ValueError, match=r"policy_rejected has shape \(3, 1\)"):
        preference_loss("sigmoid", pc, pr[:, None], rc, rr, beta=BETA)
