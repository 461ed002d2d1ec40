"""GSPO, GSPO-token, CISPO and the rollout corrections (TIS, MIS, IcePop) against float64 formulas
written out here token by token (values and gradients w.r.t. the new logprobs), the config rules,
and one torchrun job (GRPO at TP=2 on the tiny models) that runs every option's update.

References: GSPO, Zheng et al. 2025 (arXiv:2507.18071) eqs. 5-7 and 10-11; CISPO, MiniMax-M1
(arXiv:2506.13585) eqs. 4-5; TIS, Yao et al. 2025 ("Your Efficient RL Framework Secretly Brings
You Off-Policy RL Training"); MIS, Liu, Li et al. 2025 ("When Speed Kills Stability") and verl's
rollout-correction rejection levels; IcePop, Ling Team 2025 (Ring-1T).
"""

import math

import pytest
import torch

from helpers import torchrun
from rlmt_megatron.algorithms import (
    POLICY_LOSSES,
    ROLLOUT_CORRECTIONS,
    GlobalNormalizers,
    PolicyLossConfig,
    aggregate,
    cispo,
    get_rollout_correction,
    gspo,
    gspo_token,
    icepop,
    mis,
    policy_objective,
    tis,
)
from rlmt_megatron.config.rlmt import load_rlmt_config
from test_algorithms import close, make_batch
from test_updates import config, roles, run_update, stand_ins, valid_actions  # noqa: F401 (stand_ins: a fixture)

T = 7


# ----------------------------------------------------------------------------- hand formulas


def clamp(x, lo, hi):
    return min(max(x, lo), hi)


def seq_ratio(lp, olp, ts):
    return math.exp(clamp(sum(lp[t] - olp[t] for t in ts) / len(ts), -20.0, 20.0))


def ref_loss_and_grad(name, lp, olp, adv, valid, lo, hi, weights=None, seq_mean=False):
    """(per-token loss rows, gradient rows of the aggregated loss w.r.t. lp) on the tokens where
    ``valid`` (rows of bools) holds. Aggregation: token mean over the batch, or with ``seq_mean``
    the mean over sequences of each one's token mean. ``weights``: a constant factor per token on
    the loss (rollout correction)."""
    tokens = [[t for t, v in enumerate(row) if v] for row in valid]
    g_tok = sum(len(ts) for ts in tokens)
    g_seq = sum(1 for ts in tokens if ts)
    loss = [[0.0] * len(row) for row in valid]
    grad = [[0.0] * len(row) for row in valid]
    for b, ts in enumerate(tokens):
        if not ts:
            continue
        n, s = len(ts), seq_ratio(lp[b], olp[b], ts)
        for t in ts:
            a = adv[b][t]
            w = 1.0 if weights is None else weights[b][t]
            c = 1.0 / (n * g_seq) if seq_mean else 1.0 / g_tok  # d(aggregate)/d(loss_t)
            if name in ("cispo", "ppo_clip"):
                r = math.exp(clamp(lp[b][t] - olp[b][t], -20.0, 20.0))
                if name == "ppo_clip":  # no dual clip here
                    unclipped, clipped = -a * r, -a * clamp(r, 1.0 - lo, 1.0 + hi)
                    loss[b][t] = w * max(unclipped, clipped)
                    grad[b][t] += 0.0 if clipped > unclipped else c * w * (-a) * r
                    continue
                wr = clamp(r, 1.0 - lo, 1.0 + hi)
                loss[b][t] = -w * wr * a * lp[b][t]
                grad[b][t] += c * w * (-wr * a)
                continue
            # gspo and gspo_token share the value: max(-a s, -a clip(s))
            unclipped, clipped = -a * s, -a * clamp(s, 1.0 - lo, 1.0 + hi)
            loss[b][t] = w * max(unclipped, clipped)
            if clipped > unclipped:
                continue  # the clipped branch is constant in lp
            if name == "gspo":  # d s / d lp_k = s / n for every token k of the row
                for k in ts:
                    grad[b][k] += c * w * (-a) * s / n
            else:  # gspo_token: d s_t / d lp_k = s if k == t else 0
                grad[b][t] += c * w * (-a) * s
    return loss, grad


