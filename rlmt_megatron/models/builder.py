"""Build Megatron-Core GPTModels for the three roles from an HF config.

- policy: the LM head (tied to the embedding when the HF model ties them);
- critic: the same body with a per-token scalar value head;
- reward: the same body with a scalar score head equal to HF ``*ForSequenceClassification.score``
  (the score is read at the last non-pad token by the caller).

Both heads replace GPTModel's ``output_layer`` with :class:`ScalarHead`, so GPTModel's own forward,
pipeline handling and checkpointing stay untouched: the "logits" it returns are [b, s, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from rlmt_megatron.config.model_build import ModelBuildConfig
from rlmt_megatron.distributed.layout_checks import check_model_layout
from rlmt_megatron.errors import LayoutError
from rlmt_megatron.models.hf_config import HFModelSpec

Role = Literal["policy", "critic", "reward"]
ROLES: tuple[str, ...] = ("policy", "critic", "reward")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ScalarHead(torch.nn.Module):
    """hidden [s, b, h] -> [s, b, 1], replicated on every TP rank.

    Called with GPTModel's output-layer signature. Under sequence parallelism the input is a
    sequence shard, so it is gathered first; the weight's gradient is then identical on every
    TP rank and needs no extra reduction.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype, sequence_parallel: bool, bias: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype)) if bias else None
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden)
        # float32 output: a bf16 score is spaced 0.0625 at |r| in [8, 16), which would merge the
        # small within-group reward differences GRPO normalises.
        bias = None if self.bias is None else self.bias.float()
        return F.linear(hidden.float(), self.weight.float(), bias), None


