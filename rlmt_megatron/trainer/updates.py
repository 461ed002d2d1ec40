"""One policy update per algorithm: from scored rollouts to an optimizer step (GRPO, PPO, DPO).

Every function is ``update(algorithm, roles, rollouts, *, temperature, max_new_tokens)``: the
``algorithm`` section, the built roles (each runner micro-batches by its own ``batching``, set
when it was built), and of the sampling what the update needs: the temperature the engine
sampled at (the trainer's logprobs use the same; 0 counts as 1) and the response length limit
(Dr.GRPO's constant normaliser). It runs on all trainer ranks with the same ``rollouts``; each
data-parallel rank computes logprobs/values for and trains on its contiguous share
(``dp_shard``), so the global batch is exactly the step's rollouts. Returns the metrics of the
step (identical on all ranks), with the finer phases inside the loop's ``timing/train``:
``timing/old_logprobs``, ``timing/ref_logprobs``, ``timing/values`` (PPO),
``timing/critic_update`` (PPO), ``timing/update``.

Where the KL penalty goes (``algorithm.kl_in``): ``loss`` adds ``kl_coef * KL`` to the policy
loss; ``reward`` subtracts ``kl_coef * KL(old policy, reference)`` from each response token's
reward before the advantages (``fold_kl_into_rewards``): GAE (PPO) and REINFORCE++ carry it to
earlier tokens, the outcome estimators (GRPO, Dr.GRPO, RLOO) compare the sequences' summed token
rewards ``r - kl_coef * sum_t KL_t``, as verl does with ``use_kl_in_reward``.

Rollout correction (``algorithm.rollout_correction``, grpo and ppo): before the update, each
policy sample's response tokens are compared with the engine's logprobs of the same tokens
(``Rollout.engine_logprobs``): the masked tokens leave its ``loss_mask`` and every token gets an
``is_weight`` that multiplies its policy-gradient loss (``_rollout_correction``). A step whose
every token is masked trains nothing (``rollout_correction/skipped_update``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from rlmt_megatron.algorithms import (
    fold_kl_into_rewards,
    gae,
    get_kl_estimator,
    get_rollout_correction,
    masked_whiten,
    reinforce_pp,
)
from rlmt_megatron.algorithms.policy_loss import PolicyLossConfig
from rlmt_megatron.config.rlmt import AlgorithmConfig
from rlmt_megatron.distributed.collectives import dp_all_reduce, dp_gather, dp_rank_and_size, dp_shard, shard_bounds
from rlmt_megatron.monitoring.progress import PhaseTimer
from rlmt_megatron.trainer.experience import (
    Rollout,
    dpo_pairs,
    dpo_sample,
    group_advantages,
    policy_sample,
    response_mask,
    sequence_of,
)
from rlmt_megatron.runner.batching import Sample
from rlmt_megatron.runner.forward_only import sequence_logprobs, token_values
from rlmt_megatron.runner.losses import dpo_loss_fn, policy_loss_fn, value_loss_fn


def _logprob_diff(local: Sequence[Rollout], old_logp: Sequence[torch.Tensor]) -> dict[str, float]:
    """Engine vs trainer log p of the sampled tokens, over the global batch."""
    total, count, worst = 0.0, 0, 0.0
    for r, lp in zip(local, old_logp):
        if not r.response_ids:
            continue
        d = (torch.tensor(r.engine_logprobs, dtype=torch.float64) - lp[len(r.prompt_ids) - 1:].double()).abs()
        total, count, worst = total + float(d.sum()), count + d.numel(), max(worst, float(d.max()))
    total, count = dp_all_reduce([total, count])
    (worst,) = dp_all_reduce([worst], op="max")
    return {"rollout/logprob_diff_mean": total / max(count, 1.0), "rollout/logprob_diff_max": worst}


def _rollout_correction(a: AlgorithmConfig, local: Sequence[Rollout], samples: list[Sample]) -> tuple[dict[str, float], float]:
    """Apply ``a.rollout_correction`` to the policy samples in place (new ``loss_mask``, added
    ``is_weight``); returns its metrics over the global batch and the number of tokens kept in it."""
    rc = a.rollout_correction
    correct, kwargs = get_rollout_correction(rc.mode), rc.kwargs()
    weight_sum = kept = valid = truncated = masked = seqs = seqs_masked = 0.0
    weight_max = 0.0
    for r, s in zip(local, samples):
        f = s.fields
        mask = f["loss_mask"].bool()
        engine = torch.zeros(mask.numel(), dtype=torch.float64)
        if r.response_ids:
            if len(r.engine_logprobs) != len(r.response_ids):
                raise ValueError(f"a rollout has {len(r.engine_logprobs)} engine logprobs for {len(r.response_ids)} "
                                 "response tokens: rollout_correction needs one per token")
            engine[len(r.prompt_ids) - 1:] = torch.tensor(r.engine_logprobs, dtype=torch.float64)
        weight, keep, diag = correct(f["old_logp"].double()[None], engine[None], mask[None], **kwargs)
        weight, keep = weight[0], keep[0]
        f["loss_mask"], f["is_weight"] = keep.to(f["loss_mask"].dtype), weight.float()
        n_masked = float(diag["masked"].sum())
        weight_sum, kept, valid = weight_sum + float(weight.sum()), kept + float(keep.sum()), valid + float(mask.sum())
        truncated, masked = truncated + float(diag["truncated"].sum()), masked + n_masked
        seqs, seqs_masked = seqs + float(mask.any()), seqs_masked + float(n_masked > 0)
        weight_max = max(weight_max, float(weight.max()) if keep.any() else 0.0)
    weight_sum, kept, valid, truncated, masked, seqs, seqs_masked = dp_all_reduce(
        [weight_sum, kept, valid, truncated, masked, seqs, seqs_masked])
    (weight_max,) = dp_all_reduce([weight_max], op="max")
    return {"rollout_correction/weight_mean": weight_sum / max(kept, 1.0),
            "rollout_correction/weight_max": weight_max,
            "rollout_correction/truncated_token_frac": truncated / max(valid, 1.0),
            "rollout_correction/masked_token_frac": masked / max(valid, 1.0),
            "rollout_correction/masked_seq_frac": seqs_masked / max(seqs, 1.0)}, kept


def _minibatches(samples: list[Sample], k: int) -> list[list[Sample]]:
    n = len(samples)
    if n < k:
        raise ValueError(f"algorithm.updates_per_rollout={k} but this data-parallel rank holds only {n} rollouts")
    return [samples[lo:hi] for lo, hi in (shard_bounds(n, i, k) for i in range(k))]


def _train(engine, samples: list[Sample], loss_fn, updates: int, unit_size: int = 1) -> dict[str, float]:
    """``updates`` optimizer steps over consecutive mini-batches; metrics averaged over them."""
    merged: dict[str, float] = {}
    batches = _minibatches(samples, updates) if unit_size == 1 else [samples]
    for batch in batches:
        for k, v in engine.train_step(batch, loss_fn, unit_size=unit_size).items():
            merged[k] = merged.get(k, 0.0) + v / len(batches)
    return merged


def _policy_loss(a: AlgorithmConfig, vocab: int, temperature: float, max_new_tokens: int):
    return policy_loss_fn(
        PolicyLossConfig(loss=a.policy_loss, clip_low=a.clip_low, clip_high=a.clip_high, dual_clip_c=a.dual_clip_c,
                         kl_in_loss=a.kl_in == "loss" and a.kl_coef > 0, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
                         entropy_coef=a.entropy_coef),
        vocab, a.aggregation, temperature=temperature, norm_constant=_norm_constant(a, max_new_tokens),
    )


def _train_policy(a: AlgorithmConfig, roles, local: Sequence[Rollout], samples: list[Sample], temperature: float,
                  max_new_tokens: int, timer: PhaseTimer) -> dict[str, float]:
    """The policy's optimizer steps (grpo, ppo), after ``a.rollout_correction`` when one is set;
    a batch whose every token the correction masks trains nothing (``skipped_update``)."""
    metrics: dict[str, float] = {}
    if a.rollout_correction.mode != "none":
        metrics, kept = _rollout_correction(a, local, samples)
        if kept == 0:
            return metrics | {"rollout_correction/skipped_update": 1.0}
    with timer.phase("update"):
        loss = _policy_loss(a, roles.policy.built.spec.vocab_size, temperature, max_new_tokens)
        return metrics | _train(roles.policy, samples, loss, a.updates_per_rollout)


def _norm_constant(a: AlgorithmConfig, max_new_tokens: int) -> Optional[float]:
    """Dr.GRPO's constant per-sequence divisor: the longest possible response."""
    return float(max_new_tokens) if a.aggregation == "seq_mean_token_sum_norm" else None