def ref_correction(name, olp, rlp, lengths, **kw):
    """(weight rows, keep rows) of a rollout correction."""
    weight = [[0.0] * len(row) for row in olp]
    keep = [[False] * len(row) for row in olp]
    for b, n in enumerate(lengths):
        rho = [math.exp(clamp(olp[b][t] - rlp[b][t], -20.0, 20.0)) for t in range(n)]
        if name == "mis":
            total = sum(olp[b][t] - rlp[b][t] for t in range(n))
            if kw.get("seq_ratio", "geometric_mean") == "geometric_mean":
                total /= max(n, 1)
            seq = math.exp(clamp(total, -20.0, 20.0))
            ok = kw["low"] <= seq <= kw["high"]
        for t in range(n):
            if name == "tis":
                weight[b][t], keep[b][t] = min(rho[t], kw["cap"]), True
            elif name == "mis":
                weight[b][t], keep[b][t] = float(ok), ok
            else:
                ok_t = kw["low"] <= rho[t] <= kw["high"]
                weight[b][t], keep[b][t] = (rho[t] if ok_t else 0.0), ok_t
    return weight, keep


# ----------------------------------------------------------------------------- inputs


def inputs(seed=0, token_adv=False, scale=0.3):
    lengths, mask, rnd = make_batch(torch.float64, B=9, T=T, seed=seed)
    B = len(lengths)
    old = -torch.rand(B, T, dtype=torch.float64) * 3
    logp = old + rnd(B, T, scale=scale)
    adv = rnd(B)[:, None].expand(B, T).clone()
    if token_adv:
        adv = adv + rnd(B, T, scale=0.5)
    adv = adv * mask
    return lengths, mask, logp, old, adv


def rows(*tensors):
    return [t.double().tolist() for t in tensors]


def loss_and_grad(fn, logp, *args, norms, mode="token_mean", **kw):
    x = logp.clone().requires_grad_()
    loss, diag = fn(x, *args, **kw)
    total = aggregate(loss, args[-1], norms, mode)
    (grad,) = torch.autograd.grad(total, x)
    return loss.detach(), grad, diag


NEW_LOSSES = {"gspo": gspo, "gspo_token": gspo_token, "cispo": cispo}


# ----------------------------------------------------------------------------- policy losses


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
@pytest.mark.parametrize("token_adv", [False, True])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_new_losses_value_and_gradient_match_the_formulas(name, token_adv, mode):
    lo, hi = (0.05, 0.08) if name != "cispo" else (0.1, 0.2)
    lengths, mask, logp, old, adv = inputs(seed=1, token_adv=token_adv)
    norms = GlobalNormalizers(sum(lengths), len(lengths))
    loss, grad, diag = loss_and_grad(NEW_LOSSES[name], logp, old, adv, mask, norms=norms, mode=mode,
                                     clip_low=lo, clip_high=hi)
    ref_loss, ref_grad = ref_loss_and_grad(name, *rows(logp, old, adv), mask.tolist(), lo, hi,
                                           seq_mean=mode == "seq_mean_token_mean")
    close(loss, ref_loss, 1e-12)
    close(grad, ref_grad, 1e-12)
    assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask])) and torch.equal(grad[~mask], grad[~mask] * 0)
    # both branches of the clip are exercised
    assert 0 < diag["clipped"].sum() < mask.sum()
    assert set(diag) == {"ratio", "clipped"}


def test_gspo_is_the_papers_sequence_objective_and_gspo_token_matches_it_for_sequence_advantages():
    lengths, mask, logp, old, adv = inputs(seed=2)
    norms = GlobalNormalizers(sum(lengths), len(lengths))
    lo, hi = 0.05, 0.08
    seq, g_seq, _ = loss_and_grad(gspo, logp, old, adv, mask, norms=norms, mode="seq_mean_token_mean", clip_low=lo, clip_high=hi)
    tok, g_tok, _ = loss_and_grad(gspo_token, logp, old, adv, mask, norms=norms, mode="seq_mean_token_mean", clip_low=lo, clip_high=hi)
    lp, olp, a = rows(logp, old, adv)
    s_ = [seq_ratio(lp[b], olp[b], range(n)) for b, n in enumerate(lengths)]
    paper = -sum(min(s_[b] * a[b][0], clamp(s_[b], 1 - lo, 1 + hi) * a[b][0]) for b in range(len(lengths))) / len(lengths)
    close(aggregate(seq, mask, norms, "seq_mean_token_mean"), paper, 1e-12)
    close(tok, seq, 1e-12)
    close(g_tok, g_seq, 1e-12)
    # with per-token advantages they differ (the point of GSPO-token)
    lengths, mask, logp, old, adv = inputs(seed=2, token_adv=True)
    _, g1, _ = loss_and_grad(gspo, logp, old, adv, mask, norms=norms, clip_low=lo, clip_high=hi)
    _, g2, _ = loss_and_grad(gspo_token, logp, old, adv, mask, norms=norms, clip_low=lo, clip_high=hi)
    assert (g1 - g2).abs().max() > 1e-3


