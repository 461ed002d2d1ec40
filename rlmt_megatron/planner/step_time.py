"""The dry run's step-time projection: seconds per phase of one step, each from a token or byte
count and a rate of ``step_rates.RATES`` (``docs/dry_run.md``, "Step time"):

- generation: sequences x response tokens / (engine GPUs x tokens/s per GPU);
- reward, logprobs (old, reference, PPO values), train (policy, PPO critic): model FLOPs
  (``flops.DecoderShape``) / (trainer GPUs x peak x MFU);
- sync: the engine's weight bytes / the transport's bandwidth (the fan-out feeds every engine at
  once, ``rollout/weight_sync/fan_out.py``);
- the step: their sum when synchronous; max(generation, reward + logprobs + train) + sync with
  ``rollout.max_staleness >= 1`` (the next step generates while this one trains)."""

from __future__ import annotations

from dataclasses import dataclass

from rlmt_megatron.planner.flops import DecoderShape
from rlmt_megatron.planner.model_shapes import engine_weight_bytes
from rlmt_megatron.planner.run_plan import RunPlan
from rlmt_megatron.planner.step_rates import Rate

RECOMPUTE_FULL = 4 / 3  # full recomputation runs the forward twice: (1 + 1 + 2) / (1 + 2)


@dataclass
class PhaseTime:
    name: str
    seconds: float
    formula: str
    rates: tuple[str, ...]  # names in step_rates.RATES


