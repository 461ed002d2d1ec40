"""``rlmt-train CONFIG --dry-run``: check a recipe's layouts and estimate GPU memory per rank.

Nothing is built and nothing is started: no GPU, no torch.distributed, no model weights. The dry
run reads the model *shapes*, checks every parallel layout the run would create (the same checks
as at start-up, ``distributed/layout_checks.py``), prints which ranks form which groups, and adds up the
memory one GPU needs in each phase of a step. It fails (``RLMTError``, exit status 2) on an
impossible layout, or when the worst phase of the worst rank does not fit, naming the biggest items
and what to change.

Model shapes
------------
For each model path of the config (``models.policy``, ``reference``, ``critic``, ``reward``):

1. an existing folder: its ``config.json`` (HF folder) or ``rlmt_model.json`` (rlmt Megatron
   checkpoint, which also fixes the padded vocabulary);
2. otherwise ``--assume-shape ROLE=NAME`` for that role, or ``--assume-shape NAME`` for the policy
   and the models that default to it (reference, critic);
3. otherwise the path's name: it is lower-cased, stripped to letters and digits, and matched
   against :data:`NAME_PATTERNS` (``/ckpt/Llama-3.1-8B-Instruct-sft`` -> ``llama3.1-8b``,
   ``Skywork-Reward-Llama-3.1-8B-v0.2`` -> ``llama3.1-8b``);
4. otherwise an error that lists the known shapes.

:data:`KNOWN_SHAPES` holds the hub ``config.json`` fields of the paper's models; they go through
the same parser as a real file. No config field exists for the shape on purpose: the run itself
always reads it from the model folder.

Layout
------
Ranks are numbered as Megatron-Core's default order ``tp-cp-ep-dp-pp`` does (TP fastest, then DP,
then PP): ``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``. The policy, reference and critic use
``build.parallel``; the reward model ``reward.parallel`` (or the same). The rollout engine (SGLang,
one server reached at ``rollout.sglang_url``) has ``weight_sync.engine_tp_size`` GPUs per replica
and ``--engine-dp`` replicas (SGLang's ``--dp-size``; default 1). Colocated, its GPUs are the
first ones of node 0 (the CUDA IPC handles of rank 0 cannot leave that node). Disaggregated, it
has nodes of its own: ``ceil(engine GPUs / gpus per node)`` of the ``--nodes``, the trainer gets
the rest.

Memory per GPU: the lines and their formulas
--------------------------------------------
Notation: ``b`` bytes per parameter of ``build.precision.params_dtype``; ``P`` the parameters a rank
holds of a role (its TP shard of its PP stage, all its virtual chunks; norms replicated over TP,
the embedding and LM head vocabulary-parallel, padded as the builder pads them); ``DP`` the
data-parallel size of that role; ``h`` hidden size, ``q = heads * head_dim``, ``g = kv_heads *
head_dim``, ``f`` FFN size, ``d`` head_dim, ``n`` heads, ``L`` layers, ``V`` the padded vocabulary,
``t`` TP, ``s = t`` with sequence parallelism and 1 without. ``S = data.max_prompt_tokens +
rollout.max_new_tokens`` is the longest sequence; a micro-batch holds
``T = max(max_tokens_per_microbatch, S)`` padded tokens (one sequence always fits; DPO keeps a
pair together: ``max(.., 2 S)``).

Held in every phase (the trainer never offloads):

- ``weights``     ``P * b``
- ``grads``       ``P * 4``: Megatron DDP's gradient buffer, float32 (``ModelRunner`` sets
  ``grad_reduce_in_fp32``)
- ``optimizer``   Adam: ``(4 * [b < 4] + 8) * P / DP``, the float32 main parameters (none when the
  parameters are float32 already) and the moments m and v, sharded over DP by the distributed
  optimizer (not divided without it); SGD: ``(4 * [b < 4] + 4 * [momentum > 0]) * P / DP``
- the same three for the PPO critic (``critic_optim``; value head instead of the LM head)
- ``reference weights`` ``P * b`` when the algorithm needs one (DPO, or ``kl_coef > 0``)
- ``reward weights`` ``P_rm * b`` on the reward layout (the largest of its PP stages)
- ``trainer runtime`` :data:`TRAINER_RUNTIME_GIB`: CUDA context, NCCL communicators, Megatron's
  scratch buffer
- colocated ``hf`` engine (in rank 0's process, never released): ``4 * P_model`` (float32)

Per phase, on top (the peak is the largest phase):

- ``rollout`` (colocated engines)
  - SGLang: ``engine weights`` ``P_model * 2 / engine_tp`` (FP8 sync: decoder linear weights at 1 byte),
    ``engine runtime`` :data:`ENGINE_RUNTIME_GIB` (CUDA graphs, prefill activations, context),
    ``KV cache``: the pool. Full concurrency needs ``ceil(prompts * n / engine_dp) * S * L * 2 *
    max(1, kv_heads / engine_tp) * d * 2`` bytes (every sequence of the step at full length);
    the pool is that, or the memory left in this phase when less (SGLang then runs the step in
    waves), or ``mem_fraction * GPU - engine weights`` with ``--engine-mem-fraction``. It must
    hold at least one full-length sequence. The line says which.
  - vLLM (``SubprocessEngine``, TP 1): ``0.5 * GPU`` (its ``gpu_memory_utilization``).
  - hf: ``KV cache`` ``prompts * n * S * L * 2 * g * 4`` and ``generate logits`` ``prompts * n *
    max_new_tokens * V * 4`` (``output_logits=True``), float32.
- ``reward`` forward of the reward model without gradients: ``A(T_rm)`` (one layer's worth of
  live tensors, an upper bound), ``T_rm = max(reward.max_tokens_per_microbatch,
  min(reward.max_length, S))``.
- ``logprobs`` forward of policy / reference / critic without gradients: ``A(T)``, plus on the
  last stage ``logits`` ``T * V / t * b`` and ``chunk buffers`` ``2 * min(256 MiB, T * V / t * 4)``
  (``training/logprobs.py`` works in float32 chunks, two alive).
- ``train`` (policy) and ``train critic`` (PPO):
  ``activations`` ``k * (L / (pp * vpp)) * A(T)`` with ``k`` the micro-batches a stage holds
  at once: all layers of 1 micro-batch without PP; ``min(pp - stage, m)`` under 1F1B;
  ``min(2 (pp - stage - 1) + (vpp - 1) pp + 1, m vpp)`` chunks under interleaved 1F1B (Megatron's
  warm-up counts), ``m`` the micro-batches per DP rank and update; on the last stage also the
  ``final norm`` (``N * T / s``), ``logits`` ``T * V / t * b``, their ``logits grad`` (same size)
  and the ``chunk buffers`` (policy only; the critic's head is a scalar).
- ``sync``: the engine's weights are back (colocated SGLang), plus ``sync buffers`` ``2 *
  weight_sync.bucket_mb`` MiB (the gathered bucket and its flattened copy).

Per-layer activations kept for backward, without recomputation, bytes per token:

- local spec (SDPA core attention; measured with autograd's saved-tensor hooks in the tests):
  ``A/T = 8d + (16h + 8) / s + (6q + 6g + 10f + 4n) / t``. Norms (``models/norm.py``, each: its
  float32 input copy 4h, the normalised bf16 2h, the output the next linear saves 2h, the
  rsqrt 4); RoPE's cos and sin for q and k (4 x 2d, replicated over TP); the fused QKV output
  (v is a view of it) ``2(q + 2g)``; q and k after RoPE ``2q + 2g``; the attention output (the
  reshape is a view) ``2q``; its log-sum-exp ``4n``; the MLP: fc1 output ``4f``, the linear half
  plus 0 (Megatron's ``glu_linear_offset``) ``2f``, silu ``2f``, their product ``2f``.
  The final norm: ``N = 8h + 4``.
- Transformer Engine spec (derived, not measured here): the norms are fused into the next
  linear, which keeps the norm's input and output (``2h + 2h + 4`` each):
  ``A/T = 8d + (8h + 8) / s + (6q + 6g + 10f + 4n) / t``; the final norm ``N = 4h + 4``.
  ``attention_backend: auto`` uses this when ``transformer_engine`` imports here, else the local
  numbers (the run makes the same choice on its machine: run the dry run there to be exact).

With ``build.performance.recompute: full`` a stage instead keeps, per recomputed chunk of
``recompute_layers`` layers, only the chunk's input (``2h / s`` per token), plus one chunk's
full activations while backward recomputes it (``recompute_layers * A(T)``); Megatron's RoPE
table (``4d`` per token, float32, one storage for every chunk) is left out as for the others.

Not counted: the allocator's fragmentation (:data:`FRAGMENTATION` of the GPU is kept free),
transient gradients inside one layer's backward, and the padding of micro-batches to one shape
under virtual PP (``runner/model_runner.py``), which can make ``T`` larger than assumed.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed.layout_checks import check_model_layout, check_world_size
from rlmt_megatron.errors import LayoutError, RLMTError
from rlmt_megatron.models.hf_config import HFModelSpec, load_hf_config, parse_hf_config

GiB = 2**30
MiB = 2**20

FRAGMENTATION = 0.05  # share of the GPU kept free for the caching allocator's fragmentation
TRAINER_RUNTIME_GIB = 2.0  # CUDA context (~0.5), NCCL communicators of every group, Megatron's scratch buffer
ENGINE_RUNTIME_GIB = 4.0  # SGLang outside its static pool: context, CUDA graphs, prefill activations, sampler
VLLM_GPU_FRACTION = 0.5  # rollout/vllm_engine.py: gpu_memory_utilization
LOGPROB_CHUNK_BYTES = 256 * MiB  # training/logprobs.py DEFAULT_CHUNK_BYTES (two buffers alive)

# Hub config.json fields (meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B): the shapes the recipes use.
KNOWN_SHAPES: dict[str, dict] = {
    "llama3.1-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
}
# Letters and digits of a path that identify a known shape (Skywork's RM is a Llama-3.1-8B).
NAME_PATTERNS: dict[str, tuple[str, ...]] = {
    "llama3.1-8b": ("llama318b",),
    "qwen2.5-7b": ("qwen257b",),
}
POLICY_ROLES = ("policy", "reference", "critic")
ROLES = POLICY_ROLES + ("reward",)


@dataclass
class DryRunOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    assume_shapes: list[str] = field(default_factory=list)  # "NAME" or "ROLE=NAME"
    engine_dp: int = 1
    engine_mem_fraction: Optional[float] = None


# ------------------------------------------------------------------------------------ shapes


def _assumed(options: DryRunOptions) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in options.assume_shapes:
        role, sep, name = item.rpartition("=")
        role = role if sep else ""
        if role and role not in ROLES:
            raise RLMTError(f"--assume-shape {item}: role must be one of {', '.join(ROLES)}")
        if name not in KNOWN_SHAPES:
            raise RLMTError(f"--assume-shape {item}: unknown shape {name!r}; known: {', '.join(KNOWN_SHAPES)}")
        out[role] = name
    return out


def _match_name(path: str) -> list[str]:
    key = re.sub(r"[^a-z0-9]", "", path.lower())
    return [name for name, pats in NAME_PATTERNS.items() if any(p in key for p in pats)]


@dataclass
class ResolvedModel:
    spec: HFModelSpec
    how: str  # where the shape came from
    padded_vocab: Optional[int] = None  # fixed by an rlmt checkpoint


def resolve_model(path: str, role: str, field_name: str, assumed: dict[str, str]) -> ResolvedModel:
    """The shape of the model at ``path`` (see the module docstring for the order)."""
    p = Path(path)
    if p.exists():
        meta = p / "rlmt_model.json"
        if meta.is_file():
            from rlmt_megatron.checkpoint.dist_ckpt import read_checkpoint_meta

            m = read_checkpoint_meta(p)
            loads_as = {"reference": "policy"}.get(role, role)  # as trainer/roles.py loads it
            if m["role"] != loads_as:
                raise RLMTError(f"{field_name}={path}: checkpoint holds a {m['role']} model, but the run loads it "
                                f"as a {loads_as}")
            return ResolvedModel(parse_hf_config(m["hf_config"], str(meta)), f"{meta}", int(m["padded_vocab_size"]))
        return ResolvedModel(load_hf_config(p), str(p / "config.json"))
    name = assumed.get(role) or (assumed.get("") if role in POLICY_ROLES else None)
    if name:
        return ResolvedModel(parse_hf_config(KNOWN_SHAPES[name], f"built-in shape {name}"),
                             f"assumed {name} (--assume-shape; {path} does not exist)")
    matches = _match_name(path)
    if len(matches) == 1:
        return ResolvedModel(parse_hf_config(KNOWN_SHAPES[matches[0]], f"built-in shape {matches[0]}"),
                             f"assumed {matches[0]} (from the name; {path} does not exist)")
    flag = "--assume-shape NAME" if role in POLICY_ROLES else f"--assume-shape {role}=NAME"
    why = "matches several known shapes" if matches else "matches no known shape"
    raise RLMTError(f"{field_name}={path}: no such folder to read config.json from, and the name {why}; "
                    f"pass {flag} with NAME one of {', '.join(KNOWN_SHAPES)}")


# ------------------------------------------------------------------------------------ layout


def rank_groups(tp: int, dp: int, pp: int) -> dict[str, list[list[int]]]:
    """TP, DP and PP groups of Megatron-Core's default rank order (``tp-cp-ep-dp-pp``)."""
    def rank(t, d, s):
        return t + tp * (d + dp * s)

    return {
        "tp": [[rank(t, d, s) for t in range(tp)] for s in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, s) for d in range(dp)] for s in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, s) for s in range(pp)] for d in range(dp) for t in range(tp)],
    }


