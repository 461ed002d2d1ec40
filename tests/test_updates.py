"""trainer/updates.py: every way a step's advantages and KL penalty can be wired, through the
update functions, against float64 computations written out by hand here.

The models are replaced by stand-ins: ``sequence_logprobs`` and ``token_values`` return fixed
numbers per sequence, and the policy and critic record what ``train_step`` receives (samples and
loss function). The recorded advantages and returns are compared with the formulas; the recorded
policy loss is evaluated on logits chosen per sequence and compared with the PPO objective
written out by hand (with or without the KL term, as ``algorithm.kl_in`` says). Two data-parallel
ranks are emulated by two threads with a hand-made all-reduce: the split must not change a number.
"""

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from rlmt_megatron.algorithms.aggregation import GlobalNormalizers
from test_algorithms import ref_kl  # the float64 KL estimators written out by hand
from rlmt_megatron.config.rlmt import load_rlmt_config
from rlmt_megatron.runner.batching import make_train_micro_batches
from rlmt_megatron.trainer import updates
from rlmt_megatron.trainer.experience import Rollout

V, TEMPERATURE, MAX_NEW = 11, 0.7, 8

# (prompt group, prompt length, response length, reward): 3 prompts x 3 samples, one NaN reward
# and one empty response (both untrainable), a tie-free spread of rewards.
LAYOUT = [(0, 3, 4, 1.0), (0, 3, 2, -0.5), (0, 3, 5, 0.25),
          (1, 2, 3, 2.0), (1, 2, 0, 1.5), (1, 2, 4, -1.0),
          (2, 4, 1, 0.75), (2, 4, 3, float("nan")), (2, 4, 2, 0.1)]


def make_rollouts():
    out, token = [], 0
    for group, p, r, reward in LAYOUT:
        ids = list(range(token, token + p + r))  # distinct sequences: the stand-ins look them up
        token += p + r
        out.append(Rollout(prompt_index=group, prompt_ids=[i % V for i in ids[:p]], response_ids=[i % V for i in ids[p:]],
                           engine_logprobs=[-1.0] * r, finish_reason="stop", weight_version=0, reward=reward))
    return out


def seq(r):
    return tuple(r.prompt_ids + r.response_ids)


class Models:
    """Per sequence: policy logits [L, V] (float64), the old policy's logprobs (exact at the
    rollout temperature plus noise, so ratios differ from 1 and clipping happens), the
    reference's, and the critic's values [L]."""

    def __init__(self, rollouts, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.logits, self.old, self.ref, self.values = {}, {}, {}, {}
        for r in rollouts:
            s = seq(r)
            logits = torch.randn(len(s), V, generator=g, dtype=torch.float64)
            exact = exact_logp(logits, s)
            self.logits[s] = logits
            self.old[s] = (exact + 0.15 * torch.randn(len(s) - 1, generator=g, dtype=torch.float64)).float()
            self.ref[s] = (exact + 0.3 * torch.randn(len(s) - 1, generator=g, dtype=torch.float64)).float()
            self.values[s] = (0.5 * torch.randn(len(s), generator=g, dtype=torch.float64)).float()


def exact_logp(logits, s):
    lp = torch.log_softmax(logits[:-1] / TEMPERATURE, -1)
    return lp.gather(-1, torch.tensor(s[1:])[:, None])[:, 0]


class Recorder:
    """A role's stand-in: ``train_step`` records its calls and reports no metrics."""

    def __init__(self, name):
        self.name = name
        self.calls = []
        self.built = SimpleNamespace(spec=SimpleNamespace(vocab_size=V))

    def train_step(self, samples, loss_fn, unit_size=1):
        self.calls.append((samples, loss_fn))
        return {}


@pytest.fixture
def stand_ins(monkeypatch):
    rollouts = make_rollouts()
    models = Models(rollouts)

    def sequence_logprobs(runner, sequences, temperature=1.0):
        assert temperature == TEMPERATURE  # old and reference logprobs at the rollout temperature
        table = models.ref if runner.name == "reference" else models.old
        return [table[tuple(s)].clone() for s in sequences]

    def token_values(runner, sequences):
        assert runner.name == "critic"
        return [models.values[tuple(s)].clone() for s in sequences]

    monkeypatch.setattr(updates, "sequence_logprobs", sequence_logprobs)
    monkeypatch.setattr(updates, "token_values", token_values)
    return rollouts, models


def config(*overrides):
    return load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]",
                                   f"rollout.temperature={TEMPERATURE}", f"rollout.max_new_tokens={MAX_NEW}",
                                   *overrides])


