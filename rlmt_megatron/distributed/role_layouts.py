"""Several Megatron parallel layouts in one world: a role (the reward model) with its own TP/PP.

Megatron-Core keeps its process groups in module globals of ``parallel_state``, and the rest of
Megatron (and this package) asks those globals for ranks and groups at run time. Models capture
their groups when they are built. So a second layout is made by creating its groups once at
start-up (collective over the world, like the first), keeping a snapshot of every
``parallel_state`` global for each layout, and swapping the snapshot in around the phases that
run the role (``with layouts.active("reward"): ...``). Groups are never destroyed while swapped
out (``destroy_model_parallel`` would also destroy the gloo DP groups the optimizer uses).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed.layout_checks import check_world_size


def _state_names(ps) -> list[str]:
    return [n for n in vars(ps) if n.startswith("_") and n.isupper() and not n.startswith("__")]


class RoleLayouts:
    """The layout initialised by ``bootstrap.initialize`` is "default"; ``add`` makes more."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps
        self._snapshots: dict[str, dict] = {"default": self._snapshot()}
        self._active = "default"

    def _snapshot(self) -> dict:
        return {n: getattr(self._ps, n) for n in _state_names(self._ps)}

    def _restore(self, snap: dict) -> None:
        for n, v in snap.items():
            setattr(self._ps, n, v)

    def add(self, name: str, parallel: ParallelConfig, timeout_minutes: float = 30.0) -> None:
        """Create the groups of ``parallel`` (collective over the world)."""
        import torch.distributed as dist

        if name in self._snapshots:
            raise ValueError(f"layout {name!r} exists already")
        check_world_size(parallel, dist.get_world_size())
        current = self._snapshot()
        # Back to a pristine parallel_state (every group None) without destroying anything.
        self._restore({n: _pristine(n, v) for n, v in current.items()})
        try:
            self._ps.initialize_model_parallel(
                tensor_model_parallel_size=parallel.tp,
                pipeline_model_parallel_size=parallel.pp,
                virtual_pipeline_model_parallel_size=parallel.vpp,
                distributed_timeout_minutes=timeout_minutes,  # int() made 0.5 zero (as in bootstrap)
            )
            snap = self._snapshot()
            for n in _SHARED:  # one scratch buffer for all layouts (Megatron made a fresh one)
                if current.get(n) is not None:
                    snap[n] = current[n]
            self._snapshots[name] = snap
        finally:
            self._restore(current)

    @contextlib.contextmanager
    def active(self, name: str) -> Iterator[None]:
        if name not in self._snapshots:
            raise KeyError(f"no parallel layout {name!r} (have {sorted(self._snapshots)})")
        previous = self._active
        saved = self._snapshot()
        self._restore(self._snapshots[name])
        self._active = name
        try:
            yield
        finally:
            self._snapshots[name] = self._snapshot()
            self._restore(saved)
            self._active = previous


_SHARED = ("_GLOBAL_MEMORY_BUFFER", "_GLOBAL_SYMMETRIC_MEMORY_BUFFER")  # scratch memory, not layout state


def _pristine(name: str, value):
    """The import-time value of a parallel_state global (None, or {} for the dict-valued ones)."""
    return {} if isinstance(value, dict) else None
