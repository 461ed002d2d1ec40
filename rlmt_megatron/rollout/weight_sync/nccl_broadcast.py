"""Trainer side of SGLang's distributed weight update: one process group, tensors broadcast from rank 0.

Protocol (SGLang 0.5.23, ``sglang/srt/model_executor/model_runner_components/weight_updater.py``
and ``sglang/srt/utils/common.py::init_custom_process_group``):

* ``/init_weights_update_group`` makes each server TP rank call ``init_custom_process_group`` with
  ``init_method=tcp://master_address:master_port``, ``rank = rank_offset + tp_rank``,
  ``world_size``, ``group_name`` and ``backend`` (default ``"nccl"``). The trainer's sender is
  rank 0 of that group (and, being rank 0 of the TCP rendezvous, hosts the TCP store), so
  ``rank_offset = 1`` and ``world_size = 1 + server TP size`` for one server.
  ``init_custom_process_group`` wraps the rendezvous store in ``PrefixStore(group_name, store)``
  and builds the group with torch's ``_new_process_group_helper`` outside the default world,
  mapping group ranks to themselves. This module creates the trainer's side the same way, except
  that it builds the rendezvous ``TCPStore`` itself (rank 0 hosts it), because torch's tcp
  rendezvous makes every rank a store client when run under torchrun.
* ``/update_weights_from_distributed`` (names, dtypes, shapes) makes each server rank allocate
  ``torch.empty(shape, dtype=getattr(torch, dtype))`` per name and join
  ``torch.distributed.broadcast(weight, src=0, group=group, async_op=True)`` in name order, then
  wait for all handles and load the bucket. The sender therefore broadcasts every tensor of the
  bucket from rank 0, one by one, in the order of the names it sent.

``receive_bucket`` / ``receive_state_dict`` emulate the server's receiving side (used by tests).
"""

from __future__ import annotations

import datetime
import inspect
import threading
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from rlmt_megatron.rollout.engine import Bucket, EngineError
from rlmt_megatron.rollout.weight_sync.interfaces import WeightTransport