def _old_and_ref_logp(roles, sequences, temperature: float, timer: PhaseTimer):
    with timer.phase("old_logprobs"):
        old = sequence_logprobs(roles.policy, sequences, temperature)
    if roles.reference is None:
        return old, None
    with timer.phase("ref_logprobs"):
        ref = sequence_logprobs(roles.reference, sequences, temperature)
    return old, ref


def _token_rewards(a: AlgorithmConfig, local: Sequence[Rollout], old,
                   ref) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per local rollout, over its actions [P + R - 1]: the loss mask and the token rewards
    (float64): the outcome reward on the last response action and, with ``kl_in: reward``,
    ``- kl_coef * KL(old, ref)`` on every response action. Untrainable rollouts: all zero."""
    masks, rewards = [], []
    for i, r in enumerate(local):
        n = len(r.prompt_ids) + len(r.response_ids) - 1
        mask = response_mask(len(r.prompt_ids), len(r.response_ids)) if r.trainable else torch.zeros(n)
        tokens = torch.zeros(n, dtype=torch.float64)
        if r.trainable:
            tokens[n - 1] = r.reward
            if a.kl_in == "reward" and a.kl_coef > 0:
                tokens = fold_kl_into_rewards(tokens[None], old[i][None].double(), ref[i][None].double(),
                                              mask[None], a.kl_coef, a.kl_estimator)[0]
        masks.append(mask), rewards.append(tokens)
    return masks, rewards


def _reference_kl(a: AlgorithmConfig, local: Sequence[Rollout], old, ref) -> dict[str, float]:
    """KL(old policy || reference) of the global batch, as the adaptive KL controller reads it
    (verl's ``current_kl``): each trainable rollout's mean over its response tokens of
    ``a.kl_estimator``, averaged over the rollouts. Nothing without a reference model."""
    if ref is None:
        return {}
    estimator = get_kl_estimator(a.kl_estimator)
    total, count = 0.0, 0
    for r, o, f in zip(local, old, ref):
        if r.trainable:
            start = len(r.prompt_ids) - 1
            total += float(estimator(o[start:].double(), f[start:].double()).mean())
            count += 1
    total, count = dp_all_reduce([total, count])
    return {"kl/old_ref_seq_mean": total / count} if count else {}


def _token_samples(local: Sequence[Rollout], masks, advantages, old, ref) -> list[Sample]:
    out = []
    for i, r in enumerate(local):
        fields = {"loss_mask": masks[i], "old_logp": old[i].float(), "advantages": advantages[i].float()}
        if ref is not None:
            fields["ref_logp"] = ref[i].float()
        out.append(Sample(torch.tensor(sequence_of(r), dtype=torch.long), fields))
    return out


def _reinforce_pp_advantages(a: AlgorithmConfig, masks, token_rewards) -> list[torch.Tensor]:
    """REINFORCE++ on this rank's rollouts, whitened over the global batch (all DP ranks)."""
    width = max(m.numel() for m in masks)
    tokens = torch.zeros(len(masks), width, dtype=torch.float64)
    mask = torch.zeros(len(masks), width, dtype=torch.bool)
    for i, (m, t) in enumerate(zip(masks, token_rewards)):
        tokens[i, :t.numel()], mask[i, :m.numel()] = t, m.bool()
    adv, _ = reinforce_pp(tokens, mask, a.gamma, reduce=dp_all_reduce)
    return [adv[i, :m.numel()] for i, m in enumerate(masks)]


def grpo_update(a: AlgorithmConfig, roles, rollouts: list[Rollout], *, temperature: float,
                max_new_tokens: int) -> dict[str, float]:
    """Critic-free policy update: outcome advantages per prompt group (``grpo``, ``dr_grpo``,
    ``rloo``) spread over the response, or REINFORCE++ token advantages (``reinforce_pp``, and
    ``reinforce_pp_baseline``: group-centred scores whitened over the global batch's tokens)."""
    temperature = temperature or 1.0
    rank, size = dp_rank_and_size()
    lo, hi = shard_bounds(len(rollouts), rank, size)
    local = rollouts[lo:hi]
    timer = PhaseTimer()
    old, ref = _old_and_ref_logp(roles, [sequence_of(r) for r in local], temperature, timer)
    metrics = _logprob_diff(local, old) | _reference_kl(a, local, old, ref)
    if a.advantage == "reinforce_pp":
        masks, token_rewards = _token_rewards(a, local, old, ref)
        samples = _token_samples(local, masks, _reinforce_pp_advantages(a, masks, token_rewards), old, ref)
    elif a.advantage == "reinforce_pp_baseline":
        masks, token_rewards = _token_rewards(a, local, old, ref)
        # the group means need every rollout's (KL-penalised) score: groups may span DP ranks
        centered = group_advantages(rollouts, "dr_grpo", dp_gather([float(t.sum()) for t in token_rewards]))
        advantages = masked_whiten([centered[lo + i] * m.double() for i, m in enumerate(masks)], masks,
                                   reduce=dp_all_reduce)
        samples = _token_samples(local, masks, advantages, old, ref)
    else:
        scores = None
        if a.kl_in == "reward" and a.kl_coef > 0:
            # A group may span DP ranks: every rank needs every rollout's penalised score.
            scores = dp_gather([float(t.sum()) for t in _token_rewards(a, local, old, ref)[1]])
        advantages = group_advantages(rollouts, a.advantage, scores)
        samples = [policy_sample(r, float(advantages[lo + i]), old[i], None if ref is None else ref[i])
                   for i, r in enumerate(local)]
        trained = advantages[[i for i, r in enumerate(rollouts) if r.trainable]]
        metrics["advantages/mean"] = float(trained.mean()) if trained.numel() else 0.0
        metrics["advantages/std"] = float(trained.std()) if trained.numel() > 1 else 0.0
    metrics.update(_train_policy(a, roles, local, samples, temperature, max_new_tokens, timer))
    metrics.update(timer.metrics())
    return metrics


def ppo_update(a: AlgorithmConfig, roles, rollouts: list[Rollout], *, temperature: float,
               max_new_tokens: int) -> dict[str, float]:
    """PPO with a critic: outcome reward on the last response token (minus the per-token KL
    penalty with ``kl_in: reward``), GAE(γ, λ), advantages whitened over the global batch
    (``masked_whiten`` over all DP ranks), clipped value loss on the critic."""
    temperature = temperature or 1.0
    local = dp_shard(rollouts)
    seqs = [sequence_of(r) for r in local]
    timer = PhaseTimer()
    old, ref = _old_and_ref_logp(roles, seqs, temperature, timer)
    with timer.phase("values"):
        values = token_values(roles.critic, seqs)
    masks, token_rewards = _token_rewards(a, local, old, ref)
    advs, returns, old_values = [], [], []
    for mask, tokens, v in zip(masks, token_rewards, values):
        v_act = v[:-1].double()  # value of action t = critic output at position t
        adv, ret = gae(tokens[None], v_act[None], mask[None].bool(), a.gamma, a.lam)
        advs.append(adv[0]), returns.append(ret[0]), old_values.append(v_act)
    advs = masked_whiten(advs, masks, reduce=dp_all_reduce)
    policy_samples = _token_samples(local, masks, advs, old, ref)
    critic_samples = [Sample(s.input_ids, {"loss_mask": masks[i], "returns": returns[i].float(),
                                           "old_values": old_values[i].float()}) for i, s in enumerate(policy_samples)]
    metrics = _logprob_diff(local, old) | _reference_kl(a, local, old, ref)
    k = a.updates_per_rollout
    with timer.phase("critic_update"):
        value_loss = value_loss_fn(a.value_clip, a.aggregation, _norm_constant(a, max_new_tokens))
        metrics.update(_train(roles.critic, critic_samples, value_loss, k))
    metrics = {("critic/" + key if key in ("grad_norm", "lr") else key): v for key, v in metrics.items()}
    # the critic above trains on every token; the rollout correction applies to the policy only
    metrics.update(_train_policy(a, roles, local, policy_samples, temperature, max_new_tokens, timer))
    metrics.update(timer.metrics())
    return metrics


def dpo_update(a: AlgorithmConfig, roles, rollouts: list[Rollout], *, temperature: float,
               max_new_tokens: int) -> Optional[dict[str, float]]:
    """On-policy DPO: best vs worst response of each prompt by reward. Returns None (no update)
    when fewer pairs than data-parallel ranks exist (every rank needs one). ``max_new_tokens``
    is not used (the signature is every update's)."""
    pairs = dpo_pairs(rollouts)
    _, size = dp_rank_and_size()
    if len(pairs) < size:
        return None
    local = [r for pair in dp_shard(pairs) for r in pair]
    seqs = [sequence_of(r) for r in local]
    timer = PhaseTimer()
    with timer.phase("ref_logprobs"):
        ref = sequence_logprobs(roles.reference, seqs)
    samples = [dpo_sample(r, ref[i]) for i, r in enumerate(local)]
    # Engine vs trainer on the paired responses (in one_round mode this is the drift from the
    # frozen sampler, by design).
    with timer.phase("old_logprobs"):
        old = sequence_logprobs(roles.policy, seqs, temperature or 1.0)
    metrics = _logprob_diff(local, old)
    loss = dpo_loss_fn(roles.policy.built.spec.vocab_size, beta=a.dpo_beta)
    with timer.phase("update"):
        metrics.update(_train(roles.policy, samples, loss, 1, unit_size=2))
    metrics["dpo/pairs"] = float(len(pairs))
    metrics.update(timer.metrics())
    return metrics


UPDATES = {"grpo": grpo_update, "ppo": ppo_update, "dpo": dpo_update}
