"""Rollout–train mismatch correction: importance weights and masks from the engine's logprobs.

The rollout engine (vLLM, SGLang, bf16/fp8 kernels) samples from ``pi_rollout``, which is not
exactly the trainer's ``pi_old`` (the same weights, recomputed by Megatron): the update is
slightly off-policy even at one update per rollout. Each correction here looks at the per-token
ratio ``rho_t = pi_old(y_t) / pi_rollout(y_t) = exp(old_logp - rollout_logp)`` (log ratio
clamped to [-20, 20]) and returns, per token,

- ``weight`` [B, T]: a constant (no gradient: both logprobs are fixed before the update) that
  multiplies the per-token policy-gradient loss; 0 on padding and on masked tokens;
- ``keep`` [B, T] bool: the tokens that stay in the loss (``mask`` minus the masked ones); the
  caller uses it as the new loss mask, so masked tokens also leave the aggregation's
  denominators (rejection, as verl's and slime's rollout-correction masks do);
- diagnostics: ``ratio`` (the ratio the rule looked at, per token; for ``mis`` the sequence
  ratio on each of its tokens), ``truncated`` (``tis``: tokens whose weight hit the cap) and
  ``masked`` (valid tokens dropped), all detached, 0 on padding.

Modes (registered in ``ROLLOUT_CORRECTIONS``):

- ``tis``: truncated importance sampling, ``weight = min(rho_t, cap)`` (Yao et al. 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl's token-level
  ``rollout_is`` / ``tis_imp_ratio_cap``).
- ``mis``: sequence-level masked importance sampling / rejection: a sequence whose ratio
  ``rho(y)`` lies outside ``[low, high]`` is dropped whole, the others keep weight 1. ``rho(y)``
  is the geometric mean ``exp(mean_t log rho_t)`` (verl's and slime's ``geometric`` rejection
  level: comparable across lengths) or the product ``exp(sum_t log rho_t)`` (their ``sequence``
  level; Liu, Li et al. 2025, "When Speed Kills Stability", seq-level MIS).
- ``icepop``: token-level masking (Ling Team 2025, Ring-1T, "IcePop": ``M(k) = k`` for ``k`` in
  ``[low, high]``, else 0): a token whose ratio lies outside the band is dropped, the others
  are weighted by their ratio.
"""

from __future__ import annotations

from typing import Callable

import torch

from .checks import as_bool_mask, lookup, require_finite, require_ndim, require_same_shape
from .kl import LOG_RATIO_CLAMP

Correction = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


def _token_log_ratio(old_logp, rollout_logp, mask):
    require_ndim("old_logp", old_logp, 2)
    require_same_shape("old_logp", old_logp, rollout_logp=rollout_logp, mask=mask)
    m = as_bool_mask("mask", mask)
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    log_ratio = torch.where(m, old_logp.detach() - rollout_logp.detach(), zero)
    require_finite("old_logp - rollout_logp", log_ratio)
    return log_ratio, m, zero


def _band(low: float, high: float) -> None:
    if not 0.0 <= low <= 1.0 <= high:
        raise ValueError(f"the band [low, high] must contain 1 (0 <= low <= 1 <= high), got [{low}, {high}]")


def tis(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, cap: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance sampling: ``weight_t = min(rho_t, cap)``; nothing is masked."""
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1 (a cap below 1 truncates on-policy tokens), got {cap}")
    log_ratio, m, zero = _token_log_ratio(old_logp, rollout_logp, mask)
    ratio = torch.where(m, torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), zero)
    weight = ratio.clamp(max=cap)
    return weight, m, {"ratio": ratio, "truncated": ((ratio > cap) & m).to(ratio.dtype),
                       "masked": torch.zeros_like(ratio)}


def mis(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    low: float = 0.999,
    high: float = 1.001,
    seq_ratio: str = "geometric_mean",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level masking: rows whose ``rho(y)`` (``seq_ratio``: ``geometric_mean`` or
    ``product``) is outside ``[low, high]`` lose all their tokens; kept tokens weigh 1."""
    _band(low, high)
    log_ratio, m, zero = _token_log_ratio(old_logp, rollout_logp, mask)
    total = log_ratio.sum(dim=-1, keepdim=True)
    if seq_ratio == "geometric_mean":
        total = total / m.sum(dim=-1, keepdim=True).clamp(min=1).to(total.dtype)
    elif seq_ratio != "product":
        raise ValueError(f"seq_ratio must be 'geometric_mean' or 'product', got {seq_ratio!r}")
    ratio = torch.exp(total.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(log_ratio)
    keep = m & (ratio >= low) & (ratio <= high)
    return keep.to(ratio.dtype), keep, {"ratio": torch.where(m, ratio, zero), "truncated": torch.zeros_like(ratio),
                                        "masked": (m & ~keep).to(ratio.dtype)}


def icepop(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, low: float = 0.5, high: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level masking: tokens with ``rho_t`` outside ``[low, high]`` are dropped, the
    others weigh ``rho_t``."""
    _band(low, high)
    log_ratio, m, zero = _token_log_ratio(old_logp, rollout_logp, mask)
    ratio = torch.where(m, torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), zero)
    keep = m & (ratio >= low) & (ratio <= high)
    return torch.where(keep, ratio, zero), keep, {"ratio": ratio, "truncated": torch.zeros_like(ratio),
                                                  "masked": (m & ~keep).to(ratio.dtype)}


ROLLOUT_CORRECTIONS: dict[str, Correction] = {"tis": tis, "mis": mis, "icepop": icepop}


def get_rollout_correction(name: str) -> Correction:
    """The rollout correction registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("rollout correction", ROLLOUT_CORRECTIONS, name)
