"""Advantage estimators for outcome rewards (one scalar per sequence) and token-level rewards.

Shapes: ``N``/``B`` sequences, ``T`` response tokens, masks ``[B, T]`` (bool or 0/1) marking the
valid response tokens; padding may sit anywhere but is usually on the right.

Argument order, the same for every estimator of a kind:

- sequence-level (outcome) estimators ``grpo``, ``dr_grpo``, ``rloo``:
  ``(rewards [N], group_ids=None, group_size=None, ...)``; they return ``[N]``, spread over
  tokens with ``broadcast_to_tokens``. Group statistics need the whole group: call them on the
  whole global batch, before it is split over data-parallel ranks.
- token-level estimators ``reinforce_pp``, ``gae``: ``(token_rewards [B, T], [values,] mask, ...)``;
  they return ``(advantages, returns)``, both ``[B, T]`` and 0 at masked positions. Build the
  token rewards with ``outcome_to_token_rewards`` (and ``fold_kl_into_rewards`` for a KL
  penalty in the reward). Their batch statistics (``masked_whiten``) may be taken over every
  data-parallel rank through a ``reduce`` callback, so each rank can pass only its shard.
- ``reinforce_pp_baseline``: ``(rewards [B], mask, group_ids=None, group_size=None, ...)``, a
  sequence-level group baseline whitened over tokens; returns advantages ``[B, T]``.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence

import torch

from .checks import (
    as_bool_mask,
    lookup,
    require_finite,
    require_ndim,
    require_nonempty,
    require_rows_nonempty,
    require_same_shape,
)

GroupIds = torch.Tensor | Sequence[Hashable]
# Sums a list of floats element-wise over the ranks that share a batch (data-parallel ranks);
# the identity for one process.
Reduce = Callable[[list[float]], list[float]]


def _check_rewards(rewards: torch.Tensor, name: str = "rewards") -> torch.Tensor:
    require_ndim(name, rewards, 1)
    require_nonempty(name, rewards)
    if not rewards.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {rewards.dtype}")
    return require_finite(name, rewards)


def _check_token_mask(mask: torch.Tensor, batch: int, name: str = "mask") -> torch.Tensor:
    require_ndim(name, mask, 2)
    if mask.shape[0] != batch:
        raise ValueError(f"shape mismatch: {name} has {mask.shape[0]} rows but rewards has {batch} entries")
    require_nonempty(name, mask)
    return as_bool_mask(name, mask)


def _group_index(n: int, group_ids: GroupIds | None, group_size: int | None, device) -> tuple[torch.Tensor, int]:
    """Map each of ``n`` samples to a dense group index 0..G-1. Exactly one of the two must be given.

    ``group_size=k`` means contiguous groups ``[0..k), [k..2k), ...``; ``group_ids`` may be any
    labels (ints or hashables such as prompt uids), groups need not be contiguous.
    """
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids or group_size")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards N={n}")
        return torch.arange(n, device=device) // group_size, n // group_size
    if torch.is_tensor(group_ids):
        if group_ids.dim() != 1 or group_ids.numel() != n:
            raise ValueError(
                f"shape mismatch: group_ids has shape {tuple(group_ids.shape)} but rewards has shape ({n},)"
            )
        uniq, inv = torch.unique(group_ids, return_inverse=True)
        return inv.to(device), int(uniq.numel())
    if len(group_ids) != n:
        raise ValueError(f"shape mismatch: group_ids has {len(group_ids)} entries but rewards has {n}")
    dense: dict[Hashable, int] = {}
    idx = [dense.setdefault(g, len(dense)) for g in group_ids]
    return torch.tensor(idx, dtype=torch.long, device=device), len(dense)


def _group_sum(x: torch.Tensor, inv: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inv, x)


def grpo(
    rewards: torch.Tensor,
    group_ids: GroupIds | None = None,
    group_size: int | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantage per sequence: ``A_i = (r_i - mean_g) / (std_g + eps)``.

    ``mean_g``/``std_g`` are over the samples of i's group (same prompt); ``std_g`` is the
    *unbiased* (n-1) standard deviation, as ``torch.std`` in verl's and RLMT's GRPO.
    ``normalize_std=False`` gives Dr.GRPO, ``A_i = r_i - mean_g``: no std division, which
    otherwise up-weights prompts whose rewards barely differ.

    Groups of size 1 get advantage 0 (no baseline exists; verl instead returns r_i/(1+eps)).
    A group whose rewards are all equal gets exactly 0 (not a rounding residue scaled by 1/eps).
    """
    _check_rewards(rewards)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    inv, g = _group_index(rewards.numel(), group_ids, group_size, rewards.device)
    count = _group_sum(torch.ones_like(rewards), inv, g)
    mean = _group_sum(rewards, inv, g) / count
    dev = rewards - mean[inv]
    adv = dev
    if normalize_std:
        var = _group_sum(dev * dev, inv, g) / (count - 1).clamp(min=1)
        adv = dev / (var.sqrt()[inv] + eps)
    empty = torch.zeros(g, dtype=rewards.dtype, device=rewards.device)
    gmax = empty.scatter_reduce(0, inv, rewards, "amax", include_self=False)
    gmin = empty.scatter_reduce(0, inv, rewards, "amin", include_self=False)
    degenerate = (count[inv] < 2) | (gmax[inv] == gmin[inv])
    return torch.where(degenerate, torch.zeros_like(adv), adv)