def test_cispo_keeps_the_gradient_of_clipped_tokens_and_ppo_does_not():
    logp = torch.tensor([[1.0, -1.0, 0.05]], dtype=torch.float64)  # ratios e, 1/e, ~1.05
    old, adv = torch.zeros_like(logp), torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones_like(logp, dtype=torch.bool)
    norms = GlobalNormalizers(3, 1)
    _, g, diag = loss_and_grad(cispo, logp, old, adv, mask, norms=norms, clip_low=0.2, clip_high=0.28)
    close(g, [[-1.28 / 3, 0.8 / 3, -math.exp(0.05) / 3]], 1e-12)  # bound * A, never 0
    assert diag["clipped"].tolist() == [[1.0, 1.0, 0.0]]
    _, g_ppo, _ = loss_and_grad(POLICY_LOSSES["ppo_clip"], logp, old, adv, mask, norms=norms, dual_clip_c=None)
    assert g_ppo[0, 0] == 0 and g_ppo[0, 1] == 0
    # clip_low = 1: no lower bound
    _, g, _ = loss_and_grad(cispo, logp, old, adv, mask, norms=norms, clip_low=1.0, clip_high=0.28)
    close(g[0, 1], math.exp(-1.0) / 3, 1e-12)


@pytest.mark.parametrize("name", sorted(NEW_LOSSES))
def test_all_masked_rows_give_zero_loss_and_gradient(name):
    lengths, mask, logp, old, adv = inputs(seed=3)
    none = torch.zeros_like(mask)
    x = logp.clone().requires_grad_()
    loss, diag = NEW_LOSSES[name](x, old, adv * 0, none)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(x.grad, torch.zeros_like(x.grad))
    assert all(torch.equal(d, torch.zeros_like(d)) for d in diag.values())


def test_new_losses_reject_bad_clip_ranges():
    lengths, mask, logp, old, adv = inputs()
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\)"):
        gspo(logp, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match=r"clip_low must be in \[0, 1\]"):
        cispo(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="clip_high must be >= 0"):
        gspo_token(logp, old, adv, mask, clip_high=-0.1)


# ----------------------------------------------------------------------------- rollout corrections


def correction_inputs(seed=4, scale=0.3):
    lengths, mask, rnd = make_batch(torch.float64, B=9, T=T, seed=seed)
    old = -torch.rand(len(lengths), T, dtype=torch.float64) * 3
    rollout = old + rnd(len(lengths), T, scale=scale)
    return lengths, mask, old, rollout


CORRECTIONS = [("tis", {"cap": 1.2}), ("mis", {"low": 0.9, "high": 1.1}),
               ("mis", {"low": 0.5, "high": 1.5, "seq_ratio": "product"}), ("icepop", {"low": 0.8, "high": 1.25})]


@pytest.mark.parametrize("name,kw", CORRECTIONS, ids=[f"{n}-{k.get('seq_ratio', '')}" for n, k in CORRECTIONS])
def test_rollout_corrections_match_the_formulas(name, kw):
    lengths, mask, old, rollout = correction_inputs()
    weight, keep, diag = get_rollout_correction(name)(old, rollout, mask, **kw)
    ref_w, ref_keep = ref_correction(name, *rows(old, rollout), lengths, **kw)
    close(weight, ref_w, 1e-12)
    assert keep.tolist() == ref_keep
    masked = (mask & ~keep).double()
    assert torch.equal(diag["masked"], masked)
    if name == "tis":  # the cap is hit somewhere, and where it is the weight is the cap
        hit = diag["truncated"].bool()
        assert hit.any() and (weight[hit] == kw["cap"]).all() and (diag["ratio"][hit] > kw["cap"]).all()
        assert not masked.any()
    else:  # something is masked, something kept
        assert 0 < masked.sum() < mask.sum()
    assert not keep[~mask].any() and torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
    assert not weight.requires_grad


