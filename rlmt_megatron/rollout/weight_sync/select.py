"""Which weight transport a run uses, from the engine kind and where the engine runs.

``TRANSPORTS`` is the whole policy: for each (engine kind, placement) pair the transports that
can work, the first being the ``auto`` choice. A pair that is not in the table cannot exist.

* hf -- transformers inside the trainer's process: the buckets are handed over in memory.
  It cannot be disaggregated (it has no process of its own).
* vllm -- a ``SubprocessEngine`` on the trainer's node (on the trainer's GPUs or its own): its
  ``update_weights`` receives the buckets through the pipe, so "in_process" means "through the
  engine's own update_weights".
* sglang colocated -- the server shares the trainer's GPUs: CUDA IPC handles, no copy through the
  host. NCCL is impossible there (NCCL refuses two ranks on one GPU).
* sglang disaggregated -- the server has its own GPUs, maybe its own nodes: NCCL broadcast from
  the trainer. CUDA IPC cannot reach another node.
* disk works for every pair (slowest; the folder must be visible to the engine).
"""

from __future__ import annotations

import os
import socket
from typing import Literal, Optional

from pydantic import Field, PositiveFloat, PositiveInt

from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.distributed.collectives import free_port
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.weight_sync.interfaces import InProcessTransport, WeightTransport

EngineKind = Literal["hf", "vllm", "sglang"]
Placement = Literal["colocated", "disaggregated"]
TransportName = Literal["in_process", "cuda_ipc", "nccl", "disk"]

# (engine kind, placement) -> allowed transports; the first one is what "auto" picks.
TRANSPORTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("hf", "colocated"): ("in_process", "disk"),
    ("vllm", "colocated"): ("in_process", "disk"),
    ("vllm", "disaggregated"): ("in_process", "disk"),
    ("sglang", "colocated"): ("cuda_ipc", "disk"),
    ("sglang", "disaggregated"): ("nccl", "disk"),
}
# Transports whose receiving end is a network group any trainer rank can join: with them each
# pipeline stage's owner sends its own layers to the engines (stage_groups.py). The others take
# every stage through the rank that drives the engine (hf_export.buckets_for): a pipe, CUDA IPC
# on one GPU, or one folder.
SENT_BY_STAGE = frozenset({"nccl"})
# Transports whose payload is a handle into one GPU's memory: with one pipeline stage (every
# rank rebuilds the whole model from its TP all-gather) each server TP rank is fed from the
# trainer rank on its own GPU (same_gpu_ipc.py), not from the engine's host rank.
FED_FROM_EACH_GPU = frozenset({"cuda_ipc"})
# Transports an SGLang server with data-parallel replicas (``--dp-size`` > 1) accepts: 0.5.23's
# ``update_weights_from_tensor`` and ``update_weights_from_distributed`` (and the group routes)
# assert ``dp_size == 1`` (``srt/managers/tokenizer_control_mixin.py``); loading from disk does not.
SGLANG_DP_TRANSPORTS = frozenset({"disk"})
_WHY_NOT = {
    ("hf", "disaggregated"): "the hf engine runs inside the trainer's process, so it is always colocated",
}


class WeightSyncConfig(StrictModel):
    """How the trainer's weights reach the rollout engine after every update."""

    transport: Literal["auto", "in_process", "cuda_ipc", "nccl", "disk"] = Field(
        "auto", description="auto: chosen from the engine kind and placement (see weight_sync/select.py)")
    bucket_mb: PositiveInt = Field(512, description="export bucket size in MiB (peak extra memory per sync)")
    checksum: bool = Field(False, description="verify the engine holds exactly the trainer's weights after a sync")
    keep_versions: PositiveInt = Field(2, description="disk: complete versions kept on disk")
    disk_dir: Optional[str] = Field(None, description="disk: folder for the versions (shared with the engine); "
                                    "default <run dir>/weight_sync")
    fp8: Literal["none", "per_tensor", "block"] = Field("none", description="quantize the synced weights to FP8 for "
                                                       "the rollout engine (weight_sync/fp8.py)")
    master_address: Optional[str] = Field(None, description="nccl: an address of the sending rank the SGLang "
                                          "server can reach; default: that rank's host IP")
    master_port: Optional[int] = Field(None, ge=1, le=65535, description="nccl: rendezvous port (engine i of a fleet, "
                                       "pipeline stage s of S: master_port + i*S + s); default: a free one per group")
    nccl_backend: Literal["nccl", "gloo"] = Field("nccl", description="nccl: process-group backend (gloo: CPU tests)")
    timeout_s: PositiveFloat = Field(600.0, description="nccl: longest wait to join the group / for one broadcast")


