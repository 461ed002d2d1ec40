"""The few collectives the RL loop needs beyond Megatron's: sharding lists over data-parallel
ranks, gathering results back, and broadcasting rank 0's rollouts.

Every rank of one data-parallel replica (its TP and PP ranks) gets the same shard, so Megatron's
forward/backward inside the replica sees consistent inputs.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def device_tensors_device() -> torch.device:
    """Where tensors that should travel over NCCL live: this rank's GPU with CUDA, else the CPU
    (gloo). Small CPU tensors may always be used: the world has a gloo backend beside NCCL."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Logical OR of ``flag`` over the world, on every rank. Collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device_tensors_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def dp_rank_and_size() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


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


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