def test_mis_masks_whole_sequences_and_icepop_single_tokens():
    old = torch.zeros(2, 3, dtype=torch.float64)
    rollout = torch.tensor([[0.0, 0.0, -0.9], [0.0, 0.0, 0.0]], dtype=torch.float64)  # one bad token in row 0
    mask = torch.ones(2, 3, dtype=torch.bool)
    _, keep, _ = mis(old, rollout, mask, low=0.8, high=1.25)  # geometric mean e^0.3 = 1.35: row 0 out
    assert keep.tolist() == [[False] * 3, [True] * 3]
    weight, keep, _ = icepop(old, rollout, mask, low=0.5, high=2.0)  # e^0.9 = 2.46: that token out
    assert keep.tolist() == [[True, True, False], [True] * 3] and weight[0, 2] == 0


@pytest.mark.parametrize("name,kw", CORRECTIONS[:2] + CORRECTIONS[3:])
def test_rollout_corrections_on_an_all_masked_batch(name, kw):
    lengths, mask, old, rollout = correction_inputs()
    weight, keep, diag = get_rollout_correction(name)(old, rollout, torch.zeros_like(mask), **kw)
    assert not keep.any() and torch.equal(weight, torch.zeros_like(weight))
    assert all(torch.equal(d, torch.zeros_like(d)) for d in diag.values())


def test_rollout_corrections_reject_bad_arguments():
    lengths, mask, old, rollout = correction_inputs()
    with pytest.raises(ValueError, match="cap must be >= 1"):
        tis(old, rollout, mask, cap=0.5)
    with pytest.raises(ValueError, match="must contain 1"):
        icepop(old, rollout, mask, low=1.1, high=2.0)
    with pytest.raises(ValueError, match="seq_ratio must be"):
        mis(old, rollout, mask, low=0.5, high=2.0, seq_ratio="sum")
    with pytest.raises(ValueError, match="unknown rollout correction 'nope'; valid names: icepop, mis, tis"):
        get_rollout_correction("nope")
    assert set(ROLLOUT_CORRECTIONS) == {"tis", "mis", "icepop"}


@pytest.mark.parametrize("loss", sorted(NEW_LOSSES) + ["ppo_clip"])
@pytest.mark.parametrize("name,kw", [CORRECTIONS[0], CORRECTIONS[1], CORRECTIONS[3]], ids=["tis", "mis", "icepop"])
def test_policy_objective_applies_the_correction_to_value_and_gradient(loss, name, kw):
    """The corrected objective: the correction's weight times the loss, on the correction's kept
    tokens only (icepop leaves holes inside rows; the aggregation's counts are the kept ones)."""
    lengths, mask, logp, old, adv = inputs(seed=5, token_adv=loss != "gspo")
    rollout = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.15
    weight, keep, _ = get_rollout_correction(name)(old, rollout, mask, **kw)
    kept = keep.sum(-1)
    norms = GlobalNormalizers(int(kept.sum()), int((kept > 0).sum()))
    lo, hi = (0.05, 0.08) if loss.startswith("gspo") else (0.2, 0.28)
    cfg = PolicyLossConfig(loss=loss, clip_low=lo, clip_high=hi, dual_clip_c=None)
    x = logp.clone().requires_grad_()
    total, parts = policy_objective(x, old, None, None, adv, keep, cfg, is_weight=weight)
    (grad,) = torch.autograd.grad(aggregate(total, keep, norms), x)
    ref_loss, ref_grad = ref_loss_and_grad(loss, *rows(logp, old, adv), keep.tolist(), lo, hi, weights=weight.tolist())
    close(total, ref_loss, 1e-12)
    close(grad, ref_grad, 1e-12)
    assert torch.equal(parts["pg_loss"], total)
    assert 0 < kept.sum() <= mask.sum() and (name == "tis") == bool((kept == mask.sum(-1)).all())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,message", [
    (["algorithm.name=ppo", "algorithm.policy_loss=gspo"], "needs one advantage per sequence"),
    (["algorithm.advantage=reinforce_pp", "algorithm.policy_loss=gspo"], "use policy_loss=gspo_token"),
    (["algorithm.policy_loss=cispo", "algorithm.dual_clip_c=2.0"], "dual_clip_c applies to policy_loss=ppo_clip only"),
    (["algorithm.clip_low=1.0"], "only cispo allows clip_low=1"),
    (["algorithm.name=dpo", "algorithm.rollout_correction.mode=tis"], "apply to grpo and ppo"),
    (["algorithm.rollout_correction.mode=tis", "algorithm.rollout_correction.high=2"], "high applies to another"),
    (["algorithm.rollout_correction.mode=mis", "algorithm.rollout_correction.tis_cap=2"], "tis_cap applies to another"),
    (["algorithm.rollout_correction.mode=icepop", "algorithm.rollout_correction.low=1", "algorithm.rollout_correction.high=1"],
     "is empty"),
    (["algorithm.rollout_correction.mode=tis", "algorithm.rollout_correction.tis_cap=0.5"], "greater than or equal to 1"),
    (["algorithm.rollout_correction.mode=trunc"], "'none', 'tis', 'mis' or 'icepop'"),
    (["algorithm.policy_loss=grpo"], "'ppo_clip', 'gspo', 'gspo_token' or 'cispo'"),
])
def test_impossible_combinations_fail_at_load(overrides, message):
    with pytest.raises(Exception, match=message):
        load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", *overrides])


