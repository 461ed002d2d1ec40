"""Which trainer rank drives each rollout engine, and which data-parallel replica feeds it weights.

Engines are spread over the nodes in turn (``fleet.member_node``: engine i on node i mod nodes),
and each node's engines are driven by one rank of that node, its *host*: the lowest rank there
that owns a pipeline stage of its data-parallel replica (its TP rank 0; on a GPU machine, local
rank 0). The host builds, restarts and syncs its node's engines and runs their share of each
generation; its own replica streams it the weights (``hf_export.buckets_for``): the TP gathers stay
inside the replica and each stage's owner sends only its own layers, so with a replica per node
nothing of a sync crosses nodes and no rank carries more than its node's part. A node whose ranks
own no stage (a TP group that spans nodes) hosts no engine; the engines go to the other nodes.

A node is a torchrun agent (``GROUP_RANK``), else a SLURM node (``SLURM_NODEID``), else a host name.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

from rlmt_megatron.distributed.collectives import StageOwners, stage_owners
from rlmt_megatron.rollout.fleet import member_node, member_slot


def node_key() -> str:
    """What tells this process's node apart from the job's others."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(name) is not None:
            return f"{name}={os.environ[name]}"
    return socket.gethostname()


@dataclass(frozen=True)
class EngineHosts:
    """The rank that drives each engine (``host``) and each engine's place among its node's
    engines (``slot``); every rank's replica and stage (``layout``), node (``rank_node``) and GPU on
    it (``rank_gpu``: its ``LOCAL_RANK``, else its place among the node's ranks)."""

    host: dict[int, int]
    slot: dict[int, int]
    layout: StageOwners
    rank_node: list[int]
    rank_gpu: list[int]

    @property
    def stages(self) -> int:
        return len(set(self.layout.stage))

    @property
    def node(self) -> dict[int, int]:
        """Each engine's node: its host's."""
        return {m: self.rank_node[h] for m, h in self.host.items()}

    @property
    def replica(self) -> dict[int, int]:
        """The replica that feeds each host: its own (host rank -> data-parallel rank)."""
        return {h: self.layout.replica[h] for h in set(self.host.values())}

    def feeding(self, member: int) -> int:
        """The data-parallel replica whose weights engine ``member`` gets."""
        return self.layout.replica[self.host[member]]

    def fed_by(self, rank: int, members) -> list[int]:
        """Those of ``members`` whose feeding replica has ``rank`` as a stage owner."""
        if not self.layout.owns(rank):
            return []
        return [m for m in members if self.feeding(m) == self.layout.replica[rank]]

    def sender_nodes(self, members) -> set[int]:
        """The nodes of the stage owners that feed ``members``."""
        feeding = {self.feeding(m) for m in members}
        return {self.rank_node[r] for (replica, _), r in self.layout.owner.items() if replica in feeding}

    def members_of(self, rank: int) -> list[int]:
        return sorted(m for m, h in self.host.items() if h == rank)

    def feeds(self, members) -> dict[int, int]:
        """What ``buckets_for`` needs to stream the weights to the hosts of ``members``."""
        return {self.host[m]: self.feeding(m) for m in members}

    def describe(self) -> str:
        return "; ".join(f"engine {m} on node {self.node[m]} (rank {self.host[m]})" for m in sorted(self.host))


def find_engine_hosts(count: int) -> EngineHosts:
    """Where the run's ``count`` engines live. Collective (every rank says its node and stage)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return EngineHosts({m: 0 for m in range(count)}, {m: m for m in range(count)}, stage_owners(), [0], [0])
    layout = stage_owners()
    said: list = [None] * dist.get_world_size()
    local = os.environ.get("LOCAL_RANK")
    dist.all_gather_object(said, (node_key(), None if local is None else int(local)))
    keys = [key for key, _ in said]
    nodes = list(dict.fromkeys(keys))  # numbered by their lowest rank
    hosts = []  # per node that can host, its host rank
    for key in nodes:
        owners = [r for r, k in enumerate(keys) if k == key and layout.owns(r)]
        if owners:
            hosts.append(owners[0])
    host = {m: hosts[member_node(m, len(hosts))] for m in range(count)}
    slot = {m: member_slot(m, len(hosts)) for m in range(count)}
    gpu = [local if local is not None else keys[:r].count(keys[r]) for r, (_, local) in enumerate(said)]
    return EngineHosts(host, slot, layout, [nodes.index(k) for k in keys], gpu)