def dr_grpo(rewards: torch.Tensor, group_ids: GroupIds | None = None, group_size: int | None = None) -> torch.Tensor:
    """Dr.GRPO advantage ``A_i = r_i - mean_g`` (``grpo`` with ``normalize_std=False``)."""
    return grpo(rewards, group_ids=group_ids, group_size=group_size, normalize_std=False)


def rloo(rewards: torch.Tensor, group_ids: GroupIds | None = None, group_size: int | None = None) -> torch.Tensor:
    """RLOO advantage ``A_i = r_i - (1/(k-1)) * sum_{j != i in group} r_j``.

    The leave-one-out baseline is independent of sample i, so the estimator stays unbiased.
    Every group needs k >= 2 samples (ValueError otherwise).
    """
    _check_rewards(rewards)
    inv, g = _group_index(rewards.numel(), group_ids, group_size, rewards.device)
    count = _group_sum(torch.ones_like(rewards), inv, g)
    if bool((count < 2).any()):
        raise ValueError("rloo needs at least 2 samples per group (group_size/group_ids give a group of 1)")
    total = _group_sum(rewards, inv, g)
    return rewards - (total[inv] - rewards) / (count[inv] - 1)


def broadcast_to_tokens(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages ``A[b, t] = seq_adv[b] * mask[b, t]`` (0 on padding), shape [B, T]."""
    _check_rewards(seq_adv, "seq_adv")
    m = _check_token_mask(mask, seq_adv.shape[0])
    return torch.where(m, seq_adv[:, None], torch.zeros((), dtype=seq_adv.dtype, device=seq_adv.device))


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row of a bool [B, T] mask (rows must be non-empty)."""
    t = mask.shape[-1]
    return t - 1 - mask.flip(-1).long().argmax(dim=-1)


def outcome_to_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's scalar reward on its last valid token; 0 elsewhere. Shape [B, T].

    The outcome reward scores the whole response, so it is "received" when the response ends.
    A row with no valid token has nowhere to put its reward: ValueError.
    """
    _check_rewards(rewards)
    m = _check_token_mask(mask, rewards.shape[0])
    require_rows_nonempty("mask", m)
    out = torch.zeros(m.shape, dtype=rewards.dtype, device=rewards.device)
    return out.scatter_(1, last_valid_index(m)[:, None], rewards[:, None])


def masked_whiten(
    values: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    reduce: Reduce | None = None,
    eps: float = 1e-8,
) -> torch.Tensor | list[torch.Tensor]:
    """``(x - mean) * rsqrt(var + eps)`` on the valid entries, 0 elsewhere.

    ``values``/``masks``: one tensor and its mask, or lists of them (e.g. one per sequence, of
    different lengths); the result has the same form. ``mean`` and ``var`` are over every valid
    entry of every tensor and, with ``reduce``, of every rank: ``reduce`` sums a list of floats
    over the ranks (``dp_all_reduce`` for data parallelism). It is called twice, with
    ``[sum, count]`` and then ``[sum of squared deviations]``, so every rank must call this,
    also one whose entries are all masked; the result is then the same as one rank whitening
    the whole batch.

    Definition: the mean, and the *unbiased* variance ``sum (x - mean)^2 / (n - 1)``, eps added
    inside the square root. This is verl's ``masked_whiten`` (``masked_var(unbiased=True)``,
    ``rsqrt(var + 1e-8)``), which verl applies to both its PPO (GAE) and its REINFORCE++
    advantages: the trainer follows verl's recipes, and one definition serves both
    estimators. (OpenRLHF's population variance differs by a factor ``sqrt((n-1)/n)``, well
    under 0.1% for a batch of thousands of tokens.) Statistics are accumulated in float64; a
    single valid entry whitens to 0. No valid entry on any rank: ValueError.
    """
    single = torch.is_tensor(values)
    vals = [values] if single else list(values)
    ms = [masks] if torch.is_tensor(masks) else list(masks)
    if len(vals) != len(ms):
        raise ValueError(f"shape mismatch: {len(vals)} value tensors but {len(ms)} masks")
    bools = []
    for i, (v, m) in enumerate(zip(vals, ms)):
        require_same_shape(f"values[{i}]", v, mask=m)
        bools.append(as_bool_mask(f"masks[{i}]", m))
        require_finite(f"values[{i}]", torch.where(bools[-1], v, torch.zeros((), dtype=v.dtype, device=v.device)))
    reduce = reduce or list

    def masked_sum(x: torch.Tensor, m: torch.Tensor) -> float:
        return float(torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum())

    total, count = reduce([sum(masked_sum(v.double(), m) for v, m in zip(vals, bools)),
                           float(sum(int(m.sum()) for m in bools))])
    if count == 0:
        raise ValueError("mask has no valid tokens: cannot whiten an all-masked batch")
    mean = total / count
    (squares,) = reduce([sum(masked_sum((v.double() - mean) ** 2, m) for v, m in zip(vals, bools))])
    scale = 1.0 / math.sqrt(squares / max(count - 1.0, 1.0) + eps)
    out = [torch.where(m, ((v.double() - mean) * scale).to(v.dtype), torch.zeros((), dtype=v.dtype, device=v.device))
           for v, m in zip(vals, bools)]
    return out[0] if single else out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = sum_{s >= t, s valid} gamma^(#valid tokens in (t, s]) * r_s``, 0 on padding.

    Masked positions are skipped (neither add reward nor discount), so padding anywhere is harmless.
    """
    m = as_bool_mask("mask", mask)
    r = torch.where(m, token_rewards, torch.zeros_like(token_rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        running = torch.where(m[:, t], r[:, t] + gamma * running, running)
        out[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    return out


def reinforce_pp(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    reduce: Reduce | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (OpenRLHF; verl's ``reinforce_plus_plus``): ``(advantages, returns)``, both [B, T].

    1. ``token_rewards``: usually the outcome reward on the last valid token
       (``outcome_to_token_rewards``), with the KL penalty folded in per token
       (``fold_kl_into_rewards``, the REINFORCE++ convention);
    2. returns ``G_t = sum_{s >= t, s valid} gamma^(#valid tokens in (t, s]) r_s`` (gamma=1: plain sum);
    3. advantages = ``masked_whiten(G)`` over *all* valid tokens of the batch (no per-prompt
       baseline: the batch statistics stand in for a critic). With ``reduce`` (see
       ``masked_whiten``) the batch is the global one, over every data-parallel rank, and this
       rank's share may be empty.
    """
    require_ndim("token_rewards", token_rewards, 2)
    if reduce is None:
        require_nonempty("token_rewards", token_rewards)
    require_same_shape("token_rewards", token_rewards, mask=mask)
    require_finite("token_rewards", token_rewards)
    m = as_bool_mask("mask", mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    returns = discounted_returns(token_rewards, m, gamma)
    return masked_whiten(returns, m, reduce, eps), returns


def reinforce_pp_baseline(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds | None = None,
    group_size: int | None = None,
    reduce: Reduce | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al., 2025; verl's ``reinforce_plus_plus_baseline``): [B, T].

    1. each sequence's reward minus its group's mean (the samples of one prompt; ``dr_grpo``,
       so a group of one, or of equal rewards, gets 0: no baseline to compare with);
    2. spread over the sequence's valid tokens;
    3. ``masked_whiten`` over every valid token of the batch (with ``reduce``, of every
       data-parallel rank): the global batch's spread sets the scale, not each group's std.

    ``rewards [B]`` may be the sequences' summed token rewards (a KL penalty folded in). The
    group means need whole groups: with data parallelism compute step 1 on the global batch
    and call ``masked_whiten`` on each rank's share, as the trainer does.
    """
    centered = dr_grpo(rewards, group_ids=group_ids, group_size=group_size)
    m = _check_token_mask(mask, rewards.numel())
    return masked_whiten(broadcast_to_tokens(centered, m), m, reduce, eps)


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation: ``(advantages, returns)``, both [B, T], 0 on padding.

    ``delta_t = r_t + gamma * V_{next(t)} - V_t`` and ``A_t = delta_t + gamma * lam * A_{next(t)}``,
    where ``next(t)`` is the next *valid* token (V and A are 0 past the last one, i.e. the episode
    ends with the response). Rewards/values at masked positions are ignored, so right padding
    (or any padding) does not leak into the estimate. ``returns = advantages + values`` is the
    critic's regression target (TD(lambda) return). No whitening here; see ``masked_whiten``.
    """
    require_ndim("token_rewards", token_rewards, 2)
    require_nonempty("token_rewards", token_rewards)
    require_same_shape("token_rewards", token_rewards, values=values, mask=mask)
    require_finite("token_rewards", token_rewards)
    require_finite("values", values)
    m = as_bool_mask("mask", mask)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, token_rewards, zero)
    v = torch.where(m, values, zero)
    adv = torch.zeros_like(v)
    next_v = torch.zeros_like(v[:, 0])
    next_a = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        a_t = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        valid = m[:, t]
        next_v = torch.where(valid, v[:, t], next_v)
        next_a = torch.where(valid, a_t, next_a)
        adv[:, t] = torch.where(valid, a_t, zero)
    return adv, torch.where(m, adv + v, zero)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "gae": gae,
}


def get_advantage_estimator(name: str) -> Callable:
    """The advantage estimator registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("advantage estimator", ADVANTAGE_ESTIMATORS, name)
