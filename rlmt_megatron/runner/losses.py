"""Loss functions for :meth:`ModelRunner.train_step`: the algorithms applied to model outputs.

Each factory returns ``loss_fn(output, micro_batch, norms) -> (loss share, metrics)``. The share
is this micro-batch's part of the global loss (see ``algorithms/aggregation.py``); metrics are
shares of global means (summed over micro-batches and DP ranks by the engine), so the engine's
reported ``kl`` or ``entropy`` is the token mean over the whole global batch.

Sample fields used (per action, length L-1; see ``runner/batching.py``):
- policy: ``loss_mask``, ``old_logp``, ``advantages``, optional ``ref_logp`` and ``is_weight``
  (the rollout-correction weight of each token, ``algorithms/rollout_correction.py``);
- critic: ``loss_mask``, ``returns``, ``old_values``;
- sft: ``loss_mask``;
- dpo: ``loss_mask``, ``ref_logp`` (unless reference-free); samples come in (chosen, rejected)
  pairs, trained with ``train_step(..., unit_size=2)``;
- reward model (Bradley–Terry): ``loss_mask`` (1 at the last token's action only, so the global
  counts see one loss token per sequence); (chosen, rejected) pairs as for DPO.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from rlmt_megatron.algorithms import aggregate, bradley_terry, clipped_value_loss, nll, policy_objective, require_finite, sigmoid_dpo
from rlmt_megatron.algorithms.aggregation import GlobalNormalizers
from rlmt_megatron.algorithms.policy_loss import PolicyLossConfig
from rlmt_megatron.runner.batching import TrainMicroBatch
from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs_and_entropy


def _token_mean_share(x: torch.Tensor, mask: torch.Tensor, norms: GlobalNormalizers) -> torch.Tensor:
    return (x.detach() * mask).sum() / norms.num_tokens


def policy_loss_fn(
    cfg: PolicyLossConfig,
    vocab_size: int,
    aggregation: str = "token_mean",
    temperature: float = 1.0,
    norm_constant: Optional[float] = None,
):
    """The policy objective (``cfg.loss``: PPO-clip, GSPO, CISPO; +KL, -entropy; times the samples'
    ``is_weight`` when they carry one) on the policy's vocab-parallel logits."""
    want_entropy = True  # reported every step; costs one extra all-reduced scalar per token

    def loss_fn(logits: torch.Tensor, mb: TrainMicroBatch, norms: GlobalNormalizers):
        f = mb.fields
        require_finite("advantages", f["advantages"])
        mask = f["loss_mask"]
        logp, entropy = vocab_parallel_logprobs_and_entropy(
            logits[:, :-1], mb.targets, vocab_size, temperature, with_entropy=want_entropy
        )
        total, parts = policy_objective(logp, f["old_logp"], f.get("ref_logp"), entropy, f["advantages"], mask, cfg,
                                        is_weight=f.get("is_weight"))
        share = aggregate(total, mask, dataclasses.replace(norms, norm_constant=norm_constant), aggregation)
        metrics = {
            "loss/policy": _token_mean_share(parts["pg_loss"], mask, norms),
            "policy/clipfrac": _token_mean_share(parts["clipped"].float(), mask, norms),
            "policy/ratio_mean": _token_mean_share(parts["ratio"], mask, norms),
            "policy/logp_change_abs_mean": _token_mean_share((logp - f["old_logp"]).abs(), mask, norms),
        }
        if "kl" in parts:
            metrics["kl"] = _token_mean_share(parts["kl"], mask, norms)
        if "entropy" in parts:
            metrics["entropy"] = _token_mean_share(parts["entropy"], mask, norms)
        return share, metrics

    return loss_fn


def value_loss_fn(clip_eps: Optional[float] = 0.5, aggregation: str = "token_mean",
                  norm_constant: Optional[float] = None):
    """Clipped value loss on the critic head; value of action t = head output at position t.

    ``clip_eps`` defaults to the RLMT PPO recipe's value clip of 0.5. ``aggregation`` and
    ``norm_constant`` as for the policy loss (verl aggregates the value loss with the policy's
    ``loss_agg_mode``; Dr.GRPO's constant is the same one).
    """

    def loss_fn(values: torch.Tensor, mb: TrainMicroBatch, norms: GlobalNormalizers):
        f = mb.fields
        v = values[:, :-1, 0].float()
        loss, parts = clipped_value_loss(v, f["old_values"], f["returns"], f["loss_mask"], clip_eps)
        share = aggregate(loss, f["loss_mask"], dataclasses.replace(norms, norm_constant=norm_constant), aggregation)
        return share, {
            "loss/value": _token_mean_share(loss, f["loss_mask"], norms),
            "critic/clipfrac": _token_mean_share(parts["clipped"].float(), f["loss_mask"], norms),
            "critic/values_mean": _token_mean_share(v, f["loss_mask"], norms),
        }

    return loss_fn


