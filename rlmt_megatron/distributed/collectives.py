"""The few collectives the project needs beyond Megatron's, each defined once: the world's rank
and size, agreement over ranks (``any_rank``, ``all_ranks_ok``), data-parallel reductions,
sharding lists over data-parallel ranks and gathering them back, and broadcasts from rank 0 or
from the last pipeline stage. Each works unchanged in a process without torch.distributed (a
world of one).

Every rank of one data-parallel replica (its TP and PP ranks) gets the same shard, so Megatron's
forward/backward inside the replica sees consistent inputs.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, TypeVar

import torch
import torch.distributed as dist

from rlmt_megatron.errors import RLMTError

T = TypeVar("T")


def device_tensors_device() -> torch.device:
    """Where tensors that should travel over NCCL live: this rank's GPU with CUDA, else the CPU
    (gloo). Small CPU tensors may always be used: the world has a gloo backend beside NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def free_port() -> int:
    """A TCP port free on every interface of this host now (rendezvous, NCCL groups, test servers)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def any_rank(flag: bool) -> bool:
    """Logical OR of ``flag`` over the world, on every rank. Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device_tensors_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (so that all ranks raise together, none hangs). Collective."""
    return not any_rank(not ok)


_REDUCE_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def dp_all_reduce(values: Sequence[float], op: Literal["sum", "max", "min"] = "sum") -> list[float]:
    """``values`` reduced element-wise over this rank's data-parallel group, in float64, on every
    rank of it. Collective over the DP group."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.is_initialized():
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]), group=group)
    return t.tolist()


def dp_rank_and_size() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


@dataclass(frozen=True)
class StageOwners:
    """Every rank's data-parallel replica and pipeline stage, and the rank that owns each (replica,
    stage): its lowest TP rank 0, where an export's TP gathers collect (``hf_export.buckets_for``)."""

    replica: list[int]
    stage: list[int]
    owner: dict[tuple[int, int], int]

    def owns(self, rank: int) -> bool:
        return self.owner.get((self.replica[rank], self.stage[rank])) == rank


def stage_owners() -> StageOwners:
    """The world's :class:`StageOwners`. Collective."""
    if not dist.is_initialized():
        return StageOwners([0], [0], {(0, 0): 0})
    from megatron.core import parallel_state as ps

    table: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(table, (ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                                   ps.get_tensor_model_parallel_rank() == 0))
    owner: dict[tuple[int, int], int] = {}
    for rank, (replica, stage, tp_first) in enumerate(table):
        if tp_first:
            owner.setdefault((replica, stage), rank)
    return StageOwners([t[0] for t in table], [t[1] for t in table], owner)


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous, balanced split of ``n`` items: rank ``k`` holds ``[k*n//size, (k+1)*n//size)``."""
    return rank * n // size, (rank + 1) * n // size


def dp_shard(items: Sequence[T]) -> list[T]:
    """This DP rank's contiguous share of ``items`` (identical lists on every rank go in)."""
    rank, size = dp_rank_and_size()
    lo, hi = shard_bounds(len(items), rank, size)
    return list(items[lo:hi])


def dp_gather(local: Sequence[T]) -> list[T]:
    """Concatenate every DP rank's list in rank order (the inverse of :func:`dp_shard`)."""
    if not dist.is_initialized():
        return list(local)
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return list(local)
    boxes: list[Any] = [None] * size
    dist.all_gather_object(boxes, list(local), group=parallel_state.get_data_parallel_group())
    return [x for box in boxes for x in box]


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank of the world (pickled; for rollouts and small metadata)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Rank0Failed(RLMTError):
    """Raised on every rank but 0 when rank 0 failed with an error nobody expected (rank 0 raises
    its own, with its traceback)."""


class RankFailed(RLMTError):
    """Raised by :func:`each_rank_reports` on the ranks that did not fail, when another rank failed
    with an error nobody expected (that rank raises its own, with its traceback)."""


def _outcome_of(fn: Callable[[], Any], shared: tuple[type[BaseException], ...]
                ) -> tuple[tuple[str, Any], BaseException | None]:
    """``fn``'s outcome as the agreement protocols send it, and the exception to re-raise here when
    it failed in a way nobody expected."""
    try:
        return ("value", fn()), None
    except shared as e:
        return ("shared", e), None
    except Exception as e:
        return ("fatal", f"{type(e).__name__}: {e}"), e


def each_rank_reports(fn: Callable[[], T], doing: str,
                      shared: tuple[type[BaseException], ...] = ()) -> list[tuple[str, Any]]:
    """Run ``fn`` on every rank; every rank returns every rank's outcome, in rank order. Collective.

    The protocol for "each rank does its part, all agree on what came of it" (each node's first
    rank drives its node's rollout engines), beside :func:`rank0_decides` for one deciding rank:

    * an outcome is ``("value", what fn returned)`` or ``("shared", the exception)`` when ``fn``
      raised one of ``shared``; both must be picklable. The caller combines them, the same way on
      every rank;
    * anything else ends the job on every rank: the failing rank re-raises its own exception, the
      others raise :class:`RankFailed` naming the lowest failing rank, ``doing`` and the error.
    """
    outcome, fatal = _outcome_of(fn, shared)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        outcomes = [outcome]
    else:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
    if fatal is not None:
        raise fatal
    for rank, (kind, payload) in enumerate(outcomes):
        if kind == "fatal":
            raise RankFailed(f"rank {rank} failed while {doing}: {payload}")
    return outcomes


def rank0_decides(fn: Callable[[], T], doing: str, shared: tuple[type[BaseException], ...] = ()) -> T:
    """Run ``fn`` on global rank 0 only; every rank returns its result or raises alike. Collective.

    The one protocol for "rank 0 decides, every rank follows" (the rollout engine lives on rank
    0; the other ranks must not wait forever in a collective rank 0 left):

    * ``fn`` returns: its value (picklable) is broadcast and returned on every rank;
    * ``fn`` raises one of ``shared`` (e.g. ``EngineError``, ``StepAbandoned``): that exception
      (picklable) is raised on every rank, so all take the same branch;
    * anything else: rank 0 re-raises its own exception, the others raise :class:`Rank0Failed`
      naming ``doing`` and the error, so the job ends on every rank instead of hanging.
    """
    outcome, fatal = _outcome_of(fn, shared) if is_rank0() else (None, None)
    kind, payload = broadcast_from_rank0(outcome)
    if fatal is not None:
        raise fatal
    if kind == "shared":
        raise payload
    if kind == "fatal":
        raise Rank0Failed(f"rank 0 failed while {doing}: {payload}")
    return payload


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_last_stage(obj: Any) -> Any:
    """The last pipeline stage's ``obj`` (picklable) on every stage of this pipeline."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(
        box,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return box[0]