def roles(cfg):
    return SimpleNamespace(policy=Recorder("policy"), critic=Recorder("critic"),
                           reference=Recorder("reference") if cfg.needs_reference else None)


def run_update(cfg, roles_, rollouts):
    """As the loop calls it: the algorithm section and the sampling settings the update needs."""
    return updates.UPDATES[cfg.algorithm.name](cfg.algorithm, roles_, rollouts, temperature=cfg.rollout.temperature,
                                               max_new_tokens=cfg.rollout.max_new_tokens)


# ------------------------------------------------------------------------------ references


def actions(r):
    """(number of actions, first response action): action t predicts token t + 1."""
    return len(r.prompt_ids) + len(r.response_ids) - 1, len(r.prompt_ids) - 1


def trainable(r):
    return len(r.response_ids) > 0 and math.isfinite(r.reward)


def ref_token_rewards(r, models, coef, estimator):
    """Outcome reward on the last response action, minus coef * KL(old, ref) on each response action."""
    n, first = actions(r)
    out = [0.0] * n
    if not trainable(r):
        return out
    old, ref = models.old[seq(r)].double().tolist(), models.ref[seq(r)].double().tolist()
    for t in range(first, n):
        out[t] = -coef * ref_kl(estimator, old[t], ref[t]) if coef else 0.0
    out[n - 1] += r.reward
    return out


def ref_whiten(rows, valid):
    """Mean and unbiased variance over every valid entry of every row; (x - mean) / sqrt(var + 1e-8)."""
    xs = [x for row, ok in zip(rows, valid) for x, v in zip(row, ok) if v]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) if v else 0.0 for x, v in zip(row, ok)] for row, ok in zip(rows, valid)]


def valid_actions(r):
    n, first = actions(r)
    return [trainable(r) and t >= first for t in range(n)]


def ref_outcome_advantages(rollouts, scores, estimator):
    """Per rollout: grpo (s - mean) / (unbiased std + 1e-6), dr_grpo s - mean, rloo s - mean of
    the others, over the trainable members of its prompt group; 0 without a baseline."""
    out = []
    for r, s in zip(rollouts, scores):
        group = [x for q, x in zip(rollouts, scores) if q.prompt_index == r.prompt_index and trainable(q)]
        if not trainable(r) or len(group) < 2:
            out.append(0.0)
            continue
        mean = sum(group) / len(group)
        if estimator == "rloo":
            out.append(s - (sum(group) - s) / (len(group) - 1))
        elif estimator == "dr_grpo":
            out.append(s - mean)
        else:
            std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
            out.append(0.0 if max(group) == min(group) else (s - mean) / (std + 1e-6))
    return out


def ref_returns(tokens, valid, gamma):
    out, run = [0.0] * len(tokens), 0.0
    for t in range(len(tokens) - 1, -1, -1):
        if valid[t]:
            run = tokens[t] + gamma * run
            out[t] = run
    return out


def ref_gae(tokens, values, valid, gamma, lam):
    n = len(tokens)
    adv, last, next_v = [0.0] * n, 0.0, 0.0
    for t in range(n - 1, -1, -1):
        if not valid[t]:
            continue
        delta = tokens[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t], next_v = last, values[t]
    return adv, [a + v if ok else 0.0 for a, v, ok in zip(adv, values, valid)]


def ref_policy_loss(samples, models, a, kl_in_loss):
    """The PPO objective by hand in float64, token mean over the batch: clip, dual clip,
    KL(logp, ref) in the loss when asked, entropy bonus."""
    total, count = 0.0, sum(float(s.fields["loss_mask"].sum()) for s in samples)
    for s in samples:
        ids = tuple(s.input_ids.tolist())
        z = torch.log_softmax(models.logits[ids][:-1] / TEMPERATURE, -1)
        logp = z.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        entropy = (-(z.exp() * z).sum(-1)).tolist()
        f = {k: v.double().tolist() for k, v in s.fields.items()}
        for t, m in enumerate(f["loss_mask"]):
            if not m:
                continue
            adv = f["advantages"][t]
            ratio = math.exp(min(max(logp[t] - f["old_logp"][t], -20.0), 20.0))
            pg = max(-adv * ratio, -adv * min(max(ratio, 1 - a.clip_low), 1 + a.clip_high))
            if adv < 0:
                pg = min(pg, -adv * a.dual_clip_c)
            kl = a.kl_coef * ref_kl(a.kl_estimator, logp[t], f["ref_logp"][t]) if kl_in_loss else 0.0
            total += (pg + kl - a.entropy_coef * entropy[t]) / count
    return total