def _ranges(ranks: list[int]) -> str:
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(out)


def _groups(groups: list[list[int]], limit: int = 4) -> str:
    shown = " ".join(f"[{_ranges(g)}]" for g in groups[:limit])
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
        stages = "; ".join(f"stage {s}: ranks {_ranges(sorted(r for grp in g['tp'][s * self.dp:(s + 1) * self.dp] for r in grp))}"
                           for s in range(p.pp))
        return [f"TP={p.tp} PP={p.pp} DP={self.dp} VPP={p.vpp or '-'} SP={'on' if p.sequence_parallel else 'off'}"
                f" over {self.world} ranks",
                f"  TP groups: {_groups(g['tp'])}", f"  DP groups: {_groups(g['dp'])}",
                f"  PP: {stages}"]


def _check_layout(parallel: ParallelConfig, world: int, model: ResolvedModel, what: str) -> None:
    try:
        check_world_size(parallel, world)
        check_model_layout(parallel, model.spec)
    except LayoutError as e:
        raise LayoutError(f"{what}: {e}") from None
    if model.padded_vocab is not None and model.padded_vocab % parallel.tp:
        raise LayoutError(f"{what}: {model.how}: padded vocabulary {model.padded_vocab} is not divisible by tp={parallel.tp}")


# ------------------------------------------------------------------------------------ arithmetic


