"""Golden values for the RL mathematics (rl/segments.py, rl/kl.py, rl/advantages.py, objectives/rl_losses.py).

Expected numbers are written here or computed with plain-Python `math` one token or one group at a time, by a
different route than the code: GAE by its explicit sum (Schulman et al. 2016 eq. 16) where the code runs the
backward recursion; RLOO by an explicit loop over the other samples; KL estimators checked against the exact
KL of small distributions. The flat layout used throughout: three completions of lengths 3, 1 and 2.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tuneforge.errors import TuneforgeError
from tuneforge.objectives.rl_losses import aggregate, clipped_policy_loss, clipped_value_loss
from tuneforge.rl.advantages import gae, group_advantages, ppo_token_rewards, rloo_advantages, whiten
from tuneforge.rl.kl import AdaptiveKLController, FixedKLController, kl_per_token, sequence_kl
from tuneforge.rl.segments import (
    check_segments,
    from_padded,
    last_token_index,
    positions,
    segment_lengths,
    segment_mean,
    to_padded,
)

SEGMENTS = [0, 0, 0, 1, 2, 2]  # lengths 3, 1, 2
SPANS = [(0, 3), (3, 4), (4, 6)]  # each sequence's [start, end) in the flat layout


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def seg(values=SEGMENTS):
    return torch.tensor(values, dtype=torch.long)


def close(actual, expected, tol=1e-9):
    assert torch.as_tensor(actual).tolist() == pytest.approx(expected, abs=tol)


# -- the flat layout -------------------------------------------------------------------------------------------

def test_flat_and_padded_layouts_round_trip_with_an_empty_sequence():
    segments = seg([0, 0, 0, 1, 3, 3])  # sequence 2 has no token
    values = t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    padded, mask = to_padded(values, segments, 4, pad=-9.0)
    assert padded.tolist() == [[1, 2, 3], [4, -9, -9], [-9, -9, -9], [5, 6, -9]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3, [True, True, False]]
    assert from_padded(padded, segments).tolist() == values.tolist()
    assert segment_lengths(segments, 4).tolist() == [3, 1, 0, 2]
    assert positions(segments, 4).tolist() == [0, 1, 2, 0, 0, 1]
    assert last_token_index(segments, 4).tolist() == [2, 3, -1, 5]
    close(segment_mean(values, segments, 4), [2.0, 4.0, 0.0, 5.5])  # the empty one is 0, not NaN


@pytest.mark.parametrize("segments, num, message", [
    ([0, 1, 0], 2, "in order"), ([0, 2], 2, r"\[0, 2\)"), ([-1, 0], 2, r"\[0, 2\)")])
def test_a_broken_layout_is_refused(segments, num, message):
    with pytest.raises(TuneforgeError, match=message):
        check_segments(seg(segments), num)


def test_a_per_token_tensor_of_the_wrong_length_is_refused():
    with pytest.raises(TuneforgeError, match="values has shape"):
        gae(t([1.0] * 6), t([1.0] * 5), seg(), 3, 1.0, 1.0)


# -- KL estimators and controllers ------------------------------------------------------------------------------

def test_kl_estimators_per_token():
    logps, ref = [-1.0, -0.5, -2.0], [-1.5, -0.5, -1.0]  # log r = ref - logp = -0.5, 0, 1
    close(kl_per_token(t(logps), t(ref), "k1"), [0.5, 0.0, -1.0])
    close(kl_per_token(t(logps), t(ref), "k2"), [0.125, 0.0, 0.5])
    close(kl_per_token(t(logps), t(ref), "k3"), [math.exp(-0.5) - 1 + 0.5, 0.0, math.e - 2])


def test_k1_and_k3_are_unbiased_for_kl_policy_to_reference():
    """E over tokens sampled from the policy q of k1 and k3 is KL(q || p) exactly, not KL(p || q) (the two differ
    by about 0.22 here); k2 is biased (by about 0.09 here)."""
    q, p = [0.9, 0.05, 0.05], [0.2, 0.4, 0.4]
    kl_qp = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p))
    kl_pq = sum(pi * math.log(pi / qi) for qi, pi in zip(q, p))
    assert abs(kl_qp - kl_pq) > 0.2
    logq, logp = t([math.log(x) for x in q]), t([math.log(x) for x in p])
    for name in ("k1", "k3"):
        expectation = float((t(q) * kl_per_token(logq, logp, name)).sum())
        assert expectation == pytest.approx(kl_qp, abs=1e-12), name
    k2 = float((t(q) * kl_per_token(logq, logp, "k2")).sum())
    assert k2 == pytest.approx(0.5 * (0.9 * math.log(0.2 / 0.9) ** 2 + 0.1 * math.log(8) ** 2), abs=1e-12)
    assert abs(k2 - kl_qp) > 0.05


def test_sequence_kl_sums_and_means_per_sequence():
    kl = t([0.1, 0.2, 0.3, 0.4, 0.5, 0.7])
    close(sequence_kl(kl, seg(), 3, "sum"), [0.6, 0.4, 1.2])
    close(sequence_kl(kl, seg(), 3, "mean"), [0.2, 0.4, 0.6])
    with pytest.raises(TuneforgeError, match="unknown KL estimator"):
        kl_per_token(kl, kl, "k4")


def test_fixed_controller_keeps_its_coefficient():
    ctl = FixedKLController(0.05)
    assert ctl.update(10.0, 64) == 0.05 and ctl.state_dict() == {"coef": 0.05}


def test_adaptive_controller_follows_ziegler_with_the_error_clipped():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000), rel=1e-15)  # 0.5 clipped to 0.2
    c1 = 0.2 * (1 + 0.2 * 256 / 10000)
    assert ctl.update(6.6, 100) == pytest.approx(c1 * (1 + 0.1 * 100 / 10000), rel=1e-12)  # error 0.1, inside
    c2 = c1 * 1.001
    assert ctl.update(0.0, 500) == pytest.approx(c2 * (1 - 0.2 * 500 / 10000), rel=1e-12)  # -1 clipped to -0.2
    assert ctl.update(6.0, 500) == pytest.approx(c2 * 0.99, rel=1e-12)  # on target: unchanged


def test_adaptive_controller_resumes_exactly_from_its_json_state():
    kls = [3.0, 7.5, 6.2, 12.0, 0.5, 5.9]
    straight = AdaptiveKLController(0.1, 6.0, 1000)
    for kl in kls:
        straight.update(kl, 32)
    first = AdaptiveKLController(0.1, 6.0, 1000)
    for kl in kls[:2]:
        first.update(kl, 32)
    resumed = AdaptiveKLController(0.1, 6.0, 1000)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for kl in kls[2:]:
        resumed.update(kl, 32)
    assert resumed.coef == straight.coef  # bit for bit


def test_controllers_refuse_bad_settings_state_and_kl():
    with pytest.raises(TuneforgeError, match="target KL"):
        AdaptiveKLController(0.1, 0.0, 1000)
    with pytest.raises(TuneforgeError, match="target 3.0"):
        AdaptiveKLController(0.1, 6.0, 1000).load_state_dict({"coef": 0.2, "target": 3.0, "horizon": 1000.0})
    with pytest.raises(TuneforgeError, match="another controller"):
        AdaptiveKLController(0.1, 6.0, 1000).load_state_dict({"coef": 0.2})
    with pytest.raises(TuneforgeError, match="not finite"):
        AdaptiveKLController(0.1, 6.0, 1000).update(float("nan"), 8)


# -- PPO rewards, GAE, whitening --------------------------------------------------------------------------------

def test_ppo_rewards_put_the_score_on_each_last_token():
    rewards = ppo_token_rewards(t([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), t([1.0, 2.0, -1.0]), seg(), kl_coef=0.5)
    close(rewards, [-0.05, -0.1, -0.15 + 1.0, -0.2 + 2.0, -0.25, -0.3 - 1.0])


def test_ppo_rewards_refuse_an_empty_completion_and_a_nan_score():
    with pytest.raises(TuneforgeError, match="sequence 1 has no completion token"):
        ppo_token_rewards(t([0.1, 0.2]), t([1.0, 2.0, 3.0]), seg([0, 2]), 0.1)
    with pytest.raises(TuneforgeError, match="scores is not finite at index 2"):
        ppo_token_rewards(t([0.1] * 6), t([1.0, 2.0, float("nan")]), seg(), 0.1)


def test_gae_by_hand_on_a_two_token_sequence():
    # gamma = lam = 1: delta_1 = 1 + 0 - 0.8 = 0.2, delta_0 = 0 + 0.8 - 0.5 = 0.3, A = (0.5, 0.2), R = (1, 1)
    adv, ret = gae(t([0.0, 1.0]), t([0.5, 0.8]), seg([0, 0]), 1, gamma=1.0, lam=1.0)
    close(adv, [0.5, 0.2])
    close(ret, [1.0, 1.0])


def hand_gae(rewards, values, gamma, lam):
    """The explicit sum A_t = sum_l (gamma lam)^l delta_{t+l} over one sequence, V after the end 0."""
    n = len(rewards)
    deltas = [rewards[i] + gamma * (values[i + 1] if i + 1 < n else 0.0) - values[i] for i in range(n)]
    adv = [sum((gamma * lam) ** (j - i) * deltas[j] for j in range(i, n)) for i in range(n)]
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_on_the_flat_layout_matches_the_explicit_sum_per_sequence():
    rewards = [0.1, -0.2, 1.5, 0.7, -0.3, 2.0]
    values = [0.4, 0.9, -0.1, 0.2, 1.1, 0.5]
    adv, ret = gae(t(rewards), t(values), seg(), 3, gamma=0.9, lam=0.95)
    expected_adv, expected_ret = [], []
    for start, end in SPANS:
        a, r = hand_gae(rewards[start:end], values[start:end], 0.9, 0.95)
        expected_adv += a
        expected_ret += r
    close(adv, expected_adv, 1e-12)
    close(ret, expected_ret, 1e-12)
    assert float(adv[3]) == pytest.approx(0.7 - 0.2)  # single-token sequence: A = r - V


def test_whitening_over_the_update_tokens():
    x = t([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population variance 1.25
    sd = math.sqrt(1.25 + 1e-8)
    close(whiten(x), [(v - 2.5) / sd for v in (1, 2, 3, 4)], 1e-12)
    close(whiten(x, shift_mean=False), [(v - 2.5) / sd + 2.5 for v in (1, 2, 3, 4)], 1e-12)
    mask = torch.tensor([True, True, False, True])  # mean 7/3, variance 14/9
    sd = math.sqrt(14 / 9 + 1e-8)
    close(whiten(x, mask=mask), [(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0, (4 - 7 / 3) / sd], 1e-12)
    close(whiten(t([3.0])), [0.0])  # one token: zero, not NaN


# -- group baselines --------------------------------------------------------------------------------------------

def test_group_advantages_normalise_per_group_with_the_sample_std():
    scores = t([0.0, 1.0, 2.0, 5.0, 2.0, 2.0, 2.0, 2.0])  # group 0: mean 2, sample var 14/3; group 1 all equal
    sd = math.sqrt(14 / 3)
    close(group_advantages(scores, 4, eps=1e-4), [(v - 2) / (sd + 1e-4) for v in (0, 1, 2, 5)] + [0.0] * 4, 1e-12)
    close(group_advantages(scores, 4, scale_rewards=False), [-2.0, -1.0, 0.0, 3.0] + [0.0] * 4)


def test_an_all_equal_group_gets_exactly_zero_never_nan():
    scores = torch.full((6,), 0.1, dtype=torch.float32)  # 0.1 in float32: its mean is not 0.1 bit for bit
    for adv in (group_advantages(scores, 3), group_advantages(scores, 3, scale_rewards=False),
                rloo_advantages(scores, 3)):
        assert adv.tolist() == [0.0] * 6


def test_rloo_leave_one_out_baseline():
    scores = [0.0, 1.0, 2.0, 5.0, 1.0, -1.0]  # groups of 3
    expected = []
    for g in range(2):
        group = scores[3 * g:3 * g + 3]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            expected.append(r - sum(others) / len(others))
    close(rloo_advantages(t(scores), 3), expected, 1e-12)
    close(rloo_advantages(t([0.0, 1.0, 2.0, 5.0]), 4), [-8 / 3, -4 / 3, 0.0, 4.0], 1e-12)


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_group_baselines_refuse_bad_groups(fn):
    with pytest.raises(TuneforgeError, match="num_generations >= 2"):
        fn(t([1.0, 2.0]), 1)
    with pytest.raises(TuneforgeError, match="groups of num_generations=4"):
        fn(t([1.0] * 6), 4)
    with pytest.raises(TuneforgeError, match="not finite at index 1"):
        fn(t([1.0, float("inf")]), 2)


# -- the clipped policy loss ------------------------------------------------------------------------------------

EPS_LOW, EPS_HIGH = 0.2, 0.28
OLD = [-1.2, -0.7, -2.0, -0.9, -1.6, -0.4]
# log-ratios and advantages chosen so that: token 0 clips high (r 1.49, A > 0), token 1 clips low (r 0.61, A < 0),
# tokens 2 and 4 are outside the range on the side where the unclipped term is larger, token 3 (the single-token
# sequence) is inside, token 5 (r 1.246) is inside only because of clip-higher (it would clip at eps 0.2).
LOG_RATIO = [0.4, -0.5, 0.4, 0.1, -0.5, 0.22]
ADV = [1.0, -2.0, -0.5, 0.7, 1.5, 0.3]


def hand_token_loss(log_ratio, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH):
    r = math.exp(log_ratio)
    clipped = min(max(r, 1 - eps_low), 1 + eps_high)
    return max(-adv * r, -adv * clipped)


def policy_inputs():
    old = t(OLD)
    logps = (old + t(LOG_RATIO)).requires_grad_(True)
    return logps, old, t(ADV)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "token"])
def test_policy_loss_and_its_aggregation_by_hand(loss_type):
    logps, old, adv = policy_inputs()
    out = clipped_policy_loss(logps, old, adv, seg(), 3, loss_type=loss_type, eps_low=EPS_LOW,
                              eps_high=EPS_HIGH, max_new_tokens=4)
    tokens = [hand_token_loss(lr, a) for lr, a in zip(LOG_RATIO, ADV)]
    means = [sum(tokens[s:e]) / (e - s) for s, e in SPANS]
    expected = {"grpo": (sum(means), 3), "dr_grpo": (sum(tokens) / 4, 3),
                "dapo": (sum(tokens), 6), "token": (sum(tokens), 6)}[loss_type]
    assert out.loss_sum.item() == pytest.approx(expected[0], abs=1e-12)
    assert out.count == expected[1]


def test_policy_loss_metrics():
    logps, old, adv = policy_inputs()
    m = clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="dapo", eps_low=EPS_LOW, eps_high=EPS_HIGH).metrics
    assert m["clip_fraction"] == (2.0, 6.0)
    assert m["clip_low_fraction"] == (1.0, 6.0) and m["clip_high_fraction"] == (1.0, 6.0)
    ratios = [math.exp(x) for x in LOG_RATIO]
    assert m["ratio_mean"][0] == pytest.approx(sum(ratios)) and m["ratio_mean"][1] == 6.0
    assert m["ratio_min"] == (pytest.approx(math.exp(-0.5)), 1.0)
    assert m["ratio_max"] == (pytest.approx(math.exp(0.4)), 1.0)
    # KL(old || new) by k3 with tokens from the old policy: r = new / old, k3 = r - 1 - log r
    assert m["approx_kl"][0] == pytest.approx(sum(math.exp(x) - 1 - x for x in LOG_RATIO))
    symmetric = clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="dapo", eps_low=0.2).metrics
    assert symmetric["clip_high_fraction"] == (2.0, 6.0)  # token 5 now clips too


def test_clipped_tokens_get_zero_gradient_the_others_minus_a_times_r():
    logps, old, adv = policy_inputs()
    out = clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="dapo", eps_low=EPS_LOW, eps_high=EPS_HIGH)
    out.loss_sum.backward()
    expected = [0.0 if i in (0, 1) else -ADV[i] * math.exp(LOG_RATIO[i]) for i in range(6)]
    close(logps.grad, expected, 1e-12)


def test_ratio_one_gives_the_unclipped_policy_gradient_per_sequence_mean():
    """On the first epoch of a batch the policy is the sampling policy: r = 1 everywhere, nothing clips, and the
    loss's gradient is REINFORCE's -A grad log pi (here divided by each sequence's length, loss_type grpo)."""
    old = t(OLD)
    logps = old.clone().requires_grad_(True)
    out = clipped_policy_loss(logps, old, t(ADV), seg(), 3, loss_type="grpo", eps_low=0.2)
    out.loss_sum.backward()
    lengths = [3, 3, 3, 1, 2, 2]
    close(logps.grad, [-a / n for a, n in zip(ADV, lengths)], 1e-12)
    assert out.loss_sum.item() == pytest.approx(-(sum(ADV[:3]) / 3 + ADV[3] + sum(ADV[4:]) / 2))
    assert out.metrics["clip_fraction"] == (0.0, 6.0) and out.metrics["approx_kl"][0] == 0.0


def test_the_kl_penalty_to_the_reference_adds_beta_k3_per_token():
    old = t(OLD)
    ref = [-1.0, -0.9, -1.5, -0.9, -2.0, -0.1]
    logps = old.clone().requires_grad_(True)
    beta = 0.04
    out = clipped_policy_loss(logps, old, t(ADV), seg(), 3, loss_type="dapo", ref_logps=t(ref), beta=beta)
    k3 = [math.exp(r - lp) - 1 - (r - lp) for r, lp in zip(ref, OLD)]
    assert out.loss_sum.item() == pytest.approx(sum(-a + beta * k for a, k in zip(ADV, k3)), abs=1e-12)
    assert out.metrics["kl"] == (pytest.approx(sum(k3)), 6.0)
    out.loss_sum.backward()  # d k3 / d logp = 1 - exp(ref - logp)
    close(logps.grad, [-a + beta * (1 - math.exp(r - lp)) for a, r, lp in zip(ADV, ref, OLD)], 1e-12)


def test_an_empty_sequence_counts_as_a_sequence_and_adds_nothing():
    old = t([-1.0, -2.0, -0.5])
    logps = old.clone().requires_grad_(True)
    out = clipped_policy_loss(logps, old, t([1.0, 3.0, -2.0]), seg([0, 0, 2]), 3, loss_type="grpo")
    assert out.loss_sum.item() == pytest.approx(-(2.0 + 0.0 - 2.0)) and out.count == 3.0


def test_a_micro_batch_without_tokens_reports_the_same_metric_names_with_zero_counts():
    empty, none = torch.zeros(0, dtype=torch.float64, requires_grad=True), torch.zeros(0, dtype=torch.long)
    full = clipped_policy_loss(*policy_inputs(), seg(), 3, loss_type="grpo")
    out = clipped_policy_loss(empty, empty.detach(), empty.detach(), none, 2, loss_type="grpo")
    assert out.loss_sum.item() == 0.0 and out.count == 2.0
    assert sorted(out.metrics) == sorted(full.metrics)
    assert all(count == 0.0 for _, count in out.metrics.values())


def test_policy_loss_refuses_bad_settings():
    logps, old, adv = policy_inputs()
    with pytest.raises(TuneforgeError, match="unknown loss_type"):
        clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="seq")
    with pytest.raises(TuneforgeError, match="dr_grpo needs max_new_tokens"):
        clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="dr_grpo")
    with pytest.raises(TuneforgeError, match="more than max_new_tokens=2"):
        clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="dr_grpo", max_new_tokens=2)
    with pytest.raises(TuneforgeError, match="needs the reference"):
        clipped_policy_loss(logps, old, adv, seg(), 3, loss_type="grpo", beta=0.04)
    with pytest.raises(TuneforgeError, match="advantages is not finite at token 4"):
        clipped_policy_loss(logps, old, t([0.0] * 4 + [float("nan"), 0.0]), seg(), 3, loss_type="grpo")


