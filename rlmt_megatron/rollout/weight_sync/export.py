"""Bucketed export of HF-named tensors from any TP x PP layout, delivered to one rank.

``iter_hf_buckets`` walks this rank's parameters (TP all-gather, QKV and gate/up split back into
HF names, vocab padding stripped, dtype cast; see ``checkpoint/hf_export.py``) and groups the
full tensors of each pipeline stage's sender into buckets of at most ``bucket_bytes`` (a tensor
larger than the budget travels alone). ``buckets_at`` brings every stage's buckets to one
destination rank, stage by stage, so the destination holds at most one bucket beyond what it
has already consumed: peak extra memory is bounded by the bucket size, not the model size.

Both are collective: every rank of the model must drive the iterator to the end (non-receiving
ranks get nothing but take part in the gathers and sends).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_export import export_dtype, iter_hf_tensors
from rlmt_megatron.models.builder import BuiltModel

Bucket = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 * 2**20


def iter_hf_buckets(built: BuiltModel, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Buckets of (HF name, full tensor) on each stage's sender rank (TP 0, DP 0)."""
    bucket: Bucket = []
    size = 0
    for name, tensor in iter_hf_tensors(built, dtype or export_dtype(built)):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def buckets_at(built: BuiltModel, dst: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Every stage's buckets, yielded on global rank ``dst`` only, in pipeline-stage order."""
    from megatron.core import parallel_state

    rank = dist.get_rank() if dist.is_initialized() else 0
    local = iter_hf_buckets(built, bucket_bytes, dtype)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield from local
        return
    is_sender = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    # Who sends, in stage order: (pp rank, global rank) of every sender.
    senders: list = [None] * dist.get_world_size()
    dist.all_gather_object(senders, (parallel_state.get_pipeline_model_parallel_rank(), rank) if is_sender else None)
    for _, src in sorted(s for s in senders if s is not None):
        if src == rank == dst:
            yield from local
        elif rank == src:
            for bucket in local:
                dist.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in bucket]], dst)
                for _, t in bucket:
                    dist.send(t.contiguous(), dst)
            dist.send_object_list([None], dst)  # end of this stage
        elif rank == dst:
            while True:
                box = [None]
                dist.recv_object_list(box, src)
                if box[0] is None:
                    break
                bucket = []
                for name, shape, dt in box[0]:
                    buf = torch.empty(shape, dtype=dt)
                    dist.recv(buf, src)
                    bucket.append((name, buf))
                yield bucket
    if rank != dst and not is_sender:
        for _ in local:  # take part in the TP gathers of this rank's stage
            pass
