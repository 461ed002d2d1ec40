"""Reward shaping on the response itself (not on what the reward model says about it).

``overlong_penalty``: DAPO's soft overlong punishment (Yu et al., 2025, eq. 13; verl's
``overlong_buffer``). With the generation limit ``max_len`` and a buffer of ``buffer`` tokens
before it, a response of ``L`` tokens gets

    0                                   if L <= max_len - buffer
    factor * ((max_len - buffer) - L) / buffer   otherwise (down to -factor at L = max_len)

added to its reward: answers that run into the limit are pushed back gradually instead of being
cut off (or scored as if complete) without a signal.
"""

from __future__ import annotations

import torch

from .checks import require_ndim


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """The penalty (<= 0) for each response length in ``lengths`` ([N], integers)."""
    require_ndim("lengths", lengths, 1)
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in (0, max_len={max_len}], got {buffer}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}")
    if bool((lengths < 0).any()) or bool((lengths > max_len).any()):
        raise ValueError(f"response lengths must be in [0, {max_len}], got {lengths.tolist()}")
    exceed = lengths.to(torch.float64) - (max_len - buffer)
    return torch.clamp(-exceed / buffer * factor, max=0.0)
