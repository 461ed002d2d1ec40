"""Policy losses beside PPO's clipped surrogate: GSPO (sequence-level ratio) and CISPO (clipped,
stop-gradient importance weight).

Same contract as ``policy_loss.ppo_clip``: inputs [B, T] (one sequence per row, right-padded or
not: only ``mask`` says which tokens count), ``old_logp`` and ``advantages`` treated as constants,
and a per-token loss [B, T] (0 on padding) returned with detached diagnostics ``ratio`` and
``clipped``. Reducing to a scalar is ``aggregation``'s job.

- GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071), eqs. 5-7
  (sequence ratio) and 10-11 (GSPO-token); verl ``compute_policy_loss_gspo`` is GSPO-token.
- CISPO: MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
  Attention" (arXiv:2506.13585), eqs. 4-5; verl ``compute_policy_loss_cispo``.
"""

from __future__ import annotations

import torch

from .checks import as_bool_mask, require_finite, require_ndim, require_same_shape
from .kl import LOG_RATIO_CLAMP


def _check(logp, old_logp, advantages, mask, clip_low: float, clip_high: float, lower_bound_optional: bool):
    require_ndim("logp", logp, 2)
    require_same_shape("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    require_finite("advantages", advantages)
    if not (0.0 <= clip_low <= 1.0 if lower_bound_optional else 0.0 <= clip_low < 1.0):
        raise ValueError(f"clip_low must be in [0, 1{']' if lower_bound_optional else ')'}, got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    return as_bool_mask("mask", mask)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, ``(1/|y|) * sum_{valid t} (logp_t - old_logp_t)`` as [B, 1] (0 for a row without
    valid tokens): the log of GSPO's length-normalised sequence ratio ``(pi(y)/pi_old(y))^(1/|y|)``.
    Differentiable in ``logp``."""
    m = as_bool_mask("mask", mask)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    diff = torch.where(m, logp - old_logp.detach(), zero)
    n = m.sum(dim=-1, keepdim=True).clamp(min=1).to(logp.dtype)
    return diff.sum(dim=-1, keepdim=True) / n


def _clipped_surrogate(ratio, adv, clip_low, clip_high, m) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's pessimistic bound on ``ratio`` per token (0 on padding) and the diagnostics."""
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = (loss2 > loss1) & m
    diagnostics = {"ratio": torch.where(m, ratio.detach(), zero), "clipped": clipped.to(ratio.dtype)}
    return torch.where(m, torch.maximum(loss1, loss2), zero), diagnostics


def gspo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: PPO's clipped surrogate on the length-normalised *sequence* ratio.

    ``s_i = exp(clamp(sequence_log_ratio, -20, 20))`` (the geometric mean of the sequence's token
    ratios), and on every valid token of row i::

        L_t = max(-A_t * s_i, -A_t * clip(s_i, 1 - clip_low, 1 + clip_high))

    The gradient flows through ``s_i`` into every token of the sequence, and a clipped sequence
    is clipped as a whole. GSPO has one advantage per sequence (A_t constant over the row: GRPO's
    outcome advantages); with ``seq_mean_token_mean`` aggregation the loss is then exactly the
    paper's ``-(1/G) sum_i min(s_i A_i, clip(s_i) A_i)``. The paper's clip range is tiny
    (3e-4 / 4e-4), since ``s_i`` is a per-token geometric mean. No dual clip.
    """
    m = _check(logp, old_logp, advantages, mask, clip_low, clip_high, False)
    ratio = torch.exp(sequence_log_ratio(logp, old_logp, m).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(logp)
    return _clipped_surrogate(ratio, advantages.detach(), clip_low, clip_high, m)


def gspo_token(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token: GSPO's ratio with a per-token gradient, for per-token advantages (GAE, REINFORCE++).

    ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]`` — numerically ``s_i`` on every token, but its
    gradient is ``s_i * grad log pi(y_t)`` (that token only)::

        L_t = max(-A_t * s_{i,t}, -A_t * clip(s_{i,t}, 1 - clip_low, 1 + clip_high))

    With A constant over each sequence its value and gradient equal ``gspo``'s (paper, eq. 11).
    The log ratio is formed as ``logp - sg(logp) + sg(log s_i)`` (the order verl uses, so the
    value is exactly ``log s_i``), clamped to [-20, 20].
    """
    m = _check(logp, old_logp, advantages, mask, clip_low, clip_high, False)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    seq = sequence_log_ratio(logp, old_logp, m).detach()
    log_ratio = (logp - logp.detach() + seq).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(torch.where(m, log_ratio, zero))
    return _clipped_surrogate(ratio, advantages.detach(), clip_low, clip_high, m)


def cispo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 1.0,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight, per token::

        r_t = exp(clamp(logp_t - old_logp_t, -20, 20))
        L_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t

    Unlike PPO, a token whose ratio leaves the band keeps its gradient (scaled by the bound)
    instead of losing it. ``clip_low = 1`` removes the lower bound (MiniMax-M1 sets epsilon_low
    large and tunes epsilon_high only). The loss *value* is the REINFORCE surrogate
    ``-w A log pi`` (as in the paper and verl), not comparable with ``ppo_clip``'s ``-A r``; the
    gradient ``-w A grad log pi`` is what matters. ``clipped``: tokens whose ratio left the band.
    """
    m = _check(logp, old_logp, advantages, mask, clip_low, clip_high, True)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(m, logp.detach() - old_logp.detach(), zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = -weight * advantages.detach() * logp
    diagnostics = {"ratio": torch.where(m, ratio, zero), "clipped": ((weight != ratio) & m).to(logp.dtype)}
    return torch.where(m, loss, zero), diagnostics
