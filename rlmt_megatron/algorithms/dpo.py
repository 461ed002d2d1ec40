"""Direct Preference Optimisation loss, per preference pair."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .checks import lookup, require_finite, require_ndim, require_nonempty, require_same_shape

DPOLoss = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def sigmoid_dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: ``(losses [P], chosen_rewards [P], rejected_rewards [P])``.

    Inputs are per-pair sums of response-token logprobs. With
    ``z = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``::

        loss = -(1 - eps) * log sigmoid(beta * z) - eps * log sigmoid(-beta * z)

    (``eps = label_smoothing``: conservative DPO, assuming labels flip with probability eps).
    ``F.logsigmoid`` keeps large |beta z| finite. ``reference_free=True`` sets both reference
    terms to 0. Implicit rewards ``beta * (policy - ref)`` are returned detached, for metrics.
    """
    require_ndim("policy_chosen", policy_chosen, 1)
    require_nonempty("policy_chosen", policy_chosen)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if reference_free:
        ref_chosen = ref_rejected = torch.zeros_like(policy_chosen)
    elif ref_chosen is None or ref_rejected is None:
        raise ValueError("ref_chosen and ref_rejected are required unless reference_free=True")
    tensors = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
               "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
    require_same_shape("policy_chosen", policy_chosen, **tensors)
    for name, t in tensors.items():
        require_finite(name, t)
    chosen = policy_chosen - ref_chosen.detach()
    rejected = policy_rejected - ref_rejected.detach()
    logits = beta * (chosen - rejected)
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen.detach(), beta * rejected.detach()


DPO_LOSSES: dict[str, DPOLoss] = {"sigmoid": sigmoid_dpo}


def get_dpo_loss(name: str) -> DPOLoss:
    """The DPO loss registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("DPO loss", DPO_LOSSES, name)