DEFAULT_GROUP_NAME = "weight_update_group"


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: Optional[datetime.timedelta] = None):
    """A process group outside the default world, created as SGLang's ``init_custom_process_group`` does."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    default_pg_timeout, rendezvous)

    timeout = timeout or default_pg_timeout
    if init_method.startswith("tcp://"):
        # What ``rendezvous("tcp://...")`` builds, minus its torchrun special case: under torchrun
        # (TORCHELASTIC_USE_AGENT_STORE) it would make every rank a client of a store nobody hosts.
        host, port = init_method[len("tcp://"):].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world_size, is_master=(rank == 0), timeout=timeout)
    else:
        store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    params = inspect.signature(_new_process_group_helper).parameters
    options_kw = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      **{options_kw: None}, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class BroadcastSender:
    """Rank 0 of the weight-update group: the trainer rank that holds the exported buckets."""

    def __init__(self, master_address: str, master_port: int, world_size: int, backend: str = "nccl",
                 group_name: str = DEFAULT_GROUP_NAME, timeout_s: float = 600.0, device: Optional[str] = None):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight-update backend must be nccl or gloo, not {backend!r}")
        self.master_address, self.master_port = master_address, int(master_port)
        self.world_size, self.backend, self.group_name = int(world_size), backend, group_name
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.group = None

    def join(self) -> None:
        try:
            self.group = init_custom_process_group(self.backend, f"tcp://{self.master_address}:{self.master_port}",
                                                   self.world_size, 0, self.group_name, self.timeout)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"weight-update group {self.group_name} at {self.master_address}:{self.master_port} "
                              f"(world {self.world_size}, {self.backend}): cannot join as rank 0 ({e})") from None

    def broadcast_bucket(self, bucket: Bucket) -> None:
        """Broadcast every tensor of ``bucket`` from rank 0, in bucket order (= the request's names)."""
        if self.group is None:
            raise EngineError(f"weight-update group {self.group_name}: broadcast before join")
        handles = []
        keep = []
        for _, tensor in bucket:
            t = tensor.detach().to(self.device).contiguous()
            keep.append(t)
            handles.append(dist.broadcast(t, src=0, group=self.group, async_op=True))
        for h in handles:
            h.wait()

    def destroy(self) -> None:
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


class NCCLBroadcastTransport(WeightTransport):
    """Push weights to an ``SGLangHTTPEngine`` through its weight-update group.

    ``connect()`` asks the server to join (HTTP, in a thread) while this process joins as rank 0;
    ``push`` drives the engine's ``update_weights``, which broadcasts each bucket with this sender.
    ``session=False``: ``push`` sends the buckets only (``send_buckets``), into a weight-update
    session that another rank holds open (``stage_groups.py``).
    """

    def __init__(self, engine, master_address: str, master_port: int, engine_world_size: int,
                 backend: str = "nccl", timeout_s: float = 600.0, device: Optional[str] = None,
                 session: bool = True):
        self.engine = engine
        self.session = session
        self.sender = BroadcastSender(master_address, master_port, 1 + int(engine_world_size), backend,
                                      engine.group_name, timeout_s, device)

    def connect(self) -> None:
        s = self.sender
        box: dict = {}

        def ask():
            try:
                self.engine.init_weights_update_group(s.master_address, s.master_port, 1, s.world_size, s.backend)
            except BaseException as e:  # noqa: BLE001
                box["error"] = e

        thread = threading.Thread(target=ask, name="sglang-init-group", daemon=True)
        thread.start()
        try:
            s.join()
        finally:
            thread.join(timeout=s.timeout.total_seconds() + 5)
        if "error" in box:
            raise box["error"]
        if thread.is_alive():
            raise EngineError(f"{self.engine.name} engine at {self.engine.url}: init_weights_update_group did not answer")
        self.engine.broadcast = s.broadcast_bucket

    def push(self, buckets: Iterable[Bucket], version: int) -> None:
        if self.engine.broadcast is None:
            self.connect()
        (self.engine.update_weights if self.session else self.engine.send_buckets)(buckets, version)

    def close(self) -> None:
        self.engine.broadcast = None
        self.sender.destroy()


# ------------------------------------------------------------------ receiving side (SGLang emulation)


def join_as_receiver(master_address: str, master_port: int, rank_offset: int, world_size: int,
                     group_name: str = DEFAULT_GROUP_NAME, backend: str = "nccl", tp_rank: int = 0,
                     timeout_s: float = 600.0):
    """What one server TP rank does for ``/init_weights_update_group`` (rank = rank_offset + tp_rank)."""
    return init_custom_process_group(backend, f"tcp://{master_address}:{master_port}", world_size,
                                     rank_offset + tp_rank, group_name, datetime.timedelta(seconds=timeout_s))


def receive_bucket(group, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
                   device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Emulation of SGLang's ``receive_weights_from_distributed``: allocate empty tensors with the
    requested dtype/shape, join one broadcast from rank 0 per name (async, in order), wait for all."""
    weights, handles = [], []
    for name, dtype, shape in zip(names, dtypes, shapes):
        weight = torch.empty(list(shape), dtype=getattr(torch, dtype), device=device)
        handles.append(dist.broadcast(weight, src=0, group=group, async_op=True))
        weights.append((name, weight))
    for h in handles:
        h.wait()
    return weights


def receive_state_dict(group, requests: Iterable[dict], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Collect every bucket of a sync (``UpdateWeightsFromDistributedReqInput`` bodies) into one dict."""
    out: dict[str, torch.Tensor] = {}
    for req in requests:
        for name, t in receive_bucket(group, req["names"], req["dtypes"], req["shapes"], device):
            if name in out:
                raise EngineError(f"weight sync sent '{name}' twice")
            out[name] = t
    return out