def sft_loss_fn(vocab_size: int, aggregation: str = "token_mean"):
    """Masked NLL (assistant tokens only: the mask says which)."""

    def loss_fn(logits: torch.Tensor, mb: TrainMicroBatch, norms: GlobalNormalizers):
        mask = mb.fields["loss_mask"]
        logp, _ = vocab_parallel_logprobs_and_entropy(logits[:, :-1], mb.targets, vocab_size, with_entropy=False)
        loss = nll(logp, mask)
        return aggregate(loss, mask, norms, aggregation), {"loss/sft": _token_mean_share(loss, mask, norms)}

    return loss_fn


def dpo_loss_fn(vocab_size: int, beta: float = 0.1, label_smoothing: float = 0.0, reference_free: bool = False):
    """Sigmoid DPO over (chosen, rejected) row pairs; the loss is the mean over all pairs."""

    def loss_fn(logits: torch.Tensor, mb: TrainMicroBatch, norms: GlobalNormalizers):
        f = mb.fields
        rows = len(mb.indices)  # rows past this are interleaved-PP padding
        if rows == 0:  # an all-padding filler micro-batch (interleaved PP)
            return logits.sum() * 0.0, {}
        idx = mb.indices
        _check_pairs(mb, "DPO")
        mask = f["loss_mask"][:rows]
        if (mask.sum(-1) == 0).any():
            raise ValueError(f"a DPO response among samples {idx} has no loss token")
        logp, _ = vocab_parallel_logprobs_and_entropy(logits[:rows, :-1], mb.targets[:rows], vocab_size, with_entropy=False)
        seq = (logp * mask).sum(-1)
        ref = None if reference_free else (f["ref_logp"][:rows] * mask).sum(-1)
        losses, chosen_r, rejected_r = sigmoid_dpo(
            seq[0::2], seq[1::2], None if ref is None else ref[0::2], None if ref is None else ref[1::2],
            beta=beta, label_smoothing=label_smoothing, reference_free=reference_free,
        )
        pairs = norms.num_seqs / 2  # every response has a loss token (checked), so seqs = 2 * pairs
        return losses.sum() / pairs, {
            "loss/dpo": losses.detach().sum() / pairs,
            "dpo/reward_margin": (chosen_r - rejected_r).detach().sum() / pairs,
            "dpo/accuracy": (chosen_r > rejected_r).float().sum() / pairs,
        }

    return loss_fn


def _check_pairs(mb: TrainMicroBatch, what: str) -> None:
    idx = mb.indices
    if len(idx) % 2 or any(c % 2 or r != c + 1 for c, r in zip(idx[0::2], idx[1::2])):
        raise ValueError(f"{what} micro-batch holds samples {idx}: (chosen, rejected) pairs must stay together "
                         "(train_step(..., unit_size=2), samples ordered chosen, rejected, chosen, ...)")


def reward_model_loss_fn():
    """Bradley–Terry loss on the RM's score at each sequence's last real token (mean over pairs)."""

    def loss_fn(scores: torch.Tensor, mb: TrainMicroBatch, norms: GlobalNormalizers):
        rows = len(mb.indices)
        if rows == 0:  # an all-padding filler micro-batch (interleaved PP)
            return scores.sum() * 0.0, {}
        _check_pairs(mb, "reward-model")
        last = scores[torch.arange(rows, device=scores.device), mb.lengths[:rows] - 1, 0].float()
        losses = bradley_terry(last[0::2], last[1::2])
        pairs = norms.num_seqs / 2
        return losses.sum() / pairs, {
            "loss/rm": losses.detach().sum() / pairs,
            "rm/accuracy": (last[0::2] > last[1::2]).float().detach().sum() / pairs,
            "rm/margin": (last[0::2] - last[1::2]).detach().sum() / pairs,
        }

    return loss_fn
