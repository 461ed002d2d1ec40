"""Per-token KL estimators between the policy and the reference model (Schulman, "Approximating KL").

Inputs are log-probabilities of the *sampled* tokens, ``logp`` (policy, differentiable) and
``ref_logp`` (reference), same shape. With samples drawn from the policy, each estimator's mean
approximates KL(policy || reference). All are exactly 0 where ``logp == ref_logp``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .checks import lookup, require_same_shape

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k1 = logp - ref_logp``: unbiased but high variance, can be negative per token."""
    require_same_shape("logp", logp, ref_logp=ref_logp)
    return logp - ref_logp


def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k2 = 0.5 * (logp - ref_logp)^2``: non-negative, low variance, biased (exact to 2nd order)."""
    require_same_shape("logp", logp, ref_logp=ref_logp)
    return 0.5 * (logp - ref_logp).square()


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(d) - d - 1`` with ``d = clamp(ref_logp - logp, -20, 20)``; result clamped to [-10, 10].

    Unbiased and non-negative ("low_var_kl"). The clamps (as in verl) keep exp() from overflowing
    and bound a single runaway token; where a clamp is active the gradient is 0.
    """
    require_same_shape("logp", logp, ref_logp=ref_logp)
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(-K3_CLAMP, K3_CLAMP)


def straight_through(estimator: KLEstimator) -> KLEstimator:
    """``estimator``'s value with ``k2``'s gradient (verl's ``k1+`` / ``k3+``): k1 and k3 estimate
    the KL's value without bias, but their expected gradient is not the KL's gradient; k2's is
    (to first order in the log ratio). ``value + (k2 - k2.detach())``, so the forward result is
    the estimator's exactly and the backward pass is k2's: ``logp - ref_logp`` per token."""

    def combined(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        grad = k2(logp, ref_logp)
        return estimator(logp, ref_logp).detach() + (grad - grad.detach())

    combined.__name__ = f"{estimator.__name__}_straight_through"
    return combined


k1_plus = straight_through(k1)
k3_plus = straight_through(k3)

KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": k1, "k2": k2, "k3": k3, "low_var_kl": k3,
                                         "k1+": k1_plus, "k3+": k3_plus, "low_var_kl+": k3_plus}


def get_kl_estimator(name: str) -> KLEstimator:
    """The KL estimator registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("KL estimator", KL_ESTIMATORS, name)