@dataclass
class StepProjection:
    phases: list[PhaseTime]
    rates: dict[str, Rate]
    asynchronous: bool  # the recipe's rollout.max_staleness >= 1
    colocated: bool
    engine_tp: int
    async_possible: bool  # GRPO and PPO (config/rlmt.py refuses max_staleness for DPO)

    def seconds(self, name: str) -> float:
        return next(p.seconds for p in self.phases if p.name == name)

    @property
    def trainer_side(self) -> float:
        return sum(p.seconds for p in self.phases if p.name not in ("generation", "sync"))

    @property
    def synchronous_step(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def asynchronous_step(self) -> float:
        return max(self.seconds("generation"), self.trainer_side) + self.seconds("sync")


def _forward(name: str, shape: DecoderShape, seqs: int, length: int, gpus: int, r: dict[str, Rate], what: str):
    flops = seqs * length * shape.forward_flops_per_token(length)
    rate = gpus * r["peak_tflops"].value * 1e12 * r["logprob_mfu"].value
    return flops, rate, (f"{what}: {seqs} seqs x {length} tokens x {shape.forward_flops_per_token(length) / 1e9:.1f} "
                         f"GFLOP / ({gpus} GPUs x {r['peak_tflops'].value:g} TFLOP/s x {r['logprob_mfu'].value:g})")


def project_step(plan: RunPlan, rates: dict[str, Rate]) -> StepProjection:
    cfg, a, e = plan.cfg, plan.cfg.algorithm, plan.engine
    resp = round(cfg.rollout.max_new_tokens * rates["response_fraction"].value)
    length = cfg.data.max_prompt_tokens + resp  # a sequence: the longest prompt and the assumed response
    generated = plan.samples
    trained = 2 * min(cfg.data.prompts_per_step, generated) if a.name == "dpo" else generated  # DPO: pairs
    world, gen_rate = plan.world, rates["gen_tokens_per_s_per_gpu"].value
    policy = DecoderShape.from_spec(plan.pol)
    phases = [PhaseTime("generation", generated * resp / (e.gpus * gen_rate),
                        f"{generated} seqs x {resp} tokens / ({len(e.members)} engine(s) x {e.per_engine} GPUs x "
                        f"{gen_rate:.0f} tokens/s)", ("gen_tokens_per_s_per_gpu", "response_fraction"))]
    fwd = ("peak_tflops", "logprob_mfu", "response_fraction")
    flops, rate, text = _forward("reward", DecoderShape.from_spec(plan.models["reward"].spec, "scalar"), generated,
                                 length, world, rates, "reward model")
    phases.append(PhaseTime("reward", flops / rate, text, fwd))
    passes = [("old logprobs", policy)]
    if "reference" in plan.models:
        passes.append(("reference logprobs", DecoderShape.from_spec(plan.models["reference"].spec)))
    if "critic" in plan.models:
        passes.append(("values", DecoderShape.from_spec(plan.models["critic"].spec, "scalar")))
    total, texts = 0.0, []
    for what, shape in passes:
        flops, rate, text = _forward(what, shape, trained, length, world, rates, what)
        total += flops / rate
        texts.append(text)
    phases.append(PhaseTime("logprobs", total, "; ".join(texts), fwd))
    recompute = RECOMPUTE_FULL if cfg.build.performance.recompute == "full" else 1.0
    trainees = [("policy", policy)] + ([("critic", passes[-1][1])] if "critic" in plan.models else [])
    total, texts = 0.0, []
    peak, mfu = rates["peak_tflops"].value, rates["train_mfu"].value
    for what, shape in trainees:
        per_token = shape.train_flops_per_token(length) * recompute
        total += trained * length * per_token / (world * peak * 1e12 * mfu)
        texts.append(f"{what}: {trained} seqs x {length} tokens x {per_token / 1e9:.1f} GFLOP"
                     + (" (x 4/3, full recompute)" if recompute != 1.0 else "")
                     + f" / ({world} GPUs x {peak:g} TFLOP/s x {mfu:g})")
    phases.append(PhaseTime("train", total, "; ".join(texts), ("peak_tflops", "train_mfu", "response_fraction")))
    fp8 = cfg.weight_sync.fp8 != "none"
    weights = engine_weight_bytes(plan.pol, 1, fp8)
    bandwidth = f"sync_{e.transport}_gb_per_s"
    # disk: each engine of a fleet gets a folder of its own (weight_sync/select.py), so the shared
    # filesystem takes one copy per engine; the other transports feed every engine at once
    copies = len(e.members) if e.transport == "disk" else 1
    if cfg.engine_follows_policy:
        how = f"{e.transport}, one copy per engine" if copies > 1 else f"{e.transport}, every engine at once"
        phases.append(PhaseTime("sync", copies * weights / (rates[bandwidth].value * 1e9),
                                (f"{copies} x " if copies > 1 else "") + f"{weights / 1e9:.1f} GB "
                                f"({'FP8 linears' if fp8 else 'bf16'}) / {rates[bandwidth].value:.1f} GB/s ({how})",
                                (bandwidth,)))
    else:
        phases.append(PhaseTime("sync", 0.0, "none: one_round DPO samples every pair from the initial weights", ()))
    return StepProjection(phases, rates, cfg.rollout.max_staleness >= 1, e.colocated, e.tp, a.name != "dpo")


def render(p: StepProjection) -> list[str]:
    out = [f"  {x.name:<11} {x.seconds:8.1f} s   {x.formula}" for x in p.phases]
    chosen = " <- this run" if not p.asynchronous else ""
    out.append(f"  step, synchronous (rollout.max_staleness 0): {p.synchronous_step:.1f} s = the sum{chosen}")
    if p.async_possible:
        out.append(f"  step, asynchronous (max_staleness >= 1): max(generation {p.seconds('generation'):.1f}, reward + "
                   f"logprobs + train {p.trainer_side:.1f}) + sync = {p.asynchronous_step:.1f} s"
                   + (" <- this run" if p.asynchronous else ""))
    else:
        out.append("  (asynchronous rollouts: GRPO and PPO only)")
    if p.colocated and p.async_possible:
        out.append("  (colocated engines generate on the trainer's GPUs: the asynchronous overlap needs "
                   "rollout.placement=disaggregated)")
    if p.engine_tp > 1:
        out.append(f"  (gen_tokens_per_s_per_gpu scales with the engine's GPUs; it comes from engines at TP 1, and "
                   f"decoding speeds up less than {p.engine_tp}x at TP {p.engine_tp}: optimistic there)")
    used = dict.fromkeys(n for x in p.phases for n in x.rates)
    out.append("rates (override: --rate NAME=VALUE; docs/dry_run.md, 'Step time'):")
    out += [f"  {n} = {p.rates[n].value:.4g} {p.rates[n].unit}: {p.rates[n].source}" for n in used]
    return out
