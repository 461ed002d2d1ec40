"""KL coefficient controllers: a fixed coefficient, or the adaptive controller of Ziegler et al.
(2019, "Fine-Tuning Language Models from Human Preferences"), as verl's ``AdaptiveKLController``.

The adaptive controller moves the coefficient towards a target KL: after each batch of ``n``
sequences whose measured KL is ``kl``,

    error = clip(kl / target - 1, -0.2, 0.2)
    coef <- coef * (1 + error * n / horizon)

so a KL above the target raises the penalty and one below lowers it, by at most 20% of
``n / horizon`` per batch. ``kl`` is the batch's mean over sequences of each sequence's mean
per-token KL (verl's ``current_kl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class KLController:
    """``coef``: the coefficient in use; ``target``/``horizon``: None for a fixed coefficient."""

    coef: float
    target: float | None = None
    horizon: float | None = None

    def __post_init__(self):
        if not (math.isfinite(self.coef) and self.coef >= 0):
            raise ValueError(f"KL coefficient must be finite and >= 0, got {self.coef}")
        if (self.target is None) != (self.horizon is None):
            raise ValueError("an adaptive KL controller needs both target and horizon (a fixed one neither)")
        if self.target is not None and not (self.target > 0 and self.horizon > 0):
            raise ValueError(f"target and horizon must be > 0, got target={self.target}, horizon={self.horizon}")

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, n: int) -> float:
        """Account for a batch of ``n`` sequences with measured ``kl``; returns the new coefficient.
        A fixed controller, or a non-finite ``kl`` (no reference this step), leaves it as it is."""
        if self.adaptive and math.isfinite(kl) and n > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n / self.horizon
        return self.coef
