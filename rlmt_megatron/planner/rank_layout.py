"""Ranks for the dry run: Megatron-Core's rank groups, the layout checks every role passes at
start-up, and the engine's TP against the policy's heads (``docs/dry_run.md``, "Layout"; where
the engines run: ``engine_layout.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed.layout_checks import check_model_layout, check_world_size
from rlmt_megatron.errors import LayoutError
from rlmt_megatron.planner.model_shapes import ResolvedModel


def rank_groups(tp: int, dp: int, pp: int) -> dict[str, list[list[int]]]:
    """TP, DP and PP groups of Megatron-Core's default rank order (``tp-cp-ep-dp-pp``)."""
    def rank(t, d, s):
        return t + tp * (d + dp * s)

    return {
        "tp": [[rank(t, d, s) for t in range(tp)] for s in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, s) for d in range(dp)] for s in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, s) for s in range(pp)] for d in range(dp) for t in range(tp)],
    }


def stage_ranks(tp: int, dp: int, pp: int, stage: int) -> list[int]:
    """The ranks of PP stage ``stage``, sorted."""
    return sorted(r for g in rank_groups(tp, dp, pp)["tp"][stage * dp:(stage + 1) * dp] for r in g)


def ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _groups(groups: list[list[int]], limit: int = 4) -> str:
    shown = " ".join(f"[{ranges(g)}]" for g in groups[:limit])
    return shown + (f" ... ({len(groups)} groups)" if len(groups) > limit else "")


@dataclass
class RoleLayout:
    parallel: ParallelConfig
    world: int

    @property
    def dp(self) -> int:
        return self.world // (self.parallel.tp * self.parallel.pp)

    def describe(self) -> list[str]:
        p = self.parallel
        g = rank_groups(p.tp, self.dp, p.pp)
        stages = "; ".join(f"stage {s}: ranks {ranges(stage_ranks(p.tp, self.dp, p.pp, s))}" for s in range(p.pp))
        return [f"TP={p.tp} PP={p.pp} DP={self.dp} VPP={p.vpp or '-'} SP={'on' if p.sequence_parallel else 'off'}"
                f" over {self.world} ranks",
                f"  TP groups: {_groups(g['tp'])}", f"  DP groups: {_groups(g['dp'])}",
                f"  PP: {stages}"]


def check_layout(parallel: ParallelConfig, world: int, model: ResolvedModel, what: str) -> None:
    """The start-up checks (``distributed/layout_checks.py``) of one role, named ``what``."""
    try:
        check_world_size(parallel, world)
        check_model_layout(parallel, model.spec)
    except LayoutError as e:
        raise LayoutError(f"{what}: {e}") from None
    if model.padded_vocab is not None and model.padded_vocab % parallel.tp:
        raise LayoutError(f"{what}: {model.how}: padded vocabulary {model.padded_vocab} is not divisible by tp={parallel.tp}")


def check_engine_split(policy: ResolvedModel, engine_tp: int) -> None:
    """SGLang shards the policy's heads over its TP; KV heads split or replicate evenly."""
    spec = policy.spec
    if spec.num_attention_heads % engine_tp:
        raise LayoutError(f"rollout.engine_tp_size={engine_tp}: the policy's {spec.num_attention_heads} "
                          f"attention heads do not split over it")
    kv = spec.num_key_value_heads
    if kv % engine_tp and engine_tp % kv:
        raise LayoutError(f"rollout.engine_tp_size={engine_tp}: the policy's {kv} KV heads neither split "
                          f"over it nor replicate evenly")