def test_config_defaults_of_the_corrections():
    def kwargs(*o):
        return load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", *o]
                                ).algorithm.rollout_correction.kwargs()

    mode = "algorithm.rollout_correction.mode="
    assert kwargs(mode + "tis") == {"cap": 2.0}
    assert kwargs(mode + "icepop") == {"low": 0.5, "high": 5.0}
    assert kwargs(mode + "mis") == {"low": 1 / 1.001, "high": 1.001, "seq_ratio": "geometric_mean"}
    assert kwargs(mode + "mis", "algorithm.rollout_correction.seq_ratio=product") == {
        "low": 0.5, "high": 2.0, "seq_ratio": "product"}


# ----------------------------------------------------------------------------- the updates' wiring


def padded_rows(samples, field):
    width = max(s.fields[field].numel() for s in samples)
    return [s.fields[field].double().tolist() + [0.0] * (width - s.fields[field].numel()) for s in samples]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
@pytest.mark.parametrize("name,kw", CORRECTIONS, ids=[f"{n}-{k.get('seq_ratio', '')}" for n, k in CORRECTIONS])
def test_updates_apply_the_correction_from_the_engine_logprobs(stand_ins, algorithm, name, kw):
    """What train_step receives: per policy sample, the correction's weight as ``is_weight`` and
    its kept tokens as ``loss_mask``, from the trainer's old logprobs and the engine's (here the
    old ones plus noise); the PPO critic still sees every token."""
    rollouts, models = stand_ins
    g = torch.Generator().manual_seed(8)
    for r in rollouts:
        old = models.old[tuple(r.prompt_ids + r.response_ids)][len(r.prompt_ids) - 1:].double()
        r.engine_logprobs = (old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)).tolist()
    options = {"tis": [f"tis_cap={kw.get('cap')}"], "icepop": [f"low={kw.get('low')}", f"high={kw.get('high')}"],
               "mis": [f"low={kw.get('low')}", f"high={kw.get('high')}", f"seq_ratio={kw.get('seq_ratio', 'geometric_mean')}"]}
    cfg = config(f"algorithm.name={algorithm}", f"algorithm.rollout_correction.mode={name}",
                 *(f"algorithm.rollout_correction.{o}" for o in options[name]))
    r = roles(cfg)
    metrics = run_update(cfg, r, rollouts)
    ((samples, _),) = r.policy.calls
    old = padded_rows(samples, "old_logp")
    width = len(old[0])
    valid = [valid_actions(x) + [False] * (width - len(valid_actions(x))) for x in rollouts]
    engine = [[0.0] * width for _ in rollouts]
    for b, x in enumerate(rollouts):
        for j, lp in enumerate(x.engine_logprobs):
            engine[b][len(x.prompt_ids) - 1 + j] = lp
    # the hand formula takes right-aligned valid tokens: shift each row so its response starts at 0
    starts = [len(x.prompt_ids) - 1 for x in rollouts]
    shift = [lambda row, s=s: row[s:] + [0.0] * s for s in starts]
    lengths = [sum(v) for v in valid]
    ref_w, ref_keep = ref_correction(name, [f(o) for f, o in zip(shift, old)], [f(e) for f, e in zip(shift, engine)],
                                     lengths, **kw)
    got_w = [f(row) for f, row in zip(shift, padded_rows(samples, "is_weight"))]
    got_keep = [f(row) for f, row in zip(shift, padded_rows(samples, "loss_mask"))]
    close(got_w, ref_w, 1e-6)
    assert [[bool(v) for v in row] for row in got_keep] == ref_keep
    n_valid, n_masked = sum(lengths), sum(n - sum(k) for n, k in zip(lengths, ref_keep))
    assert metrics["rollout_correction/masked_token_frac"] == pytest.approx(n_masked / n_valid)
    kept_w = [w for row_w, row_k in zip(ref_w, ref_keep) for w, k in zip(row_w, row_k) if k]
    assert metrics["rollout_correction/weight_mean"] == pytest.approx(sum(kept_w) / len(kept_w), rel=1e-6)
    assert metrics["rollout_correction/weight_max"] == pytest.approx(max(kept_w), rel=1e-6)
    if algorithm == "ppo":
        ((critic_samples, _),) = r.critic.calls
        assert [row[:width] for row in padded_rows(critic_samples, "loss_mask")] == [[float(v) for v in row] for row in valid]


