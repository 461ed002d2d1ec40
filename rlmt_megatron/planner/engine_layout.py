"""Where the rollout engines run: ``rollout.engines`` engines (a fleet), each on ``engine_tp_size``
x ``--engine-dp`` GPUs of one node, colocated on the trainer's nodes or on nodes of their own
(``docs/dry_run.md``, "Engine layout"), and the trainer's world that is left."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlmt_megatron.errors import LayoutError, RLMTError
from rlmt_megatron.planner.rank_layout import ranges
from rlmt_megatron.rollout.fleet import member_node, member_slot


@dataclass
class EngineMember:
    """One engine: the node it runs on (numbered over the whole job) and that node's GPUs it takes."""

    index: int
    node: int
    gpus: list[int]


@dataclass
class EnginePlacement:
    tp: int  # GPUs per engine replica (SGLang's --tp)
    dp: int  # replicas inside one engine (SGLang's --dp-size, from --engine-dp)
    members: list[EngineMember]
    world: int  # the trainer's ranks
    gpus_per_node: int
    colocated: bool
    transport: str  # how the weights reach the engines (rollout/weight_sync/select.py)
    engine_nodes: int = 0  # disaggregated: nodes of the engines' own
    hosted: set[int] = field(default_factory=set)  # colocated: trainer ranks whose GPU an engine shares

    @property
    def per_engine(self) -> int:
        return self.tp * self.dp

    @property
    def gpus(self) -> int:
        """Every engine GPU of the job."""
        return len(self.members) * self.per_engine

    @property
    def replicas(self) -> int:
        """Engine replicas that generate at once (engines x DP)."""
        return len(self.members) * self.dp

    def describe(self) -> list[str]:
        where = "shared with the trainer" if self.colocated else f"on {self.engine_nodes} node(s) of their own"
        out = [f"{len(self.members)} engine(s) x (TP {self.tp} x DP {self.dp}) = {self.gpus} GPUs, {where}"]
        out += [f"  engine {m.index}: node {m.node} GPUs {ranges(m.gpus)}" for m in self.members[:8]]
        if len(self.members) > 8:
            out.append(f"  ... ({len(self.members)} engines)")
        return out


def _kind_tp(cfg, engine_dp: int) -> int:
    r = cfg.rollout
    if r.engine != "sglang" and engine_dp != 1:
        raise RLMTError(f"--engine-dp applies to rollout.engine=sglang, not {r.engine}")
    return r.engine_tp_size if r.engine == "sglang" else 1


def place_engine(cfg, nodes: int, gpus_per_node: int, engine_dp: int) -> EnginePlacement:
    """The GPUs of every engine and the trainer's world size.

    SGLang engines are servers: each takes ``engine_tp_size x engine_dp`` GPUs of one node.
    Colocated, the engines are spread over the trainer's nodes as the run places them
    (``fleet.member_node``: engine i on node i mod nodes, the next free GPUs there), so every node
    generates, each node's engines synced by its own first rank (``trainer/engine_hosts.py``);
    disaggregated, they fill nodes of their own, the last ones of the job. vLLM and hf engines are
    processes of their node's first rank, spread the same way, one GPU each (``rollout/factory.py``),
    colocated or not (disaggregated vLLM takes GPUs the trainer does not use only if the launcher
    leaves them free)."""
    from rlmt_megatron.rollout.weight_sync.select import SGLANG_DP_TRANSPORTS, resolve_transport

    r = cfg.rollout
    tp = _kind_tp(cfg, engine_dp)
    per_engine, count = tp * engine_dp, r.engines
    transport = resolve_transport(r.engine, r.placement, cfg.weight_sync.transport)
    if engine_dp > 1 and transport not in SGLANG_DP_TRANSPORTS:
        raise LayoutError(f"--engine-dp {engine_dp}: SGLang refuses weight updates by {transport} on a server with "
                          f"data-parallel replicas (--dp-size > 1; update_weights_from_tensor and "
                          f"update_weights_from_distributed assert dp_size == 1); run each replica as an engine of "
                          f"its own (rollout.engines={count * engine_dp}, one URL each) or sync by "
                          f"{', '.join(sorted(SGLANG_DP_TRANSPORTS))}")
    sizes = f"engine_tp_size {tp} x --engine-dp {engine_dp}" if r.engine == "sglang" else "one GPU"
    if per_engine > gpus_per_node:
        raise LayoutError(f"rollout.engine_tp_size: an engine's {per_engine} GPUs ({sizes}) must be on one node "
                          f"({gpus_per_node} GPUs): CUDA IPC handles and SGLang's TP group cannot leave it")
    fit = gpus_per_node // per_engine  # engines one node holds
    if r.engine != "sglang":
        per_node = -(-count // nodes)
        if per_node > gpus_per_node:
            raise LayoutError(f"rollout.engines={count} {r.engine} engines put {per_node} on one node, one GPU each of "
                              f"its {gpus_per_node}: two would share a GPU; lower rollout.engines or raise --nodes")
        members = [EngineMember(i, member_node(i, nodes), [member_slot(i, nodes)]) for i in range(count)]
        world = nodes * gpus_per_node
        hosted = {m.node * gpus_per_node + m.gpus[0] for m in members} if r.placement == "colocated" else set()
        return EnginePlacement(1, 1, members, world, gpus_per_node, r.placement == "colocated", transport,
                               hosted=hosted)
    if r.placement == "disaggregated":
        engine_nodes = -(-count // fit)
        if nodes - engine_nodes < 1:
            raise LayoutError(f"rollout.placement=disaggregated: rollout.engines={count} engine(s) of {per_engine} GPUs "
                              f"({sizes}) need {engine_nodes} node(s), leaving none of the {nodes} for the trainer; "
                              f"raise --nodes or lower rollout.engines")
        first = nodes - engine_nodes
        members = [EngineMember(i, first + i // fit, list(range(i % fit * per_engine, (i % fit + 1) * per_engine)))
                   for i in range(count)]
        return EnginePlacement(tp, engine_dp, members, first * gpus_per_node, gpus_per_node, False, transport,
                               engine_nodes=engine_nodes)
    per_node = -(-count // nodes)  # engines on the busiest node
    if per_node > fit:
        raise LayoutError(f"rollout.engines={count} colocated engine(s) of {per_engine} GPUs ({sizes}) put {per_node} on "
                          f"one node, {per_node * per_engine} GPUs of its {gpus_per_node}; lower rollout.engines, "
                          f"rollout.engine_tp_size or --engine-dp, or raise --nodes")
    members = [EngineMember(i, member_node(i, nodes), list(range(member_slot(i, nodes) * per_engine,
                                                                  (member_slot(i, nodes) + 1) * per_engine)))
               for i in range(count)]
    hosted = {m.node * gpus_per_node + g for m in members for g in m.gpus}
    return EnginePlacement(tp, engine_dp, members, nodes * gpus_per_node, gpus_per_node, True, transport, hosted=hosted)