def evaluate_loss(samples, loss_fn, models):
    """The recorded loss function on the chosen logits, one micro-batch, global counts."""
    (mb,) = make_train_micro_batches(samples, 1 << 20)
    logits = torch.zeros(*mb.input_ids.shape, V, dtype=torch.float32)
    for row, i in enumerate(mb.indices):
        n = samples[i].input_ids.numel()
        logits[row, :n] = models.logits[tuple(samples[i].input_ids.tolist())].float()
    norms = GlobalNormalizers(sum(float(s.fields["loss_mask"].sum()) for s in samples),
                              sum(1 for s in samples if s.fields["loss_mask"].sum() > 0))
    share, _ = loss_fn(logits, mb, norms)
    return float(share)


def assert_rows(samples, field, expected, tol=1e-6):
    assert len(samples) == len(expected)
    for s, row in zip(samples, expected):
        got = s.fields[field].double()
        assert got.shape == (len(row),)
        torch.testing.assert_close(got, torch.tensor(row, dtype=torch.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ GRPO family


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_outcome_estimators_with_the_kl_in_the_loss_or_the_reward(stand_ins, estimator, kl_in):
    rollouts, models = stand_ins
    cfg = config(f"algorithm.advantage={estimator}", f"algorithm.kl_in={kl_in}", "algorithm.kl_coef=0.05",
                 "algorithm.kl_estimator=k1")
    r = roles(cfg)
    metrics = run_update(cfg, r, rollouts)
    ((samples, loss_fn),) = r.policy.calls
    # kl_in=reward: each sequence is compared by its summed token rewards, r - coef * sum KL
    scores = [sum(ref_token_rewards(x, models, 0.05 if kl_in == "reward" else 0.0, "k1")) for x in rollouts]
    seq_adv = ref_outcome_advantages(rollouts, scores, estimator)
    assert_rows(samples, "advantages", [[a if v else 0.0 for v in valid_actions(x)] for x, a in zip(rollouts, seq_adv)])
    assert_rows(samples, "loss_mask", [[float(v) for v in valid_actions(x)] for x in rollouts], 0)
    trained = [a for x, a in zip(rollouts, seq_adv) if trainable(x)]
    assert metrics["advantages/mean"] == pytest.approx(sum(trained) / len(trained), abs=1e-9)
    expected = ref_policy_loss(samples, models, cfg.algorithm, kl_in_loss=kl_in == "loss")
    assert evaluate_loss(samples, loss_fn, models) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kl_in,gamma", [("reward", 1.0), ("reward", 0.9), ("loss", 0.95)])
def test_reinforce_pp_whitens_returns_over_the_batch(stand_ins, kl_in, gamma):
    rollouts, models = stand_ins
    cfg = config("algorithm.advantage=reinforce_pp", f"algorithm.kl_in={kl_in}", "algorithm.kl_coef=0.05",
                 "algorithm.kl_estimator=k1", f"algorithm.gamma={gamma}")
    r = roles(cfg)
    run_update(cfg, r, rollouts)
    ((samples, loss_fn),) = r.policy.calls
    coef = 0.05 if kl_in == "reward" else 0.0
    valid = [valid_actions(x) for x in rollouts]
    returns = [ref_returns(ref_token_rewards(x, models, coef, "k1"), ok, gamma) for x, ok in zip(rollouts, valid)]
    assert_rows(samples, "advantages", ref_whiten(returns, valid))
    expected = ref_policy_loss(samples, models, cfg.algorithm, kl_in_loss=kl_in == "loss")
    assert evaluate_loss(samples, loss_fn, models) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_reinforce_pp_baseline_centres_each_group_and_whitens_over_the_batch(stand_ins, kl_in):
    rollouts, models = stand_ins
    cfg = config("algorithm.advantage=reinforce_pp_baseline", f"algorithm.kl_in={kl_in}", "algorithm.kl_coef=0.05",
                 "algorithm.kl_estimator=k3+")
    r = roles(cfg)
    metrics = run_update(cfg, r, rollouts)
    ((samples, loss_fn),) = r.policy.calls
    scores = [sum(ref_token_rewards(x, models, 0.05 if kl_in == "reward" else 0.0, "k3")) for x in rollouts]
    centred = ref_outcome_advantages(rollouts, scores, "dr_grpo")
    valid = [valid_actions(x) for x in rollouts]
    assert_rows(samples, "advantages", ref_whiten([[c] * len(ok) for c, ok in zip(centred, valid)], valid))
    expected = ref_policy_loss(samples, models, cfg.algorithm, kl_in_loss=kl_in == "loss")
    assert evaluate_loss(samples, loss_fn, models) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # what the adaptive KL controller reads: per trainable rollout, the mean k3 over its response
    per_seq = []
    for x in rollouts:
        if trainable(x):
            n, first = actions(x)
            old, ref = models.old[seq(x)].double().tolist(), models.ref[seq(x)].double().tolist()
            per_seq.append(sum(ref_kl("k3", old[t], ref[t]) for t in range(first, n)) / (n - first))
    assert metrics["kl/old_ref_seq_mean"] == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-9)


def test_reinforce_pp_needs_no_groups():
    load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", "rollout.samples_per_prompt=1",
                            "algorithm.advantage=reinforce_pp"])


