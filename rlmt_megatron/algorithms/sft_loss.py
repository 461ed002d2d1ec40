"""Supervised fine-tuning loss, per token."""

from __future__ import annotations

from typing import Callable

import torch

from .checks import as_bool_mask, lookup, require_same_shape


def nll(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked negative log-likelihood ``-logp[b, t]`` on trained (assistant) tokens, 0 elsewhere.

    ``logp`` holds the log-probabilities of the target tokens; aggregate with ``aggregation``
    (``token_mean`` gives the usual SFT cross-entropy).
    """
    require_same_shape("logp", logp, mask=mask)
    m = as_bool_mask("mask", mask)
    return torch.where(m, -logp, torch.zeros((), dtype=logp.dtype, device=logp.device))


SFT_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"nll": nll}


def get_sft_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The SFT loss registered as ``name`` (ValueError listing valid names otherwise)."""
    return lookup("SFT loss", SFT_LOSSES, name)