def test_grpo_aggregation_is_the_same_split_into_micro_batches_along_sequences():
    """The loop adds (sum, count) over micro-batches: for grpo that is exact when each sequence stays whole."""
    values = t([1.0, 2.0, 3.0, 10.0, 4.0, 8.0])
    whole = aggregate(values, seg(), 3, "grpo")
    first, second = aggregate(values[:4], seg([0, 0, 0, 1]), 2, "grpo"), aggregate(values[4:], seg([0, 0]), 1, "grpo")
    assert (float(first[0] + second[0]) / (first[1] + second[1])) == pytest.approx(float(whole[0]) / whole[1])
    assert float(whole[0]) / whole[1] == pytest.approx((2.0 + 10.0 + 6.0) / 3)


# -- the clipped value loss -------------------------------------------------------------------------------------

V, V_OLD, RETURNS = [1.0, 0.3, 2.0, -1.0], [0.5, 0.4, 1.0, 0.0], [1.2, 0.0, 3.0, 0.5]
VALUE_SEGMENTS = [0, 0, 1, 1]


def test_value_loss_by_hand():
    # clip(V) = 0.7, 0.3, 1.2, -0.2; errors 0.04 / 0.25, 0.09 / 0.09, 1 / 3.24, 2.25 / 0.49: the max halved
    tokens = [0.125, 0.045, 1.62, 1.125]
    values = t(V).requires_grad_(True)
    out = clipped_value_loss(values, t(V_OLD), t(RETURNS), seg(VALUE_SEGMENTS), 2, clip_range=0.2, loss_type="dapo")
    assert out.loss_sum.item() == pytest.approx(sum(tokens)) and out.count == 4.0
    assert out.metrics["value_clip_fraction"] == (2.0, 4.0)
    assert out.metrics["value_error"][0] == pytest.approx(0.04 + 0.09 + 1.0 + 2.25)
    out.loss_sum.backward()  # tokens 0 and 2: the clipped error wins and is flat in V; else d/dV = V - R
    close(values.grad, [0.0, 0.3, 0.0, -1.5], 1e-12)
    grpo = clipped_value_loss(t(V), t(V_OLD), t(RETURNS), seg(VALUE_SEGMENTS), 2, clip_range=0.2, loss_type="grpo")
    assert float(grpo.loss_sum) == pytest.approx((0.125 + 0.045) / 2 + (1.62 + 1.125) / 2) and grpo.count == 2.0