# ------------------------------------------------------------------------------ PPO


@pytest.mark.parametrize("kl_in,coef", [("reward", 0.05), ("loss", 0.05), ("reward", 0.0)])
def test_ppo_gae_whitened_with_the_kl_in_the_reward_or_the_loss(stand_ins, kl_in, coef):
    rollouts, models = stand_ins
    cfg = config("algorithm.name=ppo", f"algorithm.kl_in={kl_in}", f"algorithm.kl_coef={coef}",
                 "algorithm.kl_estimator=k3", "algorithm.gamma=0.95", "algorithm.lam=0.9")
    r = roles(cfg)
    run_update(cfg, r, rollouts)
    ((samples, loss_fn),), ((critic_samples, _),) = r.policy.calls, r.critic.calls
    valid = [valid_actions(x) for x in rollouts]
    adv, ret = [], []
    for x, ok in zip(rollouts, valid):
        tokens = ref_token_rewards(x, models, coef if kl_in == "reward" else 0.0, "k3")
        a, g = ref_gae(tokens, models.values[seq(x)].double().tolist()[:-1], ok, 0.95, 0.9)
        adv.append(a), ret.append(g)
    assert_rows(samples, "advantages", ref_whiten(adv, valid))
    assert_rows(critic_samples, "returns", ret)
    assert_rows(critic_samples, "old_values", [models.values[seq(x)].double().tolist()[:-1] for x in rollouts])
    assert ("ref_logp" in samples[0].fields) == (coef > 0)
    if coef > 0:
        expected = ref_policy_loss(samples, models, cfg.algorithm, kl_in_loss=kl_in == "loss")
        assert evaluate_loss(samples, loss_fn, models) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def ref_value_loss(samples, new_values, clip, aggregation):
    """The critic's loss in float64, token by token: 0.5 * max((V - R)^2, (clip(V) - R)^2),
    aggregated as ``aggregation`` says (Dr.GRPO's constant: the generation limit)."""
    per_seq = []
    for s, v in zip(samples, new_values):
        mask, ret, old = (s.fields[k].double().tolist() for k in ("loss_mask", "returns", "old_values"))
        terms = []
        for t, m in enumerate(mask):
            if m:
                clipped = min(max(v[t], old[t] - clip), old[t] + clip)
                terms.append(0.5 * max((v[t] - ret[t]) ** 2, (clipped - ret[t]) ** 2))
        per_seq.append(terms)
    seqs = [t for t in per_seq if t]
    if aggregation == "token_mean":
        return sum(map(sum, seqs)) / sum(map(len, seqs))
    if aggregation == "seq_mean_token_mean":
        return sum(sum(t) / len(t) for t in seqs) / len(seqs)
    return sum(map(sum, seqs)) / (len(seqs) * MAX_NEW)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_ppo_critic_loss_is_aggregated_like_the_policy_loss(stand_ins, aggregation):
    # seq_mean_token_sum_norm used to crash here: the critic's loss had no norm constant
    rollouts, models = stand_ins
    cfg = config("algorithm.name=ppo", f"algorithm.aggregation={aggregation}", "algorithm.kl_coef=0")
    r = roles(cfg)
    run_update(cfg, r, rollouts)
    ((samples, loss_fn),) = r.critic.calls
    new = [[x + 0.4 * math.sin(3.0 * t) for t, x in enumerate(s.fields["old_values"].double().tolist())] for s in samples]
    (mb,) = make_train_micro_batches(samples, 1 << 20)
    values = torch.zeros(*mb.input_ids.shape, 1, dtype=torch.float32)
    for row, i in enumerate(mb.indices):
        values[row, :len(new[i]), 0] = torch.tensor(new[i], dtype=torch.float32)
    norms = GlobalNormalizers(sum(float(s.fields["loss_mask"].sum()) for s in samples),
                              sum(1 for s in samples if s.fields["loss_mask"].sum() > 0))
    share, _ = loss_fn(values, mb, norms)
    assert float(share) == pytest.approx(ref_value_loss(samples, new, cfg.algorithm.value_clip, aggregation), rel=1e-5)


