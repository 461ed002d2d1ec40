"""Spread input rows over data-parallel ranks and collect the results in input order."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def my_share(items: list) -> list[tuple[int, Any]]:
    """(index, item) pairs this data-parallel rank handles (round robin)."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    return [(i, x) for i, x in enumerate(items) if i % dp == rank]


def gather_to_rank0(results: list[tuple[int, Any]]) -> list[Any] | None:
    """All ranks' (index, result) pairs, merged and ordered, on global rank 0 (None elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [r for _, r in sorted(results, key=lambda p: p[0])]
    box: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results, box, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = dict(pair for part in box for pair in part)
    return [merged[i] for i in sorted(merged)]