def test_value_loss_without_clipping_is_half_the_squared_error():
    out = clipped_value_loss(t(V), t(V_OLD), t(RETURNS), seg(VALUE_SEGMENTS), 2, clip_range=None, loss_type="dapo")
    assert out.loss_sum.item() == pytest.approx(0.5 * (0.04 + 0.09 + 1.0 + 2.25))
    assert out.metrics["value_clip_fraction"] == (0.0, 4.0)


def test_whitening_across_ranks_uses_every_ranks_tokens():
    """Under data parallelism (all_sum adds over ranks) a rank's tokens are whitened with the statistics of the
    whole batch, as one rank holding it all: here "rank 0" holds x[:2], the other rank x[2:] (masked token too)."""
    x, mask = t([1.0, 2.0, 3.0, 4.0, 9.0]), t([1.0, 1.0, 1.0, 1.0, 0.0])

    def other_rank(theirs):
        means = []

        def all_sum(values):  # first call: (sum, count); second: the squares about the global mean
            other = ([float(theirs.sum()), float(theirs.numel())] if not means
                     else [float((theirs - means[0]).square().sum())])
            out = [a + b for a, b in zip(values, other)]
            means.append(out[0] / out[1] if not means else None)
            return out
        return all_sum

    expected = whiten(x, mask=mask)
    close(whiten(x[:2], all_sum=other_rank(x[2:4].double())), expected[:2].tolist(), 1e-12)
    close(whiten(x[2:], mask=mask[2:], all_sum=other_rank(x[:2].double())), expected[2:].tolist(), 1e-12)