def resolve_transport(kind: str, placement: str, requested: str = "auto") -> str:
    """The transport for this pair, or an ``RLMTError`` naming the pair and what it allows."""
    pair = (kind, placement)
    allowed = TRANSPORTS.get(pair)
    if allowed is None:
        why = _WHY_NOT.get(pair, "no transport is known for it")
        raise RLMTError(f"rollout engine {kind!r} with placement {placement!r} is impossible: {why}")
    if requested == "auto":
        return allowed[0]
    if requested not in allowed:
        raise RLMTError(f"weight_sync.transport={requested!r} cannot work with engine {kind!r} placed "
                        f"{placement!r}; allowed: {', '.join(allowed)} (auto = {allowed[0]})")
    return requested


def sent_by_stage(config: "WeightSyncConfig", kind: str, placement: str) -> bool:
    """Whether each pipeline stage's owner sends its own layers (see ``SENT_BY_STAGE``)."""
    return resolve_transport(kind, placement, config.transport) in SENT_BY_STAGE


def fed_from_each_gpu(config: "WeightSyncConfig", kind: str, placement: str) -> bool:
    """Whether each server TP rank can take its payload from the trainer rank on its GPU (see
    ``FED_FROM_EACH_GPU``; the caller checks the one pipeline stage)."""
    return resolve_transport(kind, placement, config.transport) in FED_FROM_EACH_GPU


def nccl_rendezvous(config: "WeightSyncConfig", member: Optional[int], stage: int = 0, stages: int = 1) -> tuple[str, int]:
    """Where the weight-update group of engine ``member`` (None: the only one) and pipeline stage
    ``stage`` meets: this host's address (or ``master_address``), and port
    ``master_port + member * stages + stage`` when ``master_port`` is set, else a free one."""
    address = config.master_address or socket.gethostbyname(socket.gethostname())
    port = config.master_port + (member or 0) * stages + stage if config.master_port else free_port()
    return address, port


def make_transport(config: WeightSyncConfig, engine, placement: str, *, engine_tp_size: int = 1,
                   base_dir: Optional[str] = None, disk_dir: Optional[str] = None,
                   member: Optional[int] = None) -> WeightTransport:
    """The transport for ``engine`` (its ``name`` is the kind: hf, vllm, sglang) at ``placement``.

    ``base_dir`` is the HF folder the engine started from (disk: config and tokenizer are copied
    from it); ``disk_dir`` is used when ``config.disk_dir`` is unset. ``member``: the engine's
    index in a fleet of several (None for a single engine). nccl: each member's group has its own
    rendezvous port, ``master_port + member``; disk: each member writes under
    ``<root>/engine_<member>``, since each transport writes, loads and prunes its versions by
    itself (one shared folder would have them replace and delete each other's).
    """
    kind = engine.name
    name = resolve_transport(kind, placement, config.transport)
    if name == "in_process":
        return InProcessTransport(engine)
    if name == "cuda_ipc":
        from rlmt_megatron.rollout.weight_sync.cuda_ipc import CudaIPCTransport

        return CudaIPCTransport(engine, engine_tp_size)
    if name == "nccl":
        from rlmt_megatron.rollout.weight_sync.nccl_broadcast import NCCLBroadcastTransport

        address, port = nccl_rendezvous(config, member)
        return NCCLBroadcastTransport(engine, address, port, engine_tp_size,
                                      backend=config.nccl_backend, timeout_s=config.timeout_s)
    from rlmt_megatron.rollout.weight_sync.disk import DiskTransport

    root = config.disk_dir or disk_dir
    if root is None:
        raise RLMTError("weight_sync.transport=disk needs weight_sync.disk_dir (a folder the engine can read)")
    if member is not None:
        root = os.path.join(root, f"engine_{member}")
    if base_dir is None:
        raise RLMTError("weight_sync.transport=disk needs the engine's base HF folder (config.json, tokenizer)")
    return DiskTransport(engine, root, base_dir, keep_versions=config.keep_versions,
                         bucket_bytes=config.bucket_mb * 2**20)
