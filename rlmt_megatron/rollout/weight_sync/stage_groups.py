"""Disaggregated SGLang servers with a pipeline-parallel trainer: each pipeline stage's owner
broadcasts its own layers straight to every engine it feeds, through a weight-update group of its own.

Why: through one rank (every stage sends its layers to the engine's host, which broadcasts them),
the host's link carries the whole model twice and the stages wait for each other. Here each
owner's link carries its own stage once, and the stages' broadcasts run at the same time.

A sync, each step agreed by every rank (``trainer/rollout_supervisor.py``):

1. once per engine start, every stage owner of the data-parallel replica that feeds the engine's
   host joins a group of its own with the server (``/init_weights_update_group``), named
   ``<engine's group>_pp<stage>`` (``rollout/factory.sglang_client``), itself its rank 0, meeting on
   its own host (``select.nccl_rendezvous``: port ``master_port + member * stages + stage`` when
   ``weight_sync.master_port`` is set);
2. the engine's host opens the server's weight-update session (pause, begin);
3. every such stage owner posts ``/update_weights_from_distributed`` for each of its buckets,
   naming its group, and broadcasts them. The server takes one such request at a time (SGLang
   0.5.23's ``FanOutCommunicator`` queues concurrent callers, ``srt/managers/communicator.py``), so
   an owner's broadcast waits until the server reads its request, and the stages never mix;
4. the host closes the session (end, flush, continue) on every engine all stages reached, and
   quietly on the others (their weights are partly new: they are restarted and re-synced).

SGLang keeps one group per name (``model_runner_components/weight_updater.py``:
``_model_update_group[group_name]``), so the stages' groups live side by side in one server.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.rollout.fleet import MembersFailed
from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline, SyncTarget, drain
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig, nccl_rendezvous


class StageSenders:
    """This rank's senders of its own pipeline stage ``stage`` (of ``stages``): one weight-update
    group per engine its replica feeds. Every rank has one; only stage owners use it."""

    def __init__(self, rollout, weight_sync: WeightSyncConfig, stage: int, stages: int):
        self.rollout = rollout
        self.weight_sync = weight_sync
        self.stage, self.stages = stage, stages
        self.targets: dict[int, SyncTarget] = {}  # engine -> its client and group, joined

    def join(self, members: Iterable[int]) -> None:
        """Join the group of each of ``members`` not joined yet; raises ``MembersFailed`` naming
        those that could not (the others stay joined)."""
        from rlmt_megatron.rollout.factory import sglang_client
        from rlmt_megatron.rollout.weight_sync.nccl_broadcast import NCCLBroadcastTransport

        failed = {}
        for member in members:
            if member in self.targets:
                continue
            client = sglang_client(self.rollout, member, self.stage, self.stages)
            address, port = nccl_rendezvous(self.weight_sync, member, self.stage, self.stages)
            transport = NCCLBroadcastTransport(client, address, port, self.rollout.engine_tp_size,
                                               backend=self.weight_sync.nccl_backend,
                                               timeout_s=self.weight_sync.timeout_s, session=False)
            try:
                transport.connect()
            except EngineError as e:
                _close(SyncTarget(transport, client))
                failed[member] = f"pipeline stage {self.stage}: {e}"
                continue
            self.targets[member] = SyncTarget(transport, client)
        if failed:
            raise MembersFailed(failed, self.rollout.engines)

    def push(self, stream: Iterable[Bucket], version: int, members: Iterable[int], pipeline: SyncPipeline) -> None:
        """Send this stage's buckets (``stream``; empty on a rank that owns no stage of a feeding
        replica) to ``members`` at once. Raises ``MembersFailed`` naming those that failed; the
        stream is read to its end in every case (its TP gathers are collective)."""
        targets = {m: self.targets[m] for m in members if m in self.targets}
        missing = {m: f"pipeline stage {self.stage} has not joined its weight-update group"
                   for m in members if m not in self.targets}
        if not targets:
            drain(stream)
        else:
            try:
                pipeline.push(stream, version, targets, self.rollout.engines)
            except MembersFailed as e:
                missing.update(e.failed)
        if missing:
            raise MembersFailed(missing, self.rollout.engines)

    def drop(self, members: Iterable[int]) -> None:
        """Leave the groups of ``members`` (restarted engines get new ones)."""
        for member in members:
            target = self.targets.pop(member, None)
            if target is not None:
                _close(target)

    def close(self) -> None:
        self.drop(list(self.targets))


def _close(target: Optional[SyncTarget]) -> None:
    with contextlib.suppress(Exception):  # closing must not hide why a sync or the run ends
        target.transport.close()
    with contextlib.suppress(Exception):
        target.engine.close()
