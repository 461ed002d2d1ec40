"""rlmt_megatron.algorithms against independent float64 references written with plain loops/math.

Every reference below is written from the formula, not by calling the module. Inputs are random,
with several groups and right-padded masks; float64 must match to 1e-10, float32 to ~1e-5.
"""

import math
import re

import pytest
import torch

from rlmt_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    DPO_LOSSES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    SFT_LOSSES,
    VALUE_LOSSES,
    GlobalNormalizers,
    PolicyLossConfig,
    aggregate,
    broadcast_to_tokens,
    clipped_value_loss,
    dr_grpo,
    fold_kl_into_rewards,
    gae,
    get_advantage_estimator,
    get_aggregation,
    get_dpo_loss,
    get_kl_estimator,
    get_policy_loss,
    get_sft_loss,
    get_value_loss,
    global_normalizers,
    grpo,
    masked_whiten,
    nll,
    outcome_to_token_rewards,
    policy_objective,
    ppo_clip,
    KLController,
    overlong_penalty,
    reinforce_pp,
    reinforce_pp_baseline,
    require_finite,
    rloo,
    sigmoid_dpo,
)

DTYPES = [pytest.param(torch.float64, 1e-10, id="f64"), pytest.param(torch.float32, 1e-5, id="f32")]


# ----------------------------------------------------------------------------- inputs


def right_padded(lengths, T, dtype=torch.bool):
    return torch.tensor([[t < n for t in range(T)] for n in lengths], dtype=dtype)


def make_batch(dtype, B=9, T=7, seed=0):
    """Random lengths (1..T, incl. both extremes) and random per-token tensors, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, T] + torch.randint(1, T + 1, (B - 2,), generator=g).tolist()
    mask = right_padded(lengths, T)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return lengths, mask, rnd


def close(actual, expected, tol):
    actual = torch.as_tensor(actual).to(torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def assert_zero_on_padding(t, mask):
    assert torch.equal(t[~mask], torch.zeros_like(t[~mask]))


# ----------------------------------------------------------------------------- references


def ref_group_stats(values, ids):
    groups = {}
    for v, g in zip(values, ids):
        groups.setdefault(g, []).append(v)
    return groups


def ref_grpo(rewards, ids, normalize_std=True, eps=1e-6):
    groups = ref_group_stats(rewards, ids)
    out = []
    for r, g in zip(rewards, ids):
        xs = groups[g]
        n = len(xs)
        if n == 1 or max(xs) == min(xs):
            out.append(0.0)
            continue
        mean = sum(xs) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        out.append((r - mean) / (std + eps) if normalize_std else r - mean)
    return out


def ref_rloo(rewards, ids):
    groups = ref_group_stats(rewards, ids)
    return [r - (sum(groups[g]) - r) / (len(groups[g]) - 1) for r, g in zip(rewards, ids)]


def ref_token_rewards(rewards, lengths, T, kl, kl_coef):
    """Outcome reward on the last valid token, minus kl_coef * KL on every valid token."""
    return [[(-kl_coef * kl[b][t] + (rewards[b] if t == n - 1 else 0.0)) if t < n else 0.0 for t in range(T)]
            for b, n in enumerate(lengths)]


def ref_whiten(rows, lengths, eps=1e-8):
    """verl's masked_whiten: mean and unbiased variance over the valid entries, eps inside the root."""
    valid = [rows[b][t] for b, n in enumerate(lengths) for t in range(n)]
    mean = sum(valid) / len(valid)
    var = sum((x - mean) ** 2 for x in valid) / max(len(valid) - 1, 1)
    scale = 1.0 / math.sqrt(var + eps)
    return [[(rows[b][t] - mean) * scale if t < n else 0.0 for t in range(len(rows[b]))] for b, n in enumerate(lengths)]


def ref_reinforce_pp(token_rewards, lengths, T, gamma):
    returns = []
    for b, n in enumerate(lengths):
        row, run = [0.0] * T, 0.0
        for t in range(n - 1, -1, -1):
            run = token_rewards[b][t] + gamma * run
            row[t] = run
        returns.append(row)
    return ref_whiten(returns, lengths), returns


def ref_gae(rewards, values, lengths, T, gamma, lam):
    adv, ret = [], []
    for b, n in enumerate(lengths):
        a_row, last = [0.0] * T, 0.0
        for t in range(n - 1, -1, -1):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            a_row[t] = last
        adv.append(a_row)
        ret.append([a_row[t] + values[b][t] if t < n else 0.0 for t in range(T)])
    return adv, ret


def ref_kl(name, lp, rp):
    if name == "k1":
        return lp - rp
    if name == "k2":
        return 0.5 * (lp - rp) ** 2
    d = min(max(rp - lp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1.0, -10.0), 10.0)


def ref_ppo(lp, olp, a, lo, hi, c):
    r = math.exp(min(max(lp - olp, -20.0), 20.0))
    pessimistic = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    if c is not None and a < 0:
        return min(pessimistic, -a * c)
    return pessimistic


def ref_value(v, vo, R, eps):
    if eps is None:
        return 0.5 * (v - R) ** 2
    vc = min(max(v, vo - eps), vo + eps)
    return 0.5 * max((v - R) ** 2, (vc - R) ** 2)