def test_a_step_whose_every_token_is_masked_trains_nothing(stand_ins):
    rollouts, _ = stand_ins
    cfg = config("algorithm.rollout_correction.mode=icepop", "algorithm.rollout_correction.low=1.0",
                 "algorithm.rollout_correction.high=1.000001")  # engine logprobs are -1: no ratio is 1
    r = roles(cfg)
    metrics = run_update(cfg, r, rollouts)
    assert r.policy.calls == [] and metrics["rollout_correction/skipped_update"] == 1.0
    assert metrics["rollout_correction/masked_token_frac"] == 1.0


# ----------------------------------------------------------------------------- one torchrun job


@pytest.fixture(scope="module")
def option_runs(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_loss_options") / "results.pt"
    torchrun(2, ["tests/workers/policy_loss_options_worker.py", "--model", str(tiny_models / "llama-policy"),
                 "--out", str(out)], timeout=300)
    return torch.load(out)


def test_every_option_runs_in_a_grpo_update_at_tp2_and_changes_it(option_runs):
    from workers.policy_loss_options_worker import OPTIONS

    base = option_runs["baseline"]
    for name in OPTIONS:
        m = option_runs[name]["metrics"]
        assert all(math.isfinite(v) for v in m.values()), (name, m)
        assert m["grad_norm"] > 0 and option_runs[name]["moved"] > 1e-4, name
        assert any(k.startswith("rollout_correction/") for k in m) == (name in ("tis", "mis", "icepop")), name
        if name != "baseline":  # the option changed the update: other weights, another loss
            assert option_runs[name]["vs_baseline"] > 1e-4, name
            assert abs(m["loss/policy"] - base["metrics"]["loss/policy"]) > 1e-4, name
    # the tiny clip ranges bite in the second (off-policy) mini-batch
    for name in ("gspo", "gspo_token", "cispo"):
        assert option_runs[name]["metrics"]["policy/clipfrac"] > 0, name


@pytest.mark.parametrize("name,kw", [("tis", {"cap": 1.1}), ("mis", {"low": 1 / 1.1, "high": 1.1}),
                                     ("icepop", {"low": 0.8, "high": 1.25})])
def test_the_correction_metrics_of_the_run_match_the_formulas(option_runs, name, kw):
    """Recomputed from the job's old and engine logprobs (the trainer's old logprobs of the update
    are those of the same initial weights)."""
    old_rows, engine_rows, lengths = [], [], []
    for lp, (p, engine) in zip(option_runs["old_logp"], option_runs["rollouts"]):
        resp = lp[p - 1:].double().tolist()
        width = 8
        old_rows.append(resp + [0.0] * (width - len(resp)))
        engine_rows.append(engine + [0.0] * (width - len(engine)))
        lengths.append(len(resp))
    weight, keep = ref_correction(name, old_rows, engine_rows, lengths, **kw)
    m = option_runs[name]["metrics"]
    kept = [w for rw, rk in zip(weight, keep) for w, k in zip(rw, rk) if k]
    masked = sum(lengths) - len(kept)
    assert m["rollout_correction/masked_token_frac"] == pytest.approx(masked / sum(lengths), abs=1e-9)
    assert m["rollout_correction/masked_seq_frac"] == pytest.approx(
        sum(1 for n, rk in zip(lengths, keep) if sum(rk) < n) / len(lengths), abs=1e-9)
    assert m["rollout_correction/weight_mean"] == pytest.approx(sum(kept) / len(kept), rel=1e-5)
    assert m["rollout_correction/weight_max"] == pytest.approx(max(kept), rel=1e-5)
    if name == "tis":
        truncated = sum(1 for rw in weight for w in rw if w == 1.1)
        assert truncated > 0 and m["rollout_correction/truncated_token_frac"] == pytest.approx(truncated / sum(lengths))
    else:
        assert 0 < masked < sum(lengths)