def padded_vocab_size(vocab_size: int, build: ModelBuildConfig) -> int:
    multiple = build.make_vocab_size_divisible_by * build.parallel.tp
    return -(-vocab_size // multiple) * multiple


def _apex_wgrad_kernel_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def _performance_options(build: ModelBuildConfig, on_cpu: bool) -> dict:
    """TransformerConfig fields from ``build.performance`` (see PerformanceConfig for why each)."""
    from rlmt_megatron.models.layer_specs import uses_te_spec

    perf = build.performance
    fuse = perf.fusions == "on" or (perf.fusions == "auto" and not on_cpu)
    te = uses_te_spec(build)
    options = dict(
        bias_activation_fusion=fuse,
        # TE's fused RoPE kernel (the local spec has none without Apex, not a dependency).
        apply_rope_fusion=fuse and te and not on_cpu,
        # The flag is model-wide: GPTModel's output layer is Megatron's own ColumnParallelLinear
        # even under the TE spec, and that layer needs Apex's fused_weight_gradient_mlp_cuda
        # (it raises at construction without it), so only when that kernel is importable.
        gradient_accumulation_fusion=fuse and te and not on_cpu and _apex_wgrad_kernel_available(),
    )
    if perf.recompute == "selective":
        options.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif perf.recompute == "full":
        options.update(recompute_granularity="full", recompute_method="uniform",
                       recompute_num_layers=perf.recompute_layers)
    return options


def transformer_config(spec: HFModelSpec, build: ModelBuildConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[build.precision.params_dtype]
    on_cpu = not torch.cuda.is_available()
    p = build.parallel
    fp8 = {}
    if build.precision.fp8:
        fp8 = dict(fp8=build.precision.fp8_format, fp8_recipe=build.precision.fp8)
    config = TransformerConfig(
        **_performance_options(build, on_cpu),
        num_layers=spec.num_hidden_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.intermediate_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_key_value_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        # Always on, even when a checkpoint overwrites every weight next: Megatron-Core 0.16
        # tags TP-sharded weights (tensor_model_parallel, partition_dim) only inside its init
        # functions, and without the tags the grad norm counts sharded weights on one TP rank.
        perform_initialization=True,
        **fp8,
    )
    # Micro-batches of different lengths cross pipeline stages (token-budget batching), so PP
    # must exchange shapes first. Set after construction: __post_init__ rejects the flag for
    # MoE's default token dispatcher, which dense models never build. The interleaved schedule
    # (virtual PP) deadlocks with it in Megatron-Core 0.16, so under virtual PP the engine pads
    # every micro-batch to one shape instead.
    config.variable_seq_lengths = p.vpp is None
    if on_cpu:
        # gloo matches point-to-point messages between two ranks in posting order (one tag).
        # Batched p2p posts the forward activation and the backward gradient to the same peer
        # at once when PP=2 (next == prev), so the interleaved schedule can receive one as the
        # other: same shape, silently wrong numbers. Unbatched p2p posts them in an order
        # both sides agree on.
        config.batch_p2p_comm = False
    return config


@dataclass
class BuiltModel:
    """A role's model on this rank: one GPTModel chunk per virtual pipeline stage."""

    spec: HFModelSpec
    build: ModelBuildConfig
    role: str
    chunks: list  # list[GPTModel]
    padded_vocab_size: int

    @property
    def sequence_multiple(self) -> int:
        """Sequence lengths fed to the model must be multiples of this: TP under sequence
        parallelism (each rank holds s/tp tokens), times 16 under FP8 (32 for mxfp8), because
        Transformer Engine's FP8 GEMMs require the token dimension to be divisible by it."""
        p = self.build.parallel
        tp = p.tp if p.sequence_parallel else 1
        fp8 = {None: 1, "mxfp8": 32}.get(self.build.precision.fp8, 16)
        return tp * fp8

    @property
    def tied_embeddings(self) -> bool:
        return self.role == "policy" and self.spec.tie_word_embeddings


def _apply_llama3_rope_scaling(model, spec: HFModelSpec) -> None:
    """Megatron hard-codes Llama 3.1's low/high factors and 8192 context; use the config's."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None or spec.rope_scaling is None:
        return
    s = spec.rope_scaling
    dim = spec.head_dim
    base = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rotary.inv_freq = rotary._apply_scaling(
        base.to(rotary.inv_freq.device),
        factor=s.factor,
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position_embeddings,
    )


def build_model(
    spec: HFModelSpec,
    role: Role,
    build: ModelBuildConfig,
    padded_vocab: int | None = None,
) -> BuiltModel:
    """Build this rank's chunks of ``role`` for ``spec`` (parallel state must be initialised).

    ``padded_vocab`` overrides the padded vocabulary size (a checkpoint saved at another TP
    size keeps its own padding; it must still split evenly over this TP size).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from rlmt_megatron.models.layer_specs import decoder_block_spec

    if role not in ROLES:
        raise ValueError(f"role '{role}' is not one of {ROLES}")
    check_model_layout(build.parallel, spec)
    config = transformer_config(spec, build)
    vocab = padded_vocab or padded_vocab_size(spec.vocab_size, build)
    if vocab % build.parallel.tp != 0:
        raise LayoutError(f"{spec.source}: padded vocabulary {vocab} is not divisible by tp={build.parallel.tp}")
    vpp = build.parallel.vpp
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(build, config, stage),
            vocab_size=vocab,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=role == "policy" and spec.tie_word_embeddings,
            parallel_output=True,
            position_embedding_type="rope",
            rotary_base=spec.rope_theta,
            rope_scaling=spec.rope_scaling is not None,
            rope_scaling_factor=spec.rope_scaling.factor if spec.rope_scaling else 8.0,
            vp_stage=stage,
        )
        _apply_llama3_rope_scaling(model, spec)
        if post and role != "policy":
            # Critic: HF *ForTokenClassification's score has a bias; the RM's classifier has none.
            model.output_layer = ScalarHead(
                spec.hidden_size, config.params_dtype, config.sequence_parallel, bias=role == "critic"
            )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return BuiltModel(spec=spec, build=build, role=role, chunks=chunks, padded_vocab_size=vocab)