def ref_logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_aggregate(mode, loss, lengths, norm_constant):
    tokens = sum(lengths)
    seqs = sum(1 for n in lengths if n > 0)
    if mode == "token_mean":
        return sum(loss[b][t] for b, n in enumerate(lengths) for t in range(n)) / tokens
    if mode == "seq_mean_token_mean":
        return sum(sum(loss[b][:n]) / n for b, n in enumerate(lengths) if n > 0) / seqs
    if mode == "seq_mean_token_sum":
        return sum(loss[b][t] for b, n in enumerate(lengths) for t in range(n)) / seqs
    return sum(loss[b][t] for b, n in enumerate(lengths) for t in range(n)) / (seqs * norm_constant)


def per_token(fn, lengths, T, *rows):
    return [[fn(*(r[b][t] for r in rows)) if t < n else 0.0 for t in range(T)] for b, n in enumerate(lengths)]


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_reference(dtype, tol, normalize_std):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(12, generator=g, dtype=torch.float64).to(dtype)
    rewards[8:12] = 0.25  # one group with identical rewards
    expected = ref_grpo(rewards.double().tolist(), [i // 4 for i in range(12)], normalize_std)
    close(grpo(rewards, group_size=4, normalize_std=normalize_std), expected, tol)
    if not normalize_std:
        close(dr_grpo(rewards, group_size=4), expected, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_grpo_non_contiguous_group_ids_and_singletons(dtype, tol):
    rewards = torch.tensor([0.3, 1.0, -0.2, 0.7, 0.5, 2.0, 0.1], dtype=dtype)
    ids = ["p", "q", "p", "q", "solo", "p", "q"]
    expected = ref_grpo(rewards.double().tolist(), ids)
    assert expected[4] == 0.0
    close(grpo(rewards, group_ids=ids), expected, tol)
    int_ids = torch.tensor([5, 9, 5, 9, 0, 5, 9])
    close(grpo(rewards, group_ids=int_ids), expected, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grpo_identical_rewards_give_exactly_zero(dtype):
    rewards = torch.tensor([0.1] * 3 + [0.7] * 3 + [1.0, 0.0, 0.2], dtype=dtype)
    adv = grpo(rewards, group_size=3)
    assert torch.equal(adv[:6], torch.zeros(6, dtype=dtype))
    assert torch.equal(dr_grpo(rewards, group_size=3)[:6], torch.zeros(6, dtype=dtype))
    assert adv[6:].abs().min() > 0.1


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_rloo_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(2)
    rewards = torch.rand(15, generator=g, dtype=torch.float64).to(dtype)
    expected = ref_rloo(rewards.double().tolist(), [i // 5 for i in range(15)])
    close(rloo(rewards, group_size=5), expected, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kl_coef,gamma", [(0.0, 1.0), (0.05, 1.0), (0.1, 0.9)])
def test_reinforce_pp_matches_reference(dtype, tol, kl_coef, gamma):
    lengths, mask, rnd = make_batch(dtype, seed=3)
    rewards, kl = rnd(len(lengths)), rnd(len(lengths), 7, scale=0.1).abs()
    tokens = ref_token_rewards(rewards.double().tolist(), lengths, 7, kl.double().tolist(), kl_coef)
    adv, ret = reinforce_pp(torch.tensor(tokens, dtype=dtype), mask, gamma=gamma)
    e_adv, e_ret = ref_reinforce_pp(tokens, lengths, 7, gamma)
    close(ret, e_ret, tol)
    close(adv, e_adv, tol)
    assert_zero_on_padding(adv, mask)


def test_reinforce_pp_token_rewards_from_the_helpers():
    """The pipeline the trainer runs: outcome reward placed on the last token, KL folded in."""
    lengths, mask, rnd = make_batch(torch.float64, seed=15)
    B = len(lengths)
    rewards, old = rnd(B), -rnd(B, 7).abs()
    ref = old + rnd(B, 7, scale=0.2)
    tokens = fold_kl_into_rewards(outcome_to_token_rewards(rewards, mask), old, ref, mask, 0.05, "k1")
    adv, _ = reinforce_pp(tokens, mask, gamma=0.95)
    kl = (old - ref).tolist()
    e_adv, _ = ref_reinforce_pp(ref_token_rewards(rewards.tolist(), lengths, 7, kl, 0.05), lengths, 7, 0.95)
    close(adv, e_adv, 1e-10)


class FakeAllReduce:
    """The other rank's half of a two-rank all-reduce, added by hand: masked_whiten asks first for
    [sum, count], then for [sum of squared deviations from the global mean]."""

    def __init__(self, other_rows, other_lengths):
        self.rows, self.lengths, self.calls, self.mean = other_rows, other_lengths, [], None

    def __call__(self, local):
        valid = [self.rows[b][t] for b, n in enumerate(self.lengths) for t in range(n)]
        if not self.calls:
            out = [local[0] + sum(valid), local[1] + len(valid)]
            self.mean = out[0] / out[1]
        else:
            out = [local[0] + sum((x - self.mean) ** 2 for x in valid)]
        self.calls.append(list(local))
        return out


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_masked_whiten_matches_reference_on_one_rank_and_split_over_two(dtype, tol):
    lengths, mask, rnd = make_batch(dtype, seed=16)
    x = rnd(len(lengths), 7, scale=3.0) + 5.0  # a mean far from 0, as returns have
    x[~mask] = 1e6  # padding must not leak into the statistics
    expected = ref_whiten(x.double().tolist(), lengths)
    close(masked_whiten(x, mask), expected, tol)
    # ragged rows as a list (one tensor per sequence, no padding)
    rows = masked_whiten([x[b, :n] for b, n in enumerate(lengths)], [mask[b, :n] for b, n in enumerate(lengths)])
    for b, n in enumerate(lengths):
        close(rows[b], expected[b][:n], tol)
    # two "ranks", each whitening its half with the other half's sums added by the callback
    halves = [(slice(0, 4), slice(4, None)), (slice(4, None), slice(0, 4))]
    for mine, other in halves:
        reduce = FakeAllReduce(x[other].double().tolist(), lengths[other])
        close(masked_whiten(x[mine], mask[mine], reduce=reduce), expected[mine], tol)
        assert len(reduce.calls) == 2
    # a rank whose entries are all masked still takes part and gets zeros
    reduce = FakeAllReduce(x.double().tolist(), lengths)
    empty = masked_whiten(x[:2], torch.zeros(2, 7, dtype=torch.bool), reduce=reduce)
    assert torch.equal(empty, torch.zeros_like(empty)) and reduce.calls[0] == [0.0, 0.0]


def test_masked_whiten_edge_cases():
    one = masked_whiten(torch.tensor([[3.0, 9.0]], dtype=torch.float64), torch.tensor([[True, False]]))
    assert one.tolist() == [[0.0, 0.0]]  # a single valid entry: x - mean = 0
    with pytest.raises(ValueError, match="no valid tokens"):
        masked_whiten(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no valid tokens"):  # every rank empty
        masked_whiten(torch.zeros(2, 3), torch.zeros(2, 3), reduce=lambda v: [2 * x for x in v])
    with pytest.raises(ValueError, match=r"values\[0\] contains NaN/inf"):
        masked_whiten(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))


def test_estimators_of_one_kind_take_their_arguments_in_one_order():
    import inspect

    def params(fn, k):
        return list(inspect.signature(fn).parameters)[:k]

    for fn in (grpo, dr_grpo, rloo):
        assert params(fn, 3) == ["rewards", "group_ids", "group_size"], fn.__name__
    assert params(reinforce_pp, 2) == ["token_rewards", "mask"]
    assert params(gae, 3) == ["token_rewards", "values", "mask"]
    rewards = torch.tensor([0.3, 1.0, -0.2, 0.7], dtype=torch.float64)
    ids = [0, 1, 0, 1]
    assert torch.equal(rloo(rewards, ids), rloo(rewards, group_ids=ids))  # positional = group_ids
    assert torch.equal(grpo(rewards, ids), grpo(rewards, group_ids=ids))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_reference(dtype, tol, gamma, lam):
    lengths, mask, rnd = make_batch(dtype, seed=4)
    rewards, values = rnd(len(lengths), 7), rnd(len(lengths), 7)
    values[~mask] = 1e3  # garbage past the end must be ignored
    adv, ret = gae(rewards, values, mask, gamma, lam)
    e_adv, e_ret = ref_gae(rewards.double().tolist(), values.double().tolist(), lengths, 7, gamma, lam)
    close(adv, e_adv, tol)
    close(ret, e_ret, tol)
    assert_zero_on_padding(adv, mask)


def test_gae_gamma_lambda_one_zero_values_is_reward_to_go():
    lengths, mask, rnd = make_batch(torch.float64, seed=5)
    rewards = rnd(len(lengths), 7)
    adv, ret = gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
    for b, n in enumerate(lengths):
        for t in range(7):
            expected = sum(rewards[b, s].item() for s in range(t, n)) if t < n else 0.0
            assert abs(adv[b, t].item() - expected) < 1e-12
    assert torch.equal(adv, ret)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_token_placement_helpers(dtype, tol):
    lengths, mask, rnd = make_batch(dtype, seed=6)
    seq = rnd(len(lengths))
    placed = outcome_to_token_rewards(seq, mask)
    spread = broadcast_to_tokens(seq, mask)
    for b, n in enumerate(lengths):
        for t in range(7):
            assert placed[b, t].item() == (seq[b].item() if t == n - 1 else 0.0)
            assert spread[b, t].item() == (seq[b].item() if t < n else 0.0)


def ref_reinforce_pp_baseline(rewards, ids, lengths, T):
    """Each reward minus its group's mean (0 for a group of one or of equal rewards), on every
    valid token, whitened over all valid tokens."""
    groups = ref_group_stats(rewards, ids)
    centered = [0.0 if len(groups[g]) == 1 or max(groups[g]) == min(groups[g]) else r - sum(groups[g]) / len(groups[g])
                for r, g in zip(rewards, ids)]
    return ref_whiten([[centered[b] if t < n else 0.0 for t in range(T)] for b, n in enumerate(lengths)], lengths)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_reinforce_pp_baseline_matches_reference(dtype, tol):
    lengths, mask, rnd = make_batch(dtype, B=9)
    rewards = rnd(9)
    rewards[6:9] = 0.5  # a group of equal rewards
    ids = [0, 0, 1, 1, 1, 2, 3, 3, 3]  # group 2 has one sample
    adv = reinforce_pp_baseline(rewards, mask, group_ids=ids)
    close(adv, ref_reinforce_pp_baseline(rewards.double().tolist(), ids, lengths, 7), tol)
    assert_zero_on_padding(adv, mask)
    # two data-parallel ranks whitening their shares after the global group means: the same numbers
    tokens = broadcast_to_tokens(dr_grpo(rewards, group_ids=ids), mask)
    other = FakeAllReduce(tokens[4:].double().tolist(), lengths[4:])
    close(masked_whiten(tokens[:4], mask[:4], other), adv[:4], tol)


# ----------------------------------------------------------------------------- KL


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("name", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators_match_reference(dtype, tol, name):
    g = torch.Generator().manual_seed(7)
    logp = -torch.rand(5, 6, generator=g, dtype=torch.float64).to(dtype) * 3
    ref = -torch.rand(5, 6, generator=g, dtype=torch.float64).to(dtype) * 3
    ref[0, 0], logp[0, 1] = 5.0, 30.0  # exercise k3's log-ratio and output clamps
    est = get_kl_estimator(name)(logp, ref)
    key = "k3" if name == "low_var_kl" else name
    rows = zip(logp.double().tolist(), ref.double().tolist())
    expected = [[ref_kl(key, a, b) for a, b in zip(r1, r2)] for r1, r2 in rows]
    close(est, expected, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_kl_is_exactly_zero_when_policy_equals_reference(dtype, name):
    logp = -torch.rand(4, 5, dtype=dtype) * 10
    assert torch.equal(get_kl_estimator(name)(logp, logp.clone()), torch.zeros_like(logp))


@pytest.mark.parametrize("name,base", [("k1+", "k1"), ("k3+", "k3"), ("low_var_kl+", "k3")])
def test_straight_through_kl_has_the_estimators_value_and_k2s_gradient(name, base):
    g = torch.Generator().manual_seed(11)
    logp = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    weights = torch.randn(4, 5, generator=g, dtype=torch.float64)
    est = get_kl_estimator(name)(logp, ref)
    lp, rp = logp.detach().tolist(), ref.tolist()
    close(est.detach(), [[ref_kl(base, a, b) for a, b in zip(r1, r2)] for r1, r2 in zip(lp, rp)], 1e-12)
    (est * weights).sum().backward()
    # d/dlogp of 0.5 (logp - ref)^2 = logp - ref, token by token
    expected = [[w * (a - b) for w, a, b in zip(rw, r1, r2)] for rw, r1, r2 in zip(weights.tolist(), lp, rp)]
    close(logp.grad, expected, 1e-12)


def test_kl_differentiable_in_logp():
    logp = (-torch.rand(3, 4, dtype=torch.float64)).requires_grad_()
    ref = -torch.rand(3, 4, dtype=torch.float64)
    for name in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda x: get_kl_estimator(name)(x, ref), (logp,))


# ----------------------------------------------------------------------------- policy loss


def ppo_inputs(dtype, seed=8):
    lengths, mask, rnd = make_batch(dtype, seed=seed)
    B = len(lengths)
    old = -torch.rand(B, 7, dtype=torch.float64).to(dtype) * 3
    logp = old + rnd(B, 7, scale=0.3)
    adv = broadcast_to_tokens(rnd(B), mask) + rnd(B, 7, scale=0.1) * mask
    return lengths, mask, logp, old, adv


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("lo,hi,c", [(0.2, 0.2, 3.0), (0.1, 0.28, None), (0.2, 0.3, 1.5)])
def test_ppo_clip_matches_reference(dtype, tol, lo, hi, c):
    lengths, mask, logp, old, adv = ppo_inputs(dtype)
    loss, diag = ppo_clip(logp, old, adv, mask, clip_low=lo, clip_high=hi, dual_clip_c=c)
    rows = [x.double().tolist() for x in (logp, old, adv)]
    close(loss, per_token(lambda a, b, d: ref_ppo(a, b, d, lo, hi, c), lengths, 7, *rows), tol)
    close(diag["ratio"], per_token(lambda a, b: math.exp(a - b), lengths, 7, *rows[:2]), tol)
    assert_zero_on_padding(loss, mask)
    assert set(diag) == {"ratio", "clipped", "dual_clipped"}
    assert diag["clipped"].sum() > 0 and (diag["dual_clipped"].sum() > 0) == (c == 1.5)  # branches exercised


def test_dual_clip_caps_negative_advantage_loss():
    adv = torch.tensor([[-2.0, -0.5, 1.0]], dtype=torch.float64)
    logp = torch.tensor([[3.0, 3.0, 3.0]], dtype=torch.float64)  # ratio e^3 ~ 20
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, diag = ppo_clip(logp, old, adv, mask, dual_clip_c=3.0)
    assert loss[0, 0].item() == 3.0 * 2.0 and loss[0, 1].item() == 3.0 * 0.5
    assert diag["dual_clipped"].tolist() == [[1.0, 1.0, 0.0]]
    assert loss[0, 2].item() == pytest.approx(-1.2)  # A > 0: ordinary clip at 1 + 0.2
    plain, _ = ppo_clip(logp, old, adv, mask, dual_clip_c=None)
    assert plain[0, 0].item() == pytest.approx(2.0 * math.exp(3.0), rel=1e-12)


def test_clip_low_and_high_are_asymmetric():
    ratios = torch.tensor([[1.25, 1.35, 0.95, 0.85]], dtype=torch.float64)
    logp, old = ratios.log(), torch.zeros_like(ratios)
    mask = torch.ones_like(ratios, dtype=torch.bool)
    pos, neg = torch.ones_like(ratios), -torch.ones_like(ratios)
    loss, diag = ppo_clip(logp, old, pos, mask, clip_low=0.1, clip_high=0.3)
    close(loss, [[-1.25, -1.3, -0.95, -0.85]], 1e-12)  # A > 0: only the upper bound (1.3) bites
    assert diag["clipped"].tolist() == [[0.0, 1.0, 0.0, 0.0]]
    loss, diag = ppo_clip(logp, old, neg, mask, clip_low=0.1, clip_high=0.3)
    close(loss, [[1.25, 1.35, 0.95, 0.9]], 1e-12)  # A < 0: only the lower bound (0.9) bites
    assert diag["clipped"].tolist() == [[0.0, 0.0, 0.0, 1.0]]
    sym, _ = ppo_clip(logp, old, pos, mask, clip_low=0.3, clip_high=0.1)
    close(sym, [[-1.1, -1.1, -0.95, -0.85]], 1e-12)  # swapped bounds: 1.1 now bites


def test_ppo_clip_gradcheck_away_from_clip_boundaries():
    lengths, mask, logp, old, adv = ppo_inputs(torch.float64, seed=9)
    log_ratio = logp - old
    for bound in (math.log(0.8), math.log(1.2), math.log(3.0)):
        near = (log_ratio - bound).abs() < 1e-3
        log_ratio = torch.where(near, log_ratio + 1e-2, log_ratio)
    logp = (old + log_ratio).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ppo_clip(x, old, adv, mask)[0], (logp,))
    cfg = PolicyLossConfig(kl_in_loss=True, kl_coef=0.1, kl_estimator="k3")
    ref = old - 0.05
    assert torch.autograd.gradcheck(lambda x: policy_objective(x, old, ref, None, adv, mask, cfg)[0], (logp,))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_policy_objective_combines_components(dtype, tol):
    lengths, mask, logp, old, adv = ppo_inputs(dtype, seed=10)
    ref = old + torch.randn(old.shape, dtype=torch.float64).to(dtype) * 0.1
    entropy = torch.rand(old.shape, dtype=torch.float64).to(dtype)
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, kl_in_loss=True, kl_coef=0.05,
                           kl_estimator="k3", entropy_coef=0.01)
    total, comp = policy_objective(logp, old, ref, entropy, adv, mask, cfg)
    rows = [x.double().tolist() for x in (logp, old, adv, ref, entropy)]

    def ref_total(lp, olp, a, rp, ent):
        return ref_ppo(lp, olp, a, 0.2, 0.28, 3.0) + 0.05 * ref_kl("k3", lp, rp) - 0.01 * ent

    close(total, per_token(ref_total, lengths, 7, *rows), tol)
    close(comp["kl"], per_token(lambda lp, rp: ref_kl("k3", lp, rp), lengths, 7, rows[0], rows[3]), tol)
    close(comp["entropy"], per_token(lambda e: e, lengths, 7, rows[4]), tol)
    assert {"pg_loss", "ratio", "clipped", "dual_clipped"} <= set(comp)
    # KL reported but not in the loss when kl_in_loss is off
    total2, comp2 = policy_objective(logp, old, ref, None, adv, mask, PolicyLossConfig())
    assert torch.equal(total2, comp2["pg_loss"]) and "kl" in comp2 and not comp2["kl"].requires_grad


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_fold_kl_into_rewards(dtype, tol, estimator):
    lengths, mask, rnd = make_batch(dtype, seed=11)
    B = len(lengths)
    rewards, old = rnd(B, 7), -rnd(B, 7).abs()
    ref = old + rnd(B, 7, scale=0.2)
    out = fold_kl_into_rewards(rewards, old, ref, mask, 0.1, estimator)
    rows = [x.double().tolist() for x in (rewards, old, ref)]
    close(out, per_token(lambda r, lp, rp: r - 0.1 * ref_kl(estimator, lp, rp), lengths, 7, *rows), tol)


# ----------------------------------------------------------------------------- value, SFT, DPO


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("eps", [0.2, None])
def test_clipped_value_loss(dtype, tol, eps):
    lengths, mask, rnd = make_batch(dtype, seed=12)
    B = len(lengths)
    old, R = rnd(B, 7), rnd(B, 7)
    values = old + rnd(B, 7, scale=0.4)
    loss, diag = clipped_value_loss(values, old, R, mask, clip_eps=eps)
    rows = [x.double().tolist() for x in (values, old, R)]
    close(loss, per_token(lambda v, vo, r: ref_value(v, vo, r, eps), lengths, 7, *rows), tol)
    assert_zero_on_padding(loss, mask)
    assert (diag["clipped"].sum() > 0) == (eps is not None)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_sft_nll(dtype, tol):
    lengths, mask, rnd = make_batch(dtype, seed=13)
    logp = -rnd(len(lengths), 7).abs()
    close(nll(logp, mask), per_token(lambda x: -x, lengths, 7, logp.double().tolist()), tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("beta,eps,ref_free", [(0.1, 0.0, False), (0.5, 0.1, False), (2.0, 0.0, True)])
def test_dpo_matches_reference(dtype, tol, beta, eps, ref_free):
    g = torch.Generator().manual_seed(14)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64).to(dtype) * 40 for _ in range(4))
    losses, cr, rj = sigmoid_dpo(pc, pr, None if ref_free else rc, None if ref_free else rr, beta, eps, ref_free)
    exp_l, exp_c, exp_r = [], [], []
    for a, b, c, d in zip(*(x.double().tolist() for x in (pc, pr, rc, rr))):
        c, d = (0.0, 0.0) if ref_free else (c, d)
        z = beta * ((a - c) - (b - d))
        exp_l.append(-(1 - eps) * ref_logsigmoid(z) - eps * ref_logsigmoid(-z))
        exp_c.append(beta * (a - c))
        exp_r.append(beta * (b - d))
    close(losses, exp_l, tol)
    close(cr, exp_c, tol)
    close(rj, exp_r, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 7.5])
def test_dpo_is_log2_when_chosen_equals_rejected_and_policy_equals_reference(dtype, beta):
    x = -torch.rand(5, dtype=dtype) * 50
    losses, _, _ = sigmoid_dpo(x, x.clone(), x.clone(), x.clone(), beta=beta)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))


def test_dpo_is_stable_for_large_margins():
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    losses, _, _ = sigmoid_dpo(big, -big, beta=1.0, reference_free=True)
    assert torch.isfinite(losses).all() and losses[0] == 0 and losses[1] == pytest.approx(2e4)


# ----------------------------------------------------------------------------- aggregation


def split_into(tensors_by_row, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(tuple(t[start:start + s] for t in tensors_by_row))
        start += s
    return out


def trim(loss, mask):
    """Pad a micro-batch only to its own longest response, as a trainer would."""
    T = max(int(mask.sum(-1).max()), 1)
    return loss[:, :T], mask[:, :T]


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_aggregation_is_independent_of_the_split(mode):
    lengths = [3, 9, 1, 0, 6, 9, 4, 2]  # one fully masked sequence
    mask = right_padded(lengths, 9)
    loss = torch.randn(8, 9, dtype=torch.float64)
    loss[~mask] = float("nan")  # padding content must never leak
    expected = ref_aggregate(mode, loss.tolist(), lengths, 12.0)

    def total(micro_batches, norms):
        return sum(aggregate(*trim(lb, mb), norms, mode) for lb, mb in micro_batches).item()

    contributions = []
    for sizes in ([8], [4, 4], [1] * 8, [3, 1, 2, 2]):
        micro = split_into((loss, mask), sizes)
        norms = global_normalizers([m for _, m in micro], norm_constant=12.0)
        assert (norms.num_tokens, norms.num_seqs) == (sum(lengths), 7)
        contributions.append(total(micro, norms))

    # two data-parallel ranks with different micro-batch counts; counts "all-reduced" by summing
    ranks = [split_into((loss[:5], mask[:5]), [3, 2]), split_into((loss[5:], mask[5:]), [1, 1, 1])]
    local = [global_normalizers([m for _, m in r], norm_constant=12.0) for r in ranks]
    norms = GlobalNormalizers(sum(n.num_tokens for n in local), sum(n.num_seqs for n in local), 12.0)
    contributions.append(sum(total(r, norms) for r in ranks))

    for c in contributions:
        assert abs(c - expected) < 1e-12, (contributions, expected)


def test_norm_constant_defaults_to_longest_response():
    masks = [right_padded([2, 5], 6), right_padded([3], 3)]
    assert global_normalizers(masks) == GlobalNormalizers(10, 3, 5)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_all_masked_response_raises(mode):
    mask = torch.zeros(2, 4, dtype=torch.bool)
    norms = global_normalizers([mask], norm_constant=4.0)
    with pytest.raises(ValueError, match="all-masked response"):
        get_aggregation(mode)(torch.randn(2, 4), mask, norms)


def test_fully_masked_micro_batch_contributes_zero():
    norms = GlobalNormalizers(num_tokens=10, num_seqs=3, norm_constant=4.0)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss = torch.full((2, 4), float("nan"))
    for mode in AGGREGATIONS:
        assert aggregate(loss, mask, norms, mode).item() == 0.0


# ----------------------------------------------------------------------------- bad input


def test_nan_rewards_and_advantages_are_rejected_with_positions():
    bad = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    mask = torch.ones(4, 3, dtype=torch.bool)
    for call in (lambda: grpo(bad, group_size=2), lambda: rloo(bad, group_size=2),
                 lambda: outcome_to_token_rewards(bad, mask)):
        with pytest.raises(ValueError, match=r"rewards contains NaN/inf at positions \(1,\)"):
            call()
    bad_tokens = torch.zeros(4, 3)
    bad_tokens[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"token_rewards contains NaN/inf at positions \(1, 2\)"):
        reinforce_pp(bad_tokens, mask)
    adv = torch.zeros(2, 3)
    adv[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"advantages contains NaN/inf at positions \(1, 2\)"):
        ppo_clip(torch.zeros(2, 3), torch.zeros(2, 3), adv, torch.ones(2, 3))
    values = torch.zeros(2, 3)
    values[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"values contains NaN/inf at positions \(0, 0\)"):
        gae(torch.zeros(2, 3), values, torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="seq_adv contains NaN/inf"):
        broadcast_to_tokens(bad, mask)
    with pytest.raises(ValueError, match="x contains NaN/inf"):
        require_finite("x", torch.tensor([float("-inf")]))


def test_empty_batch_is_rejected():
    empty = torch.empty(0)
    for call in (lambda: grpo(empty, group_size=1), lambda: rloo(empty, group_size=2),
                 lambda: reinforce_pp(torch.empty(0, 4), torch.empty(0, 4, dtype=torch.bool))):
        with pytest.raises(ValueError, match="rewards is empty"):
            call()
    with pytest.raises(ValueError, match="token_rewards is empty"):
        gae(torch.empty(0, 3), torch.empty(0, 3), torch.empty(0, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="policy_chosen is empty"):
        sigmoid_dpo(empty, empty, empty, empty)


def test_shape_and_group_errors():
    with pytest.raises(ValueError, match="group_size=3 does not divide the number of rewards N=8"):
        grpo(torch.zeros(8), group_size=3)
    with pytest.raises(ValueError, match="exactly one of group_ids or group_size"):
        grpo(torch.zeros(4))
    with pytest.raises(ValueError, match="rloo needs at least 2 samples per group"):
        rloo(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="shape mismatch: group_ids"):
        grpo(torch.zeros(4), group_ids=[0, 0, 1])
    with pytest.raises(ValueError, match=r"shape mismatch: values has shape \(2, 4\)"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="shape mismatch: mask has 3 rows"):
        broadcast_to_tokens(torch.zeros(2), torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"no valid tokens in row\(s\) 1"):
        outcome_to_token_rewards(torch.zeros(3), right_padded([2, 0, 1], 3))
    with pytest.raises(ValueError, match="mask must contain only 0/1"):
        nll(torch.zeros(2, 2), torch.full((2, 2), 0.5))


def test_bad_hyperparameters_are_rejected():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        ppo_clip(z, z, z, z, dual_clip_c=1.0)
    with pytest.raises(ValueError, match="clip_low must be in"):
        ppo_clip(z, z, z, z, clip_low=1.0)
    with pytest.raises(ValueError, match="kl_in_loss is set but ref_logp is None"):
        policy_objective(z, z, None, None, z, z, PolicyLossConfig(kl_in_loss=True))
    with pytest.raises(ValueError, match="entropy is None"):
        policy_objective(z, z, None, None, z, z, PolicyLossConfig(entropy_coef=0.01))
    with pytest.raises(ValueError, match="ref_chosen and ref_rejected are required"):
        sigmoid_dpo(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="norm_constant must be > 0"):
        aggregate(z, z, GlobalNormalizers(2, 1, None), "seq_mean_token_sum_norm")


def registry_checks():
    """Per registry entry: (call on a small float64 input, the hand formula's value). Each entry
    must compute the estimator its name says, not merely exist."""
    lengths, mask, rnd = make_batch(torch.float64, B=6, T=5, seed=17)
    B = len(lengths)
    rewards, ids = rnd(B), [0, 1, 0, 1, 0, 1]
    rl, tokens, values, old, ref = rewards.tolist(), rnd(B, 5), rnd(B, 5), -rnd(B, 5).abs(), -rnd(B, 5).abs()
    logp, adv, ret, ent = old + rnd(B, 5, scale=0.3), rnd(B, 5), rnd(B, 5), rnd(B, 5).abs()
    rows = {k: v.tolist() for k, v in dict(tokens=tokens, values=values, old=old, ref=ref, logp=logp, adv=adv,
                                           ret=ret, ent=ent).items()}
    pairs = [-rnd(3).abs() * 10 for _ in range(4)]
    loss = rnd(B, 5)

    def masked(fn, *names):
        return per_token(fn, lengths, 5, *(rows[n] for n in names))

    def kl(name):
        base = {"low_var_kl": "k3", "k1+": "k1", "k3+": "k3", "low_var_kl+": "k3"}.get(name, name)  # "+": value of the base
        return (lambda: get_kl_estimator(name)(logp, ref)), [[ref_kl(base, a, b)
                                                                for a, b in zip(r1, r2)] for r1, r2 in zip(rows["logp"], rows["ref"])]

    def new_policy_loss(name):  # GSPO / CISPO: hand formulas in test_policy_losses.py
        from test_policy_losses import ref_loss_and_grad

        lo, hi = 0.2, 0.28
        expected = ref_loss_and_grad(name, rows["logp"], rows["old"], rows["adv"], mask.tolist(), lo, hi)[0]
        return (lambda: POLICY_LOSSES[name](logp, old, adv, mask, clip_low=lo, clip_high=hi)[0]), expected

    def dpo():
        z = [0.1 * ((a - c) - (b - d)) for a, b, c, d in zip(*(x.tolist() for x in pairs))]
        return (lambda: DPO_LOSSES["sigmoid"](*pairs, beta=0.1)[0]), [-ref_logsigmoid(v) for v in z]

    return {
        "advantage estimator": {
            "grpo": ((lambda: ADVANTAGE_ESTIMATORS["grpo"](rewards, ids)), ref_grpo(rl, ids)),
            "dr_grpo": ((lambda: ADVANTAGE_ESTIMATORS["dr_grpo"](rewards, ids)), ref_grpo(rl, ids, normalize_std=False)),
            "rloo": ((lambda: ADVANTAGE_ESTIMATORS["rloo"](rewards, ids)), ref_rloo(rl, ids)),
            "reinforce_pp": ((lambda: ADVANTAGE_ESTIMATORS["reinforce_pp"](tokens, mask, 0.9)[0]),
                             ref_reinforce_pp(rows["tokens"], lengths, 5, 0.9)[0]),
            "reinforce_pp_baseline": ((lambda: ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](rewards, mask, ids)),
                                      ref_reinforce_pp_baseline(rl, ids, lengths, 5)),
            "gae": ((lambda: ADVANTAGE_ESTIMATORS["gae"](tokens, values, mask, 0.9, 0.8)[0]),
                    ref_gae(rows["tokens"], rows["values"], lengths, 5, 0.9, 0.8)[0]),
        },
        "KL estimator": {name: kl(name) for name in ("k1", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+")},
        "policy loss": {"ppo_clip": ((lambda: POLICY_LOSSES["ppo_clip"](logp, old, adv, mask)[0]),
                                     masked(lambda a, b, c: ref_ppo(a, b, c, 0.2, 0.2, 3.0), "logp", "old", "adv")),
                        **{name: new_policy_loss(name) for name in ("gspo", "gspo_token", "cispo")}},
        "value loss": {"clipped_mse": ((lambda: VALUE_LOSSES["clipped_mse"](values, old, ret, mask)[0]),
                                       masked(lambda v, vo, r: ref_value(v, vo, r, 0.2), "values", "old", "ret"))},
        "SFT loss": {"nll": ((lambda: SFT_LOSSES["nll"](logp, mask)), masked(lambda x: -x, "logp"))},
        "DPO loss": {"sigmoid": dpo()},
        "aggregation": {mode: ((lambda mode=mode: AGGREGATIONS[mode](loss, mask, global_normalizers([mask], 7.0))),
                               ref_aggregate(mode, loss.tolist(), lengths, 7.0)) for mode in AGGREGATIONS},
    }


@pytest.mark.parametrize("getter,registry,kind", [
    (get_advantage_estimator, ADVANTAGE_ESTIMATORS, "advantage estimator"),
    (get_kl_estimator, KL_ESTIMATORS, "KL estimator"),
    (get_policy_loss, POLICY_LOSSES, "policy loss"),
    (get_value_loss, VALUE_LOSSES, "value loss"),
    (get_sft_loss, SFT_LOSSES, "SFT loss"),
    (get_dpo_loss, DPO_LOSSES, "DPO loss"),
    (get_aggregation, AGGREGATIONS, "aggregation"),
])
def test_registries(getter, registry, kind):
    checks = registry_checks()[kind]
    assert set(checks) == set(registry), f"a {kind} without a check against its formula (or a stale check)"
    for name, fn in registry.items():
        assert getter(name) is fn
        call, expected = checks[name]
        close(call(), expected, 1e-10)
    with pytest.raises(ValueError, match=re.escape(f"unknown {kind} 'nope'; valid names: " + ", ".join(sorted(registry)))):
        getter("nope")


def test_registry_contents():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"}
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+"}
    assert set(AGGREGATIONS) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"}


def test_package_imports_nothing_else_from_the_project():
    import subprocess
    import sys

    code = ("import sys, rlmt_megatron.algorithms; "
            "bad = [m for m in sys.modules if m.startswith('megatron') or "
            "(m.startswith('rlmt_megatron.') and not m.startswith('rlmt_megatron.algorithms'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- KL controller, reward shaping


def test_adaptive_kl_controller_follows_the_target():
    ctl = KLController(0.05, target=0.1, horizon=1000.0)
    coef = 0.05
    for kl, n in [(0.3, 64), (0.12, 64), (0.05, 32), (0.0, 64), (float("nan"), 64)]:
        if math.isfinite(kl):
            error = min(max(kl / 0.1 - 1.0, -0.2), 0.2)
            coef = coef * (1.0 + error * n / 1000.0)
        assert ctl.update(kl, n) == pytest.approx(coef, rel=1e-15)
    fixed = KLController(0.05)
    assert [fixed.update(kl, 64) for kl in (0.3, 0.0)] == [0.05, 0.05] and not fixed.adaptive
    with pytest.raises(ValueError, match="needs both target and horizon"):
        KLController(0.05, target=0.1)


def test_overlong_penalty_matches_dapo():
    max_len, buffer, factor = 20, 8, 0.5
    lengths = list(range(0, 21))
    expected = [0.0 if n <= max_len - buffer else factor * ((max_len - buffer) - n) / buffer for n in lengths]
    close(overlong_penalty(torch.tensor(lengths), max_len, buffer, factor), expected, 1e-15)
    assert float(overlong_penalty(torch.tensor([20]), 20, 8)) == -1.0
    with pytest.raises(ValueError, match="must be in \\[0, 20\\]"):
        overlong_penalty(torch.tensor([21]), 20, 8)
