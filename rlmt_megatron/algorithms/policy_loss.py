"""Per-token policy-gradient losses and the combined policy objective.

Everything here returns *per-token* tensors [B, T] (0 on masked positions); reducing them to a
scalar is ``aggregation``'s job, so the reduction can use global normalisers and stay
independent of how the batch is split into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import as_bool_mask, lookup, require_finite, require_ndim, require_same_shape
from .kl import LOG_RATIO_CLAMP, get_kl_estimator
from .policy_variants import cispo, gspo, gspo_token

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def ppo_clip(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip_c: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate per token, with asymmetric ("clip-higher") and dual clipping.

    As verl's ``compute_policy_loss``, with ``r = exp(clamp(logp - old_logp, -20, 20))``::

        L1 = -A * r
        L2 = -A * clip(r, 1 - clip_low, 1 + clip_high)
        Lc = max(L1, L2)                                  # standard PPO (pessimistic) bound
        L  = min(Lc, -c * A)  if A < 0 else Lc             # dual clip, c = dual_clip_c > 1

    The dual clip caps the loss of a negative-advantage token at ``c * |A|``: with A < 0 the
    plain PPO loss grows without bound in r, and one stale token could dominate the update.
    ``clip_high > clip_low`` lets low-probability tokens grow more (DAPO), countering entropy
    collapse. ``old_logp`` and ``advantages`` are treated as constants (detached).

    Returns ``(loss [B, T], diagnostics)``; diagnostics (detached, 0 on padding) are
    ``ratio``, ``clipped`` (1.0 where L2 > L1) and ``dual_clipped`` (1.0 where A < 0 and Lc > c|A|).
    """
    require_ndim("logp", logp, 2)
    require_same_shape("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
    require_finite("advantages", advantages)
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (or None to disable), got {dual_clip_c}")
    m = as_bool_mask("mask", mask)
    adv = advantages.detach()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)

    log_ratio = torch.where(m, logp - old_logp.detach(), zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss1, loss2)
    clipped = (loss2 > loss1) & m
    dual_clipped = torch.zeros_like(m)
    if dual_clip_c is not None:
        loss3 = -adv * dual_clip_c
        negative = adv < 0
        dual_clipped = negative & (loss > loss3) & m
        loss = torch.where(negative, torch.minimum(loss, loss3), loss)
    diagnostics = {
        "ratio": torch.where(m, ratio.detach(), zero),
        "clipped": clipped.to(logp.dtype),
        "dual_clipped": dual_clipped.to(logp.dtype),
    }
    return torch.where(m, loss, zero), diagnostics


POLICY_LOSSES: dict[str, PolicyLoss] = {"ppo_clip": ppo_clip, "gspo": gspo, "gspo_token": gspo_token, "cispo": cispo}


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("policy loss", POLICY_LOSSES, name)


def kl_loss_term(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL penalty ``KL_est(logp, ref_logp)`` (GRPO's "KL in loss"); gradient flows to ``logp`` only."""
    return get_kl_estimator(estimator)(logp, ref_logp.detach())


def entropy_bonus(entropy: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token loss term ``-coef * entropy``: minimising it raises entropy (exploration)."""
    return -coef * entropy


@dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of ``policy_objective``. ``loss``: a ``POLICY_LOSSES`` name (``clip_low``/``clip_high``
    are its clip range; ``dual_clip_c`` applies to ``ppo_clip`` only). ``kl_in_loss``: add
    ``kl_coef * KL`` to the loss (GRPO style); otherwise KL belongs in the reward
    (``fold_kl_into_rewards``, PPO style)."""

    loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float | None = 3.0
    kl_in_loss: bool = False
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0


def policy_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token total loss ``w * pg + kl_coef * KL [if kl_in_loss] - entropy_coef * entropy``, 0 on padding.

    ``is_weight`` (optional, [B, T], detached): the rollout-correction weight ``w`` of each token
    (``rollout_correction``), applied to the policy-gradient term only, as verl applies its
    ``rollout_is_weights``. Returns ``(total [B, T], components)``: ``pg_loss`` (weighted) plus
    the policy loss's diagnostics, and, when the inputs are given, the raw per-token ``kl`` and
    ``entropy`` (unscaled, for metrics; detached unless they enter the loss).
    """
    clip = {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high}
    if cfg.loss == "ppo_clip":
        clip["dual_clip_c"] = cfg.dual_clip_c
    pg, components = get_policy_loss(cfg.loss)(logp, old_logp, advantages, mask, **clip)
    m = as_bool_mask("mask", mask)
    zero = torch.zeros((), dtype=pg.dtype, device=pg.device)
    if is_weight is not None:
        require_same_shape("logp", logp, is_weight=is_weight)
        pg = torch.where(m, pg * is_weight.detach(), zero)
    components = {"pg_loss": pg, **components}
    total = pg
    if cfg.kl_in_loss and ref_logp is None:
        raise ValueError("cfg.kl_in_loss is set but ref_logp is None")
    if ref_logp is not None:
        require_same_shape("logp", logp, ref_logp=ref_logp)
        kl = torch.where(m, kl_loss_term(logp, ref_logp, cfg.kl_estimator), zero)
        if cfg.kl_in_loss:
            total = total + cfg.kl_coef * kl
        components["kl"] = kl if cfg.kl_in_loss else kl.detach()
    if cfg.entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"cfg.entropy_coef={cfg.entropy_coef} but entropy is None")
    if entropy is not None:
        require_same_shape("logp", logp, entropy=entropy)
        ent = torch.where(m, entropy, zero)
        if cfg.entropy_coef != 0.0:
            total = total + entropy_bonus(ent, cfg.entropy_coef)
        components["entropy"] = ent if cfg.entropy_coef != 0.0 else ent.detach()
    return total, components


def fold_kl_into_rewards(
    token_rewards: torch.Tensor,
    logp_old: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """"KL in reward" (PPO/InstructGPT style): ``r'_t = r_t - coef * KL_est(logp_old_t, ref_logp_t)``, 0 on padding.

    Uses the rollout policy's logprobs, so the penalty is a fixed part of the return (no
    gradient); GAE/REINFORCE then propagate it to earlier tokens.
    """
    require_ndim("token_rewards", token_rewards, 2)
    require_same_shape("token_rewards", token_rewards, logp_old=logp_old, ref_logp=ref_logp, mask=mask)
    require_finite("token_rewards", token_rewards)
    m = as_bool_mask("mask", mask)
    kl = get_kl_estimator(estimator)(logp_old.detach(), ref_logp.detach())
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    return torch.where(m, token_rewards - coef * kl, zero)
