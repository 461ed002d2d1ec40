"""What every line of the dry run's estimate is computed from: the options, the resolved models,
where the engine runs, the token counts of a step; every layout checked on the way
(``docs/dry_run.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.errors import LayoutError, RLMTError
from rlmt_megatron.models.layer_specs import picks_te_spec
from rlmt_megatron.planner.model_shapes import ResolvedModel, assumed_shapes, padded_vocab, resolve_models
from rlmt_megatron.planner.engine_layout import EnginePlacement, place_engine
from rlmt_megatron.planner.rank_layout import check_engine_split, check_layout

GiB = 2**30
MiB = 2**20
FRAGMENTATION = 0.05  # share of the GPU kept free for the caching allocator's fragmentation


@dataclass
class DryRunOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    assume_shapes: list[str] = field(default_factory=list)  # "NAME" or "ROLE=NAME"
    engine_dp: int = 1
    engine_mem_fraction: Optional[float] = None
    rates: list[str] = field(default_factory=list)  # "NAME=VALUE": overrides of step_rates.RATES


@dataclass
class RunPlan:
    """The resolved models, where things run, token counts."""

    cfg: object
    o: DryRunOptions
    models: dict[str, ResolvedModel]
    engine: EnginePlacement
    gpu: float
    budget: float

    def __post_init__(self):
        cfg, a = self.cfg, self.cfg.algorithm
        self.world = self.engine.world
        self.engine_tp = self.engine.tp
        self.build = cfg.build
        self.parallel = cfg.build.parallel
        self.rm_parallel = cfg.reward.parallel or cfg.build.parallel
        self.dp = self.world // (self.parallel.tp * self.parallel.pp)
        self.pol = self.models["policy"].spec
        self.b = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.build.precision.params_dtype]
        self.te = picks_te_spec(cfg.build)
        self.spec_name = "Transformer Engine" if self.te else "local + SDPA"
        self.samples = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
        self.updates = a.updates_per_rollout if a.name != "dpo" else 1
        S = self.S = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        unit = 2 if a.name == "dpo" else 1  # a DPO pair stays in one micro-batch
        self.T = max(cfg.batching.train_tokens_per_microbatch, unit * S)
        self.T_lp = max(cfg.batching.logprob_tokens_per_microbatch, S)  # forward-only passes: no pairs
        sequences = 2 * min(cfg.data.prompts_per_step, self.samples) if a.name == "dpo" else self.samples
        per_rank = -(-sequences // (self.dp * self.updates))
        self.microbatches = -(-per_rank // (max(1, self.T // (unit * S)) * unit))
        self.T_rm = max(cfg.reward.max_tokens_per_microbatch, min(cfg.reward.max_length or S, S))
        self.V = self.vocab("policy", self.parallel)

    def role_build(self, parallel: ParallelConfig) -> ModelBuildConfig:
        """``build`` with a role's own layout (the reward model's ``reward.parallel``)."""
        return self.build if parallel == self.build.parallel else self.build.model_copy(update={"parallel": parallel})

    def vocab(self, role: str, parallel: ParallelConfig) -> int:
        return padded_vocab(self.models[role], self.role_build(parallel))


def _check_options(o: DryRunOptions) -> None:
    for name in ("nodes", "gpus_per_node", "engine_dp"):
        if getattr(o, name) < 1:
            raise RLMTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}")
    if o.gpu_mem_gib <= 0:
        raise RLMTError(f"--gpu-mem-gib must be > 0, got {o.gpu_mem_gib}")
    if o.engine_mem_fraction is not None and not 0 < o.engine_mem_fraction < 1:
        raise RLMTError(f"--engine-mem-fraction must be in (0, 1), got {o.engine_mem_fraction}")


def make_plan(cfg, o: DryRunOptions) -> RunPlan:
    """Resolve shapes and placement and check every layout (raises LayoutError/RLMTError)."""
    _check_options(o)
    models = resolve_models(cfg, assumed_shapes(o.assume_shapes))
    engine = place_engine(cfg, o.nodes, o.gpus_per_node, o.engine_dp)
    rm_parallel = cfg.reward.parallel or cfg.build.parallel
    for role, res in models.items():
        check_layout(rm_parallel if role == "reward" else cfg.build.parallel, engine.world, res, f"{role} ({res.how})")
    if cfg.rollout.engine == "sglang":
        check_engine_split(models["policy"], engine.tp)
    gpu = o.gpu_mem_gib * GiB
    plan = RunPlan(cfg, o, models, engine, gpu, gpu * (1 - FRAGMENTATION))
    a, dp = cfg.algorithm, plan.dp
    if a.name == "dpo":
        if cfg.data.prompts_per_step < dp:  # dpo_update skips a step with fewer pairs than DP ranks
            raise LayoutError(f"algorithm.name=dpo: at most data.prompts_per_step={cfg.data.prompts_per_step} pairs "
                              f"per step, fewer than DP={dp} ranks, so every update would be skipped; "
                              f"raise prompts_per_step or lower DP")
    elif plan.samples < dp * plan.updates:  # train_step refuses a DP rank without samples
        raise LayoutError(f"{plan.samples} rollouts per step (prompts_per_step x samples_per_prompt) cannot fill "
                          f"DP={dp} ranks x updates_per_rollout={plan.updates} mini-batches: some rank would get none")
    return plan