def padded_vocab(model: ResolvedModel, tp: int, divisible_by: int) -> int:
    """As ``models/builder.py`` pads it (or as the checkpoint fixed it)."""
    if model.padded_vocab is not None:
        return model.padded_vocab
    multiple = divisible_by * tp
    return -(-model.spec.vocab_size // multiple) * multiple


def layer_params(spec: HFModelSpec, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (the two norms are replicated)."""
    h, f = spec.hidden_size, spec.intermediate_size
    q, g = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    sharded = h * (q + 2 * g) + q * h + 3 * h * f + ((q + 2 * g) if spec.qkv_bias else 0)
    return sharded // tp + 2 * h


def stage_params(spec: HFModelSpec, role: str, parallel: ParallelConfig, vocab: int, stage: int) -> int:
    """Parameters a rank of PP stage ``stage`` holds of ``role`` (all its virtual chunks)."""
    tp, pp = parallel.tp, parallel.pp
    n = spec.num_hidden_layers // pp * layer_params(spec, tp)
    if stage == 0:
        n += vocab * spec.hidden_size // tp  # embedding
    if stage == pp - 1:
        n += spec.hidden_size  # final norm
        if role == "policy":
            if not (spec.tie_word_embeddings and pp == 1):  # tied under PP: the last stage keeps a copy
                n += vocab * spec.hidden_size // tp
        else:
            n += spec.hidden_size + (1 if role == "critic" else 0)  # scalar head (critic with bias)
    return n


def hf_model_params(spec: HFModelSpec) -> int:
    """Parameters of the whole HF causal LM (what an engine loads)."""
    head = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    return (spec.num_hidden_layers * layer_params(spec, 1) + spec.vocab_size * spec.hidden_size + head
            + spec.hidden_size)


def layer_activation_bytes_per_token(spec: HFModelSpec, parallel: ParallelConfig, te: bool) -> float:
    """Bytes one decoder layer keeps for backward per token (module docstring: the formulas)."""
    h, f, d, n = spec.hidden_size, spec.intermediate_size, spec.head_dim, spec.num_attention_heads
    q, g = n * d, spec.num_key_value_heads * d
    t = parallel.tp
    s = t if parallel.sequence_parallel else 1
    norms = (8 * h + 8) if te else (16 * h + 8)
    return 8 * d + norms / s + (6 * q + 6 * g + 10 * f + 4 * n) / t


def recompute_input_bytes_per_token(spec: HFModelSpec, parallel: ParallelConfig) -> float:
    """Full recomputation keeps each recomputed chunk's input hidden states (bf16, sequence-
    sharded under sequence parallelism) and nothing else of the chunk until backward."""
    s = parallel.tp if parallel.sequence_parallel else 1
    return 2 * spec.hidden_size / s


def final_norm_bytes_per_token(spec: HFModelSpec, parallel: ParallelConfig, te: bool) -> float:
    s = parallel.tp if parallel.sequence_parallel else 1
    return ((4 if te else 8) * spec.hidden_size + 4) / s


def inflight_chunks(pp: int, vpp: Optional[int], stage: int, microbatches: int) -> tuple[int, int]:
    """(model chunks of activations a stage holds at its peak, layers per chunk divisor pp*vpp)."""
    if pp == 1:
        return 1, 1
    if not vpp:
        return min(pp - stage, microbatches), pp
    warmup = 2 * (pp - stage - 1) + (vpp - 1) * pp
    return min(warmup + 1, microbatches * vpp), pp * vpp


def kv_bytes_per_token(spec: HFModelSpec, engine_tp: int, elem: int = 2) -> float:
    """KV cache bytes per token on one engine GPU (KV heads replicated when TP > KV heads)."""
    heads = max(1.0, spec.num_key_value_heads / engine_tp)
    return spec.num_hidden_layers * 2 * heads * spec.head_dim * elem


def engine_weight_bytes(spec: HFModelSpec, engine_tp: int, fp8: bool) -> float:
    total = hf_model_params(spec)
    if not fp8:
        return total * 2 / engine_tp
    linears = spec.num_hidden_layers * (layer_params(spec, 1) - 2 * spec.hidden_size)
    return (linears * 1 + (total - linears) * 2) / engine_tp


def uses_te(attention_backend: str) -> bool:
    """The spec the builder would pick here (``models/layer_specs.py``), without importing Megatron."""
    if attention_backend == "te":
        return True
    if attention_backend == "sdpa":
        return False
    return importlib.util.find_spec("transformer_engine") is not None


# ------------------------------------------------------------------------------------ estimate


@dataclass
class Line:
    name: str
    bytes: float
    formula: str
    fix: Optional[str] = None  # key of _ADVICE: what lowers this line


@dataclass
class StageEstimate:
    title: str
    persistent: list[Line]
    phases: dict[str, list[Line]]

    def total(self, phase: str) -> float:
        return sum(x.bytes for x in self.persistent) + sum(x.bytes for x in self.phases[phase])

    def peak(self) -> tuple[str, float]:
        return max(((p, self.total(p)) for p in self.phases), key=lambda x: x[1])


@dataclass
class DryRunReport:
    header: list[str]
    layout: list[str]
    stages: list[StageEstimate]
    engine_gpu: Optional[StageEstimate]  # disaggregated engine's own GPUs
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
        out += [""] + [f"note: {n}" for n in self.notes]
        out.append("dry run: OK" if self.ok else "dry run: FAILED")
        return "\n".join(out).rstrip() + "\n"

    def check(self) -> None:
        if self.problems:
            raise RLMTError("dry run: " + "\n".join(self.problems))


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


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


@dataclass
class _Plan:
    """What every line is computed from: the resolved models, where things run, token counts."""

    cfg: object
    o: DryRunOptions
    models: dict[str, ResolvedModel]
    world: int
    engine_tp: int
    engine_gpus: int
    engine_where: str
    gpu: float
    budget: float

    def __post_init__(self):
        cfg, a = self.cfg, self.cfg.algorithm
        self.build = cfg.build
        self.parallel = cfg.build.parallel
        self.rm_parallel = cfg.reward.parallel or cfg.build.parallel
        self.dp = self.world // (self.parallel.tp * self.parallel.pp)
        self.pol = self.models["policy"].spec
        self.b = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.build.precision.params_dtype]
        self.te = uses_te(cfg.build.attention_backend)
        self.spec_name = "Transformer Engine" if self.te else "local + SDPA"
        self.samples = cfg.data.prompts_per_step * cfg.rollout.samples_per_prompt
        self.updates = a.updates_per_rollout if a.name != "dpo" else 1
        S = self.S = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
        unit = 2 if a.name == "dpo" else 1  # a DPO pair stays in one micro-batch
        self.T = max(cfg.optim.max_tokens_per_microbatch, unit * S)
        sequences = 2 * min(cfg.data.prompts_per_step, self.samples) if a.name == "dpo" else self.samples
        per_rank = -(-sequences // (self.dp * self.updates))
        self.microbatches = -(-per_rank // (max(1, self.T // (unit * S)) * unit))
        self.T_rm = max(cfg.reward.max_tokens_per_microbatch, min(cfg.reward.max_length or S, S))
        self.V = self.vocab("policy", self.parallel)

    def vocab(self, role: str, parallel: ParallelConfig) -> int:
        return padded_vocab(self.models[role], parallel.tp, self.build.make_vocab_size_divisible_by)


def _check_options(o: DryRunOptions) -> None:
    for name in ("nodes", "gpus_per_node", "engine_dp"):
        if getattr(o, name) < 1:
            raise RLMTError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}")
    if o.gpu_mem_gib <= 0:
        raise RLMTError(f"--gpu-mem-gib must be > 0, got {o.gpu_mem_gib}")
    if o.engine_mem_fraction is not None and not 0 < o.engine_mem_fraction < 1:
        raise RLMTError(f"--engine-mem-fraction must be in (0, 1), got {o.engine_mem_fraction}")


def _resolve_models(cfg, assumed: dict[str, str]) -> dict[str, ResolvedModel]:
    """Every model the run builds (as ``trainer/roles.py`` decides), by role."""
    m = cfg.models
    models = {"policy": resolve_model(m.policy, "policy", "models.policy", assumed)}
    if cfg.needs_reference:
        models["reference"] = (resolve_model(m.reference, "reference", "models.reference", assumed)
                               if m.reference else models["policy"])
    if cfg.algorithm.name == "ppo":
        models["critic"] = resolve_model(m.critic, "critic", "models.critic", assumed) if m.critic else models["policy"]
    models["reward"] = resolve_model(m.reward, "reward", "models.reward", assumed)
    return models


def _plan(cfg, o: DryRunOptions) -> _Plan:
    """Resolve shapes and placement and check every layout (raises LayoutError/RLMTError)."""
    _check_options(o)
    models = _resolve_models(cfg, _assumed(o))
    r = cfg.rollout
    engine_tp = cfg.weight_sync.engine_tp_size if r.engine == "sglang" else 1
    engine_gpus = engine_tp * o.engine_dp
    if r.engine != "sglang" and o.engine_dp != 1:
        raise RLMTError(f"--engine-dp applies to rollout.engine=sglang, not {r.engine}")
    trainer_nodes = o.nodes
    if r.placement == "disaggregated":
        engine_nodes = -(-engine_gpus // o.gpus_per_node)
        trainer_nodes = o.nodes - engine_nodes
        if trainer_nodes < 1:
            raise LayoutError(f"rollout.placement=disaggregated: the engine needs {engine_gpus} GPUs "
                              f"(engine_tp_size {engine_tp} x --engine-dp {o.engine_dp}) = {engine_nodes} node(s), "
                              f"leaving none of the {o.nodes} for the trainer; raise --nodes")
        where = f"its own {engine_nodes} node(s) ({engine_gpus} GPUs)"
    else:
        if engine_gpus > o.gpus_per_node:
            raise LayoutError(f"rollout.placement=colocated: the engine's {engine_gpus} GPUs (engine_tp_size "
                              f"{engine_tp} x --engine-dp {o.engine_dp}) must be on rank 0's node "
                              f"({o.gpus_per_node} GPUs): CUDA IPC handles cannot leave it")
        where = f"GPU(s) {_ranges(list(range(engine_gpus)))} of node 0, shared with the trainer"
    world = trainer_nodes * o.gpus_per_node
    rm_parallel = cfg.reward.parallel or cfg.build.parallel
    for role, res in models.items():
        _check_layout(rm_parallel if role == "reward" else cfg.build.parallel, world, res, f"{role} ({res.how})")
    pol = models["policy"].spec
    if r.engine == "sglang":
        if pol.num_attention_heads % engine_tp:
            raise LayoutError(f"weight_sync.engine_tp_size={engine_tp}: the policy's {pol.num_attention_heads} "
                              f"attention heads do not split over it")
        kv = pol.num_key_value_heads
        if kv % engine_tp and engine_tp % kv:
            raise LayoutError(f"weight_sync.engine_tp_size={engine_tp}: the policy's {kv} KV heads neither split "
                              f"over it nor replicate evenly")
    gpu = o.gpu_mem_gib * GiB
    plan = _Plan(cfg, o, models, world, engine_tp, engine_gpus, where, gpu, gpu * (1 - FRAGMENTATION))
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


def _layout_lines(plan: _Plan) -> list[str]:
    cfg, r = plan.cfg, plan.cfg.rollout
    names = ", ".join(x for x in POLICY_ROLES if x in plan.models)
    pol = RoleLayout(plan.parallel, plan.world).describe()
    out = [f"{names}: {pol[0]}"] + pol[1:]
    if plan.rm_parallel != plan.parallel:
        rm = RoleLayout(plan.rm_parallel, plan.world).describe()
        out += [f"reward: {rm[0]}"] + rm[1:]
    else:
        out.append("reward: the policy's layout")
    if r.engine == "sglang":
        out.append(f"rollout engine: sglang at {r.sglang_url}, TP={plan.engine_tp} x DP={plan.o.engine_dp} on "
                   f"{plan.engine_where}; weights via {_transport(cfg)}")
    else:
        out.append(f"rollout engine: {r.engine} beside rank 0 ({r.placement}); weights via {_transport(cfg)}")
    return out


@dataclass
class _EngineLines:
    rollout: list[Line] = field(default_factory=list)  # while generating
    sync: list[Line] = field(default_factory=list)  # while receiving weights
    resident: list[Line] = field(default_factory=list)  # always (the hf engine)
    kv_need: float = 0.0  # KV bytes per GPU for every sequence of the step at full length
    kv_per_token: float = 0.0


def _engine_lines(plan: _Plan) -> _EngineLines:
    cfg, pol, S, n = plan.cfg, plan.pol, plan.S, plan.samples
    r = cfg.rollout
    if r.engine == "sglang":
        fp8 = cfg.weight_sync.fp8 != "none"
        ew = engine_weight_bytes(pol, plan.engine_tp, fp8)
        kv_tok = kv_bytes_per_token(pol, plan.engine_tp)
        weights = Line("engine weights", ew, f"{hf_model_params(pol) / 1e9:.2f}B x {'1-2' if fp8 else 2} B "
                       f"/ engine TP {plan.engine_tp}", "engine")
        return _EngineLines(
            rollout=[weights, Line("engine runtime", ENGINE_RUNTIME_GIB * GiB,
                                   "ENGINE_RUNTIME_GIB (CUDA graphs, prefill, context)", "engine")],
            sync=[Line("engine weights", ew, "resumed before the push", "engine")],
            kv_need=-(-n // plan.o.engine_dp) * S * kv_tok, kv_per_token=kv_tok)
    if r.engine == "vllm":
        return _EngineLines(rollout=[Line("vllm engine", VLLM_GPU_FRACTION * plan.gpu,
                                          f"{VLLM_GPU_FRACTION} x GPU (gpu_memory_utilization)", "engine")])
    kv = n * S * pol.num_hidden_layers * 2 * pol.num_key_value_heads * pol.head_dim * 4
    return _EngineLines(
        resident=[Line("hf engine weights", 4 * hf_model_params(pol), "whole model, float32, never released", "hf")],
        rollout=[Line("hf engine KV cache", kv, f"{n} seqs x {S} tokens x L x 2 x g x 4 B", "hf"),
                 Line("hf generate logits", n * r.max_new_tokens * pol.vocab_size * 4,
                      f"{n} seqs x {r.max_new_tokens} x V x 4 B (output_logits)", "hf")])


def _kv_line(plan: _Plan, eng: _EngineLines, room: float) -> Line:
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
    return Line("KV cache", pool, f"{how}: holds {seqs} of {-(-plan.samples // o.engine_dp)} sequences at "
                                  f"{plan.S} tokens (full: {_gib(eng.kv_need)})", "kv")


def _stage(plan: _Plan, eng: _EngineLines, stage: int) -> StageEstimate:
    """Memory of a rank of the policy's PP stage ``stage``."""
    cfg, par, b, T, V, pol = plan.cfg, plan.parallel, plan.b, plan.T, plan.V, plan.pol
    pp, last = par.pp, stage == par.pp - 1
    ranks = sorted(x for g in rank_groups(par.tp, plan.dp, pp)["tp"][stage * plan.dp:(stage + 1) * plan.dp] for x in g)
    hosts_engine = cfg.rollout.placement == "colocated" and any(x < plan.engine_gpus for x in ranks)

    held = _train_state("policy", stage_params(pol, "policy", par, V, stage), b, cfg.optim, plan.dp)
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

    def logits(tokens: int, grad: bool) -> list[Line]:
        lg = tokens * V / par.tp * b
        out = [Line("logits", lg, f"T x V {V} / TP x {b} B", "logits")]
        if grad:
            out.append(Line("logits grad", lg, "same size", "logits"))
        return out + [Line("chunk buffers", 2 * min(LOGPROB_CHUNK_BYTES, lg / b * 4),
                           "2 x min(256 MiB, T x V / TP x 4 B)", "logits")]

    n_chunks, div = inflight_chunks(pp, par.vpp, stage, plan.microbatches)

    def train(spec: HFModelSpec, tokens: int, lm_head: bool) -> list[Line]:
        per_layer = layer_activation_bytes_per_token(spec, par, plan.te)
        layers = spec.num_hidden_layers // div
        perf = cfg.build.performance
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
                out += logits(tokens, grad=True)
        return out

    phases: dict[str, list[Line]] = {}
    if hosts_engine and eng.rollout:
        phases["rollout"] = list(eng.rollout)
    rm_layer = layer_activation_bytes_per_token(rm, rm_par, plan.te)
    phases["reward"] = [Line("RM forward (no grad)", plan.T_rm * rm_layer,
                             f"T_rm {plan.T_rm} x {rm_layer:.0f} B (one layer, {plan.spec_name})", "rm_tokens")]
    per_layer = layer_activation_bytes_per_token(pol, par, plan.te)
    phases["logprobs"] = [Line("forward (no grad)", T * per_layer, f"T {T} x {per_layer:.0f} B (one layer)", "tokens")]
    if last:
        phases["logprobs"] += logits(T, grad=False)
    if "critic" in plan.models:
        phases["train critic"] = train(plan.models["critic"].spec,
                                       max(cfg.critic_optim.max_tokens_per_microbatch, plan.S), lm_head=False)
    phases["train"] = train(pol, T, lm_head=True)
    bucket = cfg.weight_sync.bucket_mb
    phases["sync"] = (eng.sync if hosts_engine else []) + [
        Line("sync buffers", 2 * bucket * MiB, f"2 x bucket_mb {bucket} MiB", "sync")]
    if hosts_engine and cfg.rollout.engine == "sglang":
        room = plan.budget - sum(x.bytes for x in held + phases["rollout"])
        phases["rollout"].append(_kv_line(plan, eng, room))
    who = f"PP stage {stage} (ranks {_ranges(ranks)})" if pp > 1 else f"every rank (0-{plan.world - 1})"
    if hosts_engine:
        who += f"; ranks {_ranges([x for x in ranks if x < plan.engine_gpus])} also host the engine"
    return StageEstimate(who, held, phases)


def estimate(cfg, options: DryRunOptions) -> DryRunReport:
    """Check the layouts of ``cfg`` (an ``RLMTConfig``) and estimate memory per GPU.

    Raises ``LayoutError``/``RLMTError`` for a layout or setup that cannot start; a budget that
    does not fit is reported in ``problems`` (``report.check()`` raises it), so the whole table
    can be printed first.
    """
    plan = _plan(cfg, options)
    eng = _engine_lines(plan)
    stages = [_stage(plan, eng, s) for s in sorted({0, plan.parallel.pp - 1})]
    engine_gpu = None
    if cfg.rollout.placement == "disaggregated" and cfg.rollout.engine == "sglang":
        room = plan.budget - sum(x.bytes for x in eng.rollout)
        engine_gpu = StageEstimate(f"disaggregated engine GPU (TP {plan.engine_tp} x DP {options.engine_dp})", [],
                                   {"rollout": eng.rollout + [_kv_line(plan, eng, room)]})
    o, a, r = options, cfg.algorithm, cfg.rollout
    header = [f"dry run: {o.nodes} node(s) x {o.gpus_per_node} GPUs of {o.gpu_mem_gib:g} GiB; trainer world "
              f"{plan.world}; {a.name}, rollout {r.engine} {r.placement}", "models:"]
    header += [f"  {role:<9} {res.how}" for role, res in plan.models.items()]
    header.append(f"tokens: longest sequence S={plan.S}, train micro-batch T={plan.T}, {plan.microbatches} "
                  f"micro-batch(es) per DP rank and update, RM micro-batch {plan.T_rm}; layer spec {plan.spec_name}")
    report = DryRunReport(header, _layout_lines(plan), stages, engine_gpu, [], plan.budget, plan.gpu)
    _judge(report, plan, eng)
    return report


def _judge(report: DryRunReport, plan: _Plan, eng: _EngineLines) -> None:
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
            report.problems.append(f"{est.title}: the rollout KV cache gets {_gib(kv.bytes)}, less than one sequence "
                                   f"of {plan.S} tokens ({_gib(one_seq)}); raise weight_sync.engine_tp_size, use "
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


def _transport(cfg) -> str:
    from rlmt_megatron.rollout.weight_sync.select import resolve_transport

    return resolve_transport(cfg.rollout.engine, cfg.rollout.placement, cfg.weight_sync.transport)


TP_PP = "raise build.parallel.tp or pp"
_ADVICE: dict[str, tuple[str, ...]] = {  # Line.fix -> what lowers that line
    "activations": ("lower optim.max_tokens_per_microbatch (not below the longest sequence)",
                    "turn on build.parallel.sequence_parallel",
                    "set build.performance.recompute=full (~1/3 more compute)", TP_PP),
    "recomputed": ("lower optim.max_tokens_per_microbatch (not below the longest sequence)",
                   "turn on build.parallel.sequence_parallel", TP_PP),
    "recomputed chunk": ("lower build.performance.recompute_layers", "lower optim.max_tokens_per_microbatch"),
    "tokens": ("lower optim.max_tokens_per_microbatch",),
    "logits": ("lower optim.max_tokens_per_microbatch", "raise build.parallel.tp"),
    "optimizer": ("add nodes (the distributed optimizer shards over DP)", TP_PP),
    "model": (TP_PP,),
    "reference": (TP_PP, "set algorithm.kl_coef: 0 (no reference model)"),
    "reward": ("give the reward model a larger reward.parallel.tp",),
    "rm_tokens": ("lower reward.max_tokens_per_microbatch",),
    "engine": ("raise weight_sync.engine_tp_size", "use rollout.placement=disaggregated"),
    "kv": ("lower --engine-mem-fraction, data.prompts_per_step or rollout.max_new_tokens",
           "raise weight_sync.engine_tp_size"),
    "hf": ("use rollout.engine=sglang (the hf engine keeps a float32 copy and every logit)",),
    "sync": ("lower weight_sync.bucket_mb",),
}


def _over_budget(est: StageEstimate, phase: str, peak: float, budget: float) -> str:
    items = sorted(est.persistent + est.phases[phase], key=lambda x: -x.bytes)[:3]
    advice = list(dict.fromkeys(a for x in items if x.fix for a in _ADVICE[x.fix]))
    biggest = ", ".join(f"{x.name} {_gib(x.bytes)}" for x in items)
    return (f"{est.title}: needs {_gib(peak)} in phase {phase}, more than the {_gib(budget)} usable. "
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
