"""Colocated SGLang with one pipeline stage: every server TP rank gets its CUDA IPC payload from
the trainer rank on its own GPU (as slime does), not from the node's host rank.

Why: with one sender, every server TP rank of the node copies every bucket out of the host's GPU,
whose links then carry the model once per server TP rank; here each server rank copies from the
GPU it sits on.

A sync, on every rank of every node whose engines take it (``trainer/rollout_supervisor.py``; the
host opens and closes the engines' weight-update sessions around it, agreed by every rank):

1. every rank rebuilds the whole model's buckets from its own replica's TP all-gathers
   (``hf_export.buckets_on_every_rank``): the same buckets, in the same order, on every rank, with
   no communication beyond the gathers the export does anyway;
2. per bucket, each rank flattens it on its GPU and serializes a handle to it
   (``cuda_ipc.flatten_bucket``, ``cuda_ipc.serialize``); the node's host gathers the handles
   over a group of the node's ranks and posts ``/update_weights_from_tensor`` to each of its
   engines at once, server TP rank r getting the handle of the trainer rank on that rank's GPU
   (:func:`payloads_for`: engine at slot s of its node with TP t sits on GPUs s·t … s·t + t − 1);
3. once every engine answered (each server rank has copied from its handle), the host tells the
   node's ranks which engines failed, and every rank frees its flattened bucket.

Needs one trainer rank per GPU of the node (``LOCAL_RANK`` = GPU), which colocated runs have.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.rollout.fleet import run_each
from rlmt_megatron.rollout.weight_sync.cuda_ipc import flatten_bucket, serialize


def engine_gpus(slot: int, tp: int) -> list[int]:
    """The node-local GPUs of the engine at ``slot`` of its node with TP ``tp``, in server TP rank order."""
    return list(range(slot * tp, (slot + 1) * tp))


def payloads_for(gpus: Sequence[int], by_gpu: Mapping[int, str]) -> list[str]:
    """``serialized_named_tensors`` for an engine on ``gpus``: the payload of the trainer rank on
    each of its GPUs, in server TP rank order."""
    missing = [g for g in gpus if g not in by_gpu]
    if missing:
        raise ValueError(f"no trainer rank on GPU(s) {missing} of the node to feed the engine's TP ranks there")
    return [by_gpu[g] for g in gpus]


class NodeFeeds:
    """One node's part of a sync: ``group`` holds the node's ``ranks`` (global ranks, the first the
    host's, each rank's node-local GPU in ``gpu_of``); ``gpus``: each of the host's engines' GPUs.
    ``device``: where this rank's flattened buckets live (its GPU; ``cpu`` in the CPU tests)."""

    def __init__(self, group, ranks: Sequence[int], host: int, gpu_of: Mapping[int, int],
                 gpus: Mapping[int, list[int]], device: Optional[torch.device | str] = None):
        self.group, self.ranks, self.host = group, list(ranks), host
        self.gpu_of, self.gpus = dict(gpu_of), dict(gpus)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def push(self, stream: Iterable[Bucket], version: int, engines: Mapping[int, object]) -> dict[int, str]:
        """Deliver every bucket of ``stream`` to ``engines`` (the host's, inside open sessions;
        empty elsewhere). Every rank of the node calls it and reads the stream to its end; returns,
        on every rank of the node, the engines that failed and why (they get no further bucket)."""
        failed: dict[int, str] = {}
        me = dist.get_rank()
        for index, bucket in enumerate(stream):
            flat, metadata = flatten_bucket(bucket, self.device)
            mine = serialize({"flattened_tensor": flat, "metadata": metadata})
            got = [None] * len(self.ranks) if me == self.host else None
            dist.gather_object(mine, got, dst=self.host, group=self.group)
            if me == self.host:
                by_gpu = {self.gpu_of[r]: payload for r, payload in zip(self.ranks, got)}
                jobs = {m: functools.partial(engine.send_tensor_bucket, payloads_for(self.gpus[m], by_gpu), version, index)
                        for m, engine in engines.items() if m not in failed}
                if jobs:
                    failed.update({m: o.error for m, o in run_each(jobs).items() if o.error is not None})
            box = [failed]
            dist.broadcast_object_list(box, src=self.host, group=self.group)  # every server rank has copied
            failed = box[0]
            del flat, mine, got
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()
        return failed


def node_feeds(hosts, tp: int, count: int) -> Optional[NodeFeeds]:
    """This node's :class:`NodeFeeds` for ``count`` engines of TP ``tp`` placed as ``hosts``
    (``trainer/engine_hosts.EngineHosts``), or None when a single process runs or an engine GPU
    has no trainer rank (every engine then takes its payloads from its host rank's GPU).
    Collective (creates the node groups)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    by_node: dict[int, list[int]] = {}
    for rank, node in enumerate(hosts.rank_node):
        by_node.setdefault(node, []).append(rank)
    gpus = {m: engine_gpus(hosts.slot[m], tp) for m in range(count)}
    lacking = [m for m in gpus if not set(gpus[m]) <= {hosts.rank_gpu[x] for x in by_node[hosts.node[m]]}]
    if lacking:
        if dist.get_rank() == 0:
            print(f"note: rollout engine(s) {lacking} sit on GPUs without a trainer rank: every engine takes its "
                  "weights from its node's host rank", file=sys.stderr, flush=True)
        return None
    group, _ = dist.new_subgroups_by_enumeration([by_node[n] for n in sorted(by_node)])
    node = hosts.rank_node[dist.get_rank()]
    ranks = by_node[node]
    host = next((hosts.host[m] for m in range(count) if hosts.node[m] == node), ranks[0])
    return NodeFeeds(group, ranks, host, {x: hosts.rank_gpu[x] for x in ranks},
                     {m: gpus[m] for m in hosts.members_of(host)})
