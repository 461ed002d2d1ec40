"""The memory one GPU needs: for one pipeline stage of the trainer (or the disaggregated engine's
GPU), the lines held in every phase and those of each phase of a step (``docs/dry_run.md``,
"Memory per GPU": every line and its formula)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rlmt_megatron.models.hf_config import HFModelSpec
from rlmt_megatron.planner.model_shapes import (
    engine_weight_bytes,
    final_norm_bytes_per_token,
    hf_model_params,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    recompute_input_bytes_per_token,
    stage_params,
)
from rlmt_megatron.planner.rank_layout import ranges, stage_ranks
from rlmt_megatron.planner.run_plan import GiB, MiB, RunPlan
from rlmt_megatron.runner.chunked_logprobs import DEFAULT_CHUNK_TOKENS
from rlmt_megatron.runner.logprobs import DEFAULT_CHUNK_BYTES

TRAINER_RUNTIME_GIB = 2.0  # CUDA context (~0.5), NCCL communicators of every group, Megatron's scratch buffer
ENGINE_RUNTIME_GIB = 4.0  # SGLang outside its static pool: context, CUDA graphs, prefill activations, sampler


@dataclass
class Line:
    name: str
    bytes: float
    formula: str
    fix: Optional[str] = None  # key of report.ADVICE: what lowers this line


@dataclass
class StageEstimate:
    title: str
    persistent: list[Line]
    phases: dict[str, list[Line]]

    def total(self, phase: str) -> float:
        return sum(x.bytes for x in self.persistent) + sum(x.bytes for x in self.phases[phase])

    def peak(self) -> tuple[str, float]:
        return max(((p, self.total(p)) for p in self.phases), key=lambda x: x[1])


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def inflight_chunks(pp: int, vpp: Optional[int], stage: int, microbatches: int) -> tuple[int, int]:
    """(model chunks of activations a stage holds at its peak, layers per chunk divisor pp*vpp)."""
    if pp == 1:
        return 1, 1
    if not vpp:
        return min(pp - stage, microbatches), pp
    warmup = 2 * (pp - stage - 1) + (vpp - 1) * pp
    return min(warmup + 1, microbatches * vpp), pp * vpp


def _train_state(prefix: str, params: int, b: int, optim, dp: int) -> list[Line]:
    main = 4 if b < 4 else 0
    if optim.optimizer == "adam":
        per, what = main + 8, ("fp32 main + " if main else "") + "Adam m, v"
    else:
        per = main + (4 if optim.sgd_momentum > 0 else 0)
        what = ("fp32 main" if main else "") + (" + momentum" if optim.sgd_momentum > 0 else "")
    shard = dp if optim.use_distributed_optimizer else 1
    how = f"/ DP {dp} (distributed optimizer)" if optim.use_distributed_optimizer else "(not sharded: use_distributed_optimizer false)"
    return [Line(f"{prefix} weights", params * b, f"P {params / 1e9:.3f}B x {b} B", "model"),
            Line(f"{prefix} grads (fp32)", params * 4, "P x 4 B (DDP buffer, grad_reduce_in_fp32)", "model"),
            Line(f"{prefix} optimizer", per * params / shard, f"{per} B ({what or 'none'}) x P {how}", "optimizer")]


# ------------------------------------------------------------------------------------ the engine


@dataclass
class EngineLines:
    rollout: list[Line] = field(default_factory=list)  # while generating
    sync: list[Line] = field(default_factory=list)  # while receiving weights
    resident: list[Line] = field(default_factory=list)  # always (the hf engine)
    kv_need: float = 0.0  # KV bytes per GPU for every sequence of the step at full length
    kv_per_token: float = 0.0


def engine_lines(plan: RunPlan) -> EngineLines:
    cfg, pol, S, n = plan.cfg, plan.pol, plan.S, plan.samples
    r = cfg.rollout
    if r.engine == "sglang":
        fp8 = cfg.weight_sync.fp8 != "none"
        ew = engine_weight_bytes(pol, plan.engine_tp, fp8)
        kv_tok = kv_bytes_per_token(pol, plan.engine_tp)
        weights = Line("engine weights", ew, f"{hf_model_params(pol) / 1e9:.2f}B x {'1-2' if fp8 else 2} B "
                       f"/ engine TP {plan.engine_tp}", "engine")
        return EngineLines(
            rollout=[weights, Line("engine runtime", ENGINE_RUNTIME_GIB * GiB,
                                   "ENGINE_RUNTIME_GIB (CUDA graphs, prefill, context)", "engine")],
            sync=[Line("engine weights", ew, "resumed before the push", "engine")],
            kv_need=-(-n // plan.engine.replicas) * S * kv_tok, kv_per_token=kv_tok)
    if r.engine == "vllm":
        share = r.gpu_memory_utilization  # what rollout/factory.py starts vLLM with
        return EngineLines(rollout=[Line("vllm engine", share * plan.gpu,
                                         f"{share} x GPU (gpu_memory_utilization)", "engine")])
    kv = n * S * pol.num_hidden_layers * 2 * pol.num_key_value_heads * pol.head_dim * 4
    return EngineLines(
        resident=[Line("hf engine weights", 4 * hf_model_params(pol), "whole model, float32, never released", "hf")],
        rollout=[Line("hf engine KV cache", kv, f"{n} seqs x {S} tokens x L x 2 x g x 4 B", "hf"),
                 Line("hf generate logits", n * r.max_new_tokens * pol.vocab_size * 4,
                      f"{n} seqs x {r.max_new_tokens} x V x 4 B (output_logits)", "hf")])


def kv_line(plan: RunPlan, eng: EngineLines, room: float) -> Line:
    """SGLang's KV pool: the requested fraction, full concurrency, or what is left in the phase."""
    o = plan.o
    if o.engine_mem_fraction is not None:
        pool = o.engine_mem_fraction * plan.gpu - eng.rollout[0].bytes
        how = f"--engine-mem-fraction {o.engine_mem_fraction} x GPU - engine weights"
    elif room >= eng.kv_need:
        pool, how = eng.kv_need, "full concurrency"
    else:
        pool, how = max(room, 0.0), "what is left"
    seqs = int(pool // (plan.S * eng.kv_per_token))
    return Line("KV cache", pool, f"{how}: holds {seqs} of {-(-plan.samples // plan.engine.replicas)} sequences at "
                                  f"{plan.S} tokens (full: {gib(eng.kv_need)})", "kv")


def engine_gpu_estimate(plan: RunPlan, eng: EngineLines) -> StageEstimate:
    """A GPU of the disaggregated SGLang engine: its weights, runtime and KV pool."""
    room = plan.budget - sum(x.bytes for x in eng.rollout)
    e = plan.engine
    return StageEstimate(f"disaggregated engine GPU ({len(e.members)} engine(s) x TP {e.tp} x DP {e.dp})", [],
                         {"rollout": eng.rollout + [kv_line(plan, eng, room)]})


# ------------------------------------------------------------------------------------ a trainer stage


def _chunk_buffers(plan: RunPlan, tokens: int, what: str) -> Line:
    """``runner/logprobs.py``'s float32 work: chunks of at most DEFAULT_CHUNK_BYTES, two alive."""
    return Line("chunk buffers", 2 * min(DEFAULT_CHUNK_BYTES, tokens * plan.V / plan.parallel.tp * 4),
                f"2 x min({DEFAULT_CHUNK_BYTES // MiB} MiB, {what} x V / TP x 4 B)", "logits")


def _loss_head(plan: RunPlan, tokens: int) -> list[Line]:
    """The policy loss: GPTModel's logits (kept by autograd), their gradient, the logprob work."""
    lg = tokens * plan.V / plan.parallel.tp * plan.b
    return [Line("logits", lg, f"T x V {plan.V} / TP x {plan.b} B", "logits"),
            Line("logits grad", lg, "same size", "logits"), _chunk_buffers(plan, tokens, "T")]


def _chunked_head(plan: RunPlan, tokens: int) -> list[Line]:
    """Forward-only logprobs (``runner/chunked_logprobs.py``): GPTModel returns the final hidden
    states, and the output layer is applied DEFAULT_CHUNK_TOKENS tokens at a time."""
    h, b, chunk = plan.pol.hidden_size, plan.b, min(tokens, DEFAULT_CHUNK_TOKENS)
    return [Line("final hidden states", 2 * tokens * h * b,
                 f"2 x T x h {h} x {b} B (GPTModel's output, its real tokens)", "tokens"),
            Line("head chunk logits", chunk * plan.V / plan.parallel.tp * b,
                 f"min(T, {DEFAULT_CHUNK_TOKENS}) x V {plan.V} / TP x {b} B", "logits"),
            _chunk_buffers(plan, chunk, f"min(T, {DEFAULT_CHUNK_TOKENS})")]


def _held(plan: RunPlan, stage: int, hosts_engine: bool, eng: EngineLines) -> list[Line]:
    """What a rank of ``stage`` holds in every phase: weights and training state of every role."""
    cfg, par, b = plan.cfg, plan.parallel, plan.b
    held = _train_state("policy", stage_params(plan.pol, "policy", par, plan.V, stage), b, cfg.optim, plan.dp)
    if "critic" in plan.models:
        p = stage_params(plan.models["critic"].spec, "critic", par, plan.vocab("critic", par), stage)
        held += _train_state("critic", p, b, cfg.critic_optim, plan.dp)
    if "reference" in plan.models:
        p = stage_params(plan.models["reference"].spec, "policy", par, plan.vocab("reference", par), stage)
        held.append(Line("reference weights", p * b, f"P {p / 1e9:.3f}B x {b} B", "reference"))
    rm, rm_par = plan.models["reward"].spec, plan.rm_parallel
    p = max(stage_params(rm, "reward", rm_par, plan.vocab("reward", rm_par), s) for s in range(rm_par.pp))
    held.append(Line("reward weights", p * b, f"P {p / 1e9:.3f}B x {b} B (largest RM stage)", "reward"))
    held.append(Line("trainer runtime", TRAINER_RUNTIME_GIB * GiB, "TRAINER_RUNTIME_GIB (context, NCCL, scratch)"))
    if hosts_engine:
        held += eng.resident
    return held


def _train(plan: RunPlan, stage: int, spec: HFModelSpec, tokens: int, lm_head: bool) -> list[Line]:
    """A training phase (policy or critic): the activations of the in-flight micro-batches."""
    par, last = plan.parallel, stage == plan.parallel.pp - 1
    n_chunks, div = inflight_chunks(par.pp, par.vpp, stage, plan.microbatches)
    per_layer = layer_activation_bytes_per_token(spec, par, plan.te)
    layers = spec.num_hidden_layers // div
    perf = plan.cfg.build.performance
    if perf.recompute == "full":
        chunk = min(perf.recompute_layers, layers)
        kept = recompute_input_bytes_per_token(spec, par)
        out = [Line("activations", n_chunks * -(-layers // chunk) * tokens * kept,
                    f"{n_chunks} x {-(-layers // chunk)} recompute chunks x T {tokens} x {kept:.0f} B (chunk inputs)",
                    "recomputed"),
               Line("recomputed chunk", chunk * tokens * per_layer,
                    f"{chunk} layers x T {tokens} x {per_layer:.0f} B ({plan.spec_name}, during backward)",
                    "recomputed chunk")]
    else:
        # selective (core attention) recomputes only what SDPA/flash already keeps small
        # (the log-sum-exp): counted as no recompute.
        out = [Line("activations", n_chunks * layers * tokens * per_layer,
                    f"{n_chunks} x {layers} layers x T {tokens} x {per_layer:.0f} B ({plan.spec_name}, "
                    f"recompute {perf.recompute})", "activations")]
    if last:
        fn = final_norm_bytes_per_token(spec, par, plan.te)
        out.append(Line("final norm", tokens * fn, f"T x {fn:.0f} B", "activations"))
        if lm_head:
            out += _loss_head(plan, tokens)
    return out


def stage_estimate(plan: RunPlan, eng: EngineLines, stage: int) -> StageEstimate:
    """Memory of a rank of the policy's PP stage ``stage``."""
    cfg, par, T = plan.cfg, plan.parallel, plan.T
    last = stage == par.pp - 1
    ranks = stage_ranks(par.tp, plan.dp, par.pp, stage)
    hosting = sorted(plan.engine.hosted.intersection(ranks))  # ranks whose GPU an engine shares
    hosts_engine = bool(hosting)
    held = _held(plan, stage, hosts_engine, eng)

    phases: dict[str, list[Line]] = {}
    if hosts_engine and eng.rollout:
        phases["rollout"] = list(eng.rollout)
    rm_layer = layer_activation_bytes_per_token(plan.models["reward"].spec, plan.rm_parallel, plan.te)
    phases["reward"] = [Line("RM forward (no grad)", plan.T_rm * rm_layer,
                             f"T_rm {plan.T_rm} x {rm_layer:.0f} B (one layer, {plan.spec_name})", "rm_tokens")]
    per_layer = layer_activation_bytes_per_token(plan.pol, par, plan.te)
    T_lp = plan.T_lp
    phases["logprobs"] = [Line("forward (no grad)", T_lp * per_layer, f"T_lp {T_lp} x {per_layer:.0f} B (one layer)",
                               "tokens")]
    if last:
        phases["logprobs"] += _chunked_head(plan, T_lp)
    if "critic" in plan.models:
        phases["train critic"] = _train(plan, stage, plan.models["critic"].spec,
                                        max(cfg.batching.train_tokens_per_microbatch, plan.S), lm_head=False)
    phases["train"] = _train(plan, stage, plan.pol, T, lm_head=True)
    bucket = cfg.weight_sync.bucket_mb
    phases["sync"] = (eng.sync if hosts_engine else []) + [
        Line("sync buffers", 2 * bucket * MiB, f"2 x bucket_mb {bucket} MiB", "sync")]
    if hosts_engine and cfg.rollout.engine == "sglang":
        room = plan.budget - sum(x.bytes for x in held + phases["rollout"])
        phases["rollout"].append(kv_line(plan, eng, room))
    who = f"PP stage {stage} (ranks {ranges(ranks)})" if par.pp > 1 else f"every rank (0-{plan.world - 1})"
    if hosts_engine:
        who += f"; ranks {ranges(hosting)} also host an engine"
    return StageEstimate(who, held, phases)