# ------------------------------------------------------------------------------ two DP ranks


class ThreadRanks:
    """Data-parallel ranks as threads: a barrier-synchronised exchange stands in for the
    collectives the updates use (all-reduce, gather, this rank's shard)."""

    def __init__(self, size):
        self.size, self.barrier, self.box, self.local = size, threading.Barrier(size, timeout=60), [None] * size, threading.local()

    def exchange(self, value):
        self.box[self.local.rank] = value
        self.barrier.wait()
        got = list(self.box)
        self.barrier.wait()
        return got

    def all_reduce(self, values, op="sum"):
        fn = {"sum": sum, "max": max, "min": min}[op]
        return [float(fn(column)) for column in zip(*self.exchange(list(values)))]

    def gather(self, local):
        return [x for part in self.exchange(list(local)) for x in part]

    def rank_and_size(self):
        return self.local.rank, self.size

    def shard(self, items):
        n = len(items)
        return list(items[self.local.rank * n // self.size:(self.local.rank + 1) * n // self.size])

    def run(self, fn):
        results, errors = [None] * self.size, []

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(k,)) for k in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("overrides", [
    ["algorithm.name=ppo", "algorithm.kl_in=reward", "algorithm.kl_coef=0.05", "algorithm.gamma=0.95", "algorithm.lam=0.9"],
    ["algorithm.advantage=reinforce_pp", "algorithm.kl_in=reward", "algorithm.kl_coef=0.05", "algorithm.gamma=0.9"],
    ["algorithm.advantage=rloo", "algorithm.kl_in=reward", "algorithm.kl_coef=0.05"],
    ["algorithm.advantage=reinforce_pp_baseline", "algorithm.kl_in=reward", "algorithm.kl_coef=0.05"],
], ids=["ppo", "reinforce_pp", "rloo", "reinforce_pp_baseline"])
def test_two_data_parallel_ranks_train_on_the_same_numbers_as_one(stand_ins, monkeypatch, overrides):
    rollouts, _ = stand_ins
    cfg = config(*overrides, "algorithm.kl_estimator=k1")
    one = roles(cfg)
    run_update(cfg, one, rollouts)
    ranks = ThreadRanks(2)
    for name, fn in (("dp_all_reduce", ranks.all_reduce), ("dp_gather", ranks.gather),
                     ("dp_rank_and_size", ranks.rank_and_size), ("dp_shard", ranks.shard)):
        monkeypatch.setattr(updates, name, fn)
    both = [roles(cfg) for _ in range(2)]
    ranks.run(lambda: run_update(cfg, both[ranks.local.rank], rollouts))
    for role in ("policy", "critic") if cfg.algorithm.name == "ppo" else ("policy",):
        split = [s for r in both for s in getattr(r, role).calls[0][0]]
        whole = getattr(one, role).calls[0][0]
        assert [s.input_ids.tolist() for s in split] == [s.input_ids.tolist() for s in whole]
        for a, b in zip(split, whole):
            for key in b.fields:
                torch.testing.assert_close(a.fields[key], b.fields[key], rtol=0, atol=1e-6)
