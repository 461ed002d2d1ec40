"""The dry run's report: header, layouts, the memory table, its verdict (problems and notes) and
what to change; :func:`run_dry_run` is what ``rlmt-train CONFIG --dry-run`` calls
(``docs/dry_run.md``)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Optional, TextIO

from rlmt_megatron.errors import RLMTError
from rlmt_megatron.planner.memory import (
    EngineLines,
    StageEstimate,
    engine_gpu_estimate,
    engine_lines,
    gib,
    stage_estimate,
)
from rlmt_megatron.planner.model_shapes import POLICY_ROLES
from rlmt_megatron.planner.rank_layout import RoleLayout
from rlmt_megatron.planner.run_plan import FRAGMENTATION, GiB, DryRunOptions, RunPlan, make_plan
from rlmt_megatron.planner.step_rates import resolve_rates
from rlmt_megatron.planner.step_time import StepProjection, project_step
from rlmt_megatron.planner.step_time import render as render_step


@dataclass
class DryRunReport:
    header: list[str]
    layout: list[str]
    stages: list[StageEstimate]
    engine_gpu: Optional[StageEstimate]  # disaggregated engine's own GPUs
    step: StepProjection
    notes: list[str]
    budget: float
    gpu_bytes: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        out = list(self.header) + ["", "layout"] + ["  " + x for x in self.layout]
        usable = f"budget {self.budget / GiB:.1f} GiB usable of {self.gpu_bytes / GiB:.1f} (keeping {FRAGMENTATION:.0%} free)"
        for est in self.stages + ([self.engine_gpu] if self.engine_gpu else []):
            out += ["", f"memory per GPU: {est.title} ({usable})"]
            out += [f"  {x.name:<26} {x.bytes / GiB:8.2f} GiB   {x.formula}" for x in est.persistent]
            for phase, lines in est.phases.items():
                out.append(f"  + in phase {phase}: total {est.total(phase) / GiB:.2f} GiB")
                out += [f"    {x.name:<24} {x.bytes / GiB:8.2f} GiB   {x.formula}" for x in lines]
            phase, peak = est.peak()
            out.append(f"  peak: {peak / GiB:.2f} GiB in phase {phase} -> {'fits' if peak <= self.budget else 'DOES NOT FIT'}")
        out += ["", "step time, projected per phase (every sequence at the assumed length)"] + render_step(self.step)
        out += [""] + [f"note: {n}" for n in self.notes]
        out.append("dry run: OK" if self.ok else "dry run: FAILED")
        return "\n".join(out).rstrip() + "\n"

    def check(self) -> None:
        if self.problems:
            raise RLMTError("dry run: " + "\n".join(self.problems))


def _layout_lines(plan: RunPlan) -> list[str]:
    r = plan.cfg.rollout
    names = ", ".join(x for x in POLICY_ROLES if x in plan.models)
    pol = RoleLayout(plan.parallel, plan.world).describe()
    out = [f"{names}: {pol[0]}"] + pol[1:]
    if plan.rm_parallel != plan.parallel:
        rm = RoleLayout(plan.rm_parallel, plan.world).describe()
        out += [f"reward: {rm[0]}"] + rm[1:]
    else:
        out.append("reward: the policy's layout")
    e = plan.engine
    at = f" at {', '.join(r.server_urls())}" if r.server_urls() else ""
    if r.engine == "sglang":
        out.append(f"rollout engines: sglang{at}; weights via {e.transport}")
    else:
        out.append(f"rollout engines: {r.engine}, processes of their node's first rank ({r.placement}); weights via {e.transport}")
    engines = e.describe()
    return out + ["  " + engines[0]] + ["  " + x for x in engines[1:]]


def estimate(cfg, options: DryRunOptions) -> DryRunReport:
    """Check the layouts of ``cfg`` (an ``RLMTConfig``) and estimate memory per GPU.

    Raises ``LayoutError``/``RLMTError`` for a layout or setup that cannot start; a budget that
    does not fit is reported in ``problems`` (``report.check()`` raises it), so the whole table
    can be printed first.
    """
    plan = make_plan(cfg, options)
    eng = engine_lines(plan)
    stages = [stage_estimate(plan, eng, s) for s in sorted({0, plan.parallel.pp - 1})]
    engine_gpu = None
    if cfg.rollout.placement == "disaggregated" and cfg.rollout.engine == "sglang":
        engine_gpu = engine_gpu_estimate(plan, eng)
    step = project_step(plan, resolve_rates(options.rates))
    o, a, r = options, cfg.algorithm, cfg.rollout
    header = [f"dry run: {o.nodes} node(s) x {o.gpus_per_node} GPUs of {o.gpu_mem_gib:g} GiB; trainer world "
              f"{plan.world}; {a.name}, rollout {r.engine} {r.placement}", "models:"]
    header += [f"  {role:<9} {res.how}" for role, res in plan.models.items()]
    header.append(f"tokens: longest sequence S={plan.S}, train micro-batch T={plan.T}, {plan.microbatches} "
                  f"micro-batch(es) per DP rank and update, logprob micro-batch T_lp={plan.T_lp}, RM micro-batch "
                  f"{plan.T_rm}; layer spec {plan.spec_name}")
    report = DryRunReport(header, _layout_lines(plan), stages, engine_gpu, step, [], plan.budget, plan.gpu)
    _judge(report, plan, eng)
    return report


def _judge(report: DryRunReport, plan: RunPlan, eng: EngineLines) -> None:
    """Problems (over budget, a KV cache without room for one sequence) and notes."""
    one_seq = plan.S * eng.kv_per_token
    for est in report.stages + ([report.engine_gpu] if report.engine_gpu else []):
        phase, peak = est.peak()
        if peak > plan.budget:
            report.problems.append(_over_budget(est, phase, peak, plan.budget))
        kv = next((x for x in est.phases.get("rollout", []) if x.name == "KV cache"), None)
        if kv is None:
            continue
        weights = eng.rollout[0].bytes
        others = est.total("rollout") - kv.bytes - weights  # everything beside SGLang's static pool
        most = math.floor((plan.budget - others) / plan.gpu * 100) / 100
        need = math.ceil((weights + eng.kv_need) / plan.gpu * 100) / 100
        if kv.bytes < one_seq:
            report.problems.append(f"{est.title}: the rollout KV cache gets {gib(kv.bytes)}, less than one sequence "
                                   f"of {plan.S} tokens ({gib(one_seq)}); raise rollout.engine_tp_size, use "
                                   f"rollout.placement=disaggregated, or free trainer memory (see the table)")
        elif plan.o.engine_mem_fraction is not None:
            pass
        elif need > most:
            report.notes.append(f"{est.title}: the KV cache holds part of the step's sequences at full length, so "
                                f"SGLang generates in waves; start it with --mem-fraction-static {most:.2f}")
        else:
            report.notes.append(f"{est.title}: start SGLang with --mem-fraction-static between {need:.2f} (every "
                                f"sequence at once) and {most:.2f} (all the memory left)")
    if plan.parallel.vpp:
        report.notes.append("virtual PP pads every micro-batch to the largest [rows, width] (runner/model_runner.py): "
                            "T may be larger than assumed")


TP_PP = "raise build.parallel.tp or pp"
ADVICE: dict[str, tuple[str, ...]] = {  # Line.fix -> what lowers that line
    "activations": ("lower batching.train_tokens_per_microbatch (not below the longest sequence)",
                    "turn on build.parallel.sequence_parallel",
                    "set build.performance.recompute=full (~1/3 more compute)", TP_PP),
    "recomputed": ("lower batching.train_tokens_per_microbatch (not below the longest sequence)",
                   "turn on build.parallel.sequence_parallel", TP_PP),
    "recomputed chunk": ("lower build.performance.recompute_layers", "lower batching.train_tokens_per_microbatch"),
    "tokens": ("lower batching.logprob_tokens_per_microbatch",),
    "logits": ("lower batching.train_tokens_per_microbatch (train) or batching.logprob_tokens_per_microbatch "
               "(logprobs)", "raise build.parallel.tp"),
    "optimizer": ("add nodes (the distributed optimizer shards over DP)", TP_PP),
    "model": (TP_PP,),
    "reference": (TP_PP, "set algorithm.kl_coef: 0 (no reference model)"),
    "reward": ("give the reward model a larger reward.parallel.tp",),
    "rm_tokens": ("lower reward.max_tokens_per_microbatch",),
    "engine": ("raise rollout.engine_tp_size", "use rollout.placement=disaggregated"),
    "kv": ("lower --engine-mem-fraction, data.prompts_per_step or rollout.max_new_tokens",
           "raise rollout.engine_tp_size"),
    "hf": ("use rollout.engine=sglang (the hf engine keeps a float32 copy and every logit)",),
    "sync": ("lower weight_sync.bucket_mb",),
}


def _over_budget(est: StageEstimate, phase: str, peak: float, budget: float) -> str:
    items = sorted(est.persistent + est.phases[phase], key=lambda x: -x.bytes)[:3]
    advice = list(dict.fromkeys(a for x in items if x.fix for a in ADVICE[x.fix]))
    biggest = ", ".join(f"{x.name} {gib(x.bytes)}" for x in items)
    return (f"{est.title}: needs {gib(peak)} in phase {phase}, more than the {gib(budget)} usable. "
            f"Biggest items: {biggest}. To fit: " + "; ".join(advice) + ".")


def run_dry_run(cfg, options: DryRunOptions, out: Optional[TextIO] = None) -> DryRunReport:
    """Print the resolved config and the report; raise ``RLMTError`` if the run cannot fit."""
    from rlmt_megatron.config.base import dump_config

    out = out or sys.stdout
    out.write("# resolved config\n" + dump_config(cfg) + "\n")
    report = estimate(cfg, options)
    out.write(report.render())
    report.check()
    return report
