"""Critic (value-function) loss for PPO, per token."""

from __future__ import annotations

from typing import Callable

import torch

from .checks import as_bool_mask, lookup, require_finite, require_ndim, require_same_shape

ValueLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)`` per token, 0 on padding.

    The clipped term keeps the critic from moving more than ``eps`` from its rollout-time
    prediction in one update (pessimistic, like PPO's policy clip). ``clip_eps=None``: plain
    ``0.5 * (V - R)^2``. Returns ``(loss [B, T], {"clipped": 1.0 where the clipped term is larger})``.
    """
    require_ndim("values", values, 2)
    require_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    require_finite("returns", returns)
    require_finite("old_values", old_values)
    if clip_eps is not None and clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0 or None, got {clip_eps}")
    m = as_bool_mask("mask", mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    returns, old_values = returns.detach(), old_values.detach()
    unclipped = (values - returns).square()
    if clip_eps is None:
        loss, clipped = unclipped, torch.zeros_like(m)
    else:
        v_clip = torch.maximum(torch.minimum(values, old_values + clip_eps), old_values - clip_eps)
        clipped_sq = (v_clip - returns).square()
        loss, clipped = torch.maximum(unclipped, clipped_sq), (clipped_sq > unclipped) & m
    return torch.where(m, 0.5 * loss, zero), {"clipped": clipped.to(values.dtype)}


VALUE_LOSSES: dict[str, ValueLoss] = {"clipped_mse": clipped_value_loss}


def get_value_loss(name: str) -> ValueLoss:
    """The value loss registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("value loss", VALUE_LOSSES, name)
