"""How a Megatron model is built from an HF folder: layout, precision, speed/memory options.

Shared by every role (policy, critic, reference, reward model); consumed by the model builders
and the distributed bootstrap.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveInt

from rlmt_megatron.config.base import StrictModel


class ParallelConfig(StrictModel):
    """Model-parallel layout of one role. Data parallelism is derived: world / (tp * pp)."""

    tp: PositiveInt = Field(1, description="tensor-parallel size")
    pp: PositiveInt = Field(1, description="pipeline-parallel size")
    vpp: Optional[PositiveInt] = Field(
        None, description="virtual pipeline stages per rank (interleaved 1F1B); None = off"
    )
    sequence_parallel: bool = Field(
        False, description="shard activations along the sequence inside TP regions (needs tp > 1)"
    )


class PrecisionConfig(StrictModel):
    """Numerics of one model.

    ``params_dtype`` is the dtype of the weights the model computes with; on CPU only float32 is
    exercised. ``fp8`` selects a Transformer Engine FP8 recipe and requires the TE layer spec.
    """

    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    fp8: Optional[Literal["tensorwise", "delayed", "blockwise", "mxfp8"]] = None
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"


class PerformanceConfig(StrictModel):
    """Speed/memory trade-offs that do not change the numbers a model computes (up to rounding).

    ``fusions``: ``auto`` turns on, on CUDA only, Megatron's fused SwiGLU (torch-compiled, no
    extra dependency) and, with the Transformer Engine spec, fused RoPE and the weight-gradient
    accumulation fused into the GEMM (TE accumulates straight into Megatron DDP's fp32 main_grad).
    Off on CPU, where the unfused path is the one the tests compare with transformers. ``on``
    forces the SwiGLU fusion on CPU too (tests); ``off`` disables all.

    ``recompute``: ``selective`` recomputes core attention in backward (cheap with SDPA/flash,
    whose activations are small anyway); ``full`` recomputes whole layers in chunks of
    ``recompute_layers`` (uniform), trading ~33% more compute for activation memory at long
    sequences.
    """

    fusions: Literal["auto", "on", "off"] = "auto"
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_layers: PositiveInt = Field(1, description="layers per recomputed chunk when recompute='full'")


class ModelBuildConfig(StrictModel):
    """How to build a Megatron model from an HF folder."""

    attention_backend: Literal["auto", "te", "sdpa"] = Field(
        "auto",
        description="auto: Transformer Engine spec when transformer_engine imports, else local "
        "spec with SDPA core attention",
    )
    make_vocab_size_divisible_by: PositiveInt = Field(
        128, description="vocab is padded to a multiple of this times tp (Megatron convention)"
    )
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
