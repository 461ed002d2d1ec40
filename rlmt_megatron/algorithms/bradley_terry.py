"""Bradley–Terry reward-model loss, per preference pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import require_finite, require_ndim, require_nonempty, require_same_shape


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``-log sigmoid(s_chosen - s_rejected - margin)`` per pair: the negative log-likelihood of
    the preference under the Bradley–Terry model (the objective Skywork-style RMs are trained with)."""
    require_ndim("chosen", chosen, 1)
    require_nonempty("chosen", chosen)
    require_same_shape("chosen", chosen, rejected=rejected)
    require_finite("chosen", chosen)
    require_finite("rejected", rejected)
    return -F.logsigmoid(chosen - rejected - margin)
