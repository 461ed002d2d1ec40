"""Choose the Megatron layer spec: Transformer Engine when it imports, else local + SDPA.

The two specs name the norm weights differently (TE fuses each norm into the following linear);
``uses_te_spec`` tells the checkpoint tables which names to expect.
"""

from __future__ import annotations

import copy
import importlib.util

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from rlmt_megatron.config.model_build import ModelBuildConfig
from rlmt_megatron.errors import RLMTError


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def uses_te_spec(build: ModelBuildConfig) -> bool:
    if build.attention_backend == "te":
        if not transformer_engine_available():
            raise RLMTError(
                "attention_backend='te' but transformer_engine is not installed; "
                "install the 'te' extra (pip install 'rlmt_megatron[te]') or use 'sdpa'/'auto'"
            )
        return True
    if build.attention_backend == "sdpa":
        if build.precision.fp8:
            raise RLMTError("precision.fp8 needs the Transformer Engine spec (attention_backend te/auto)")
        return False
    available = transformer_engine_available()
    if build.precision.fp8 and not available:
        raise RLMTError(
            f"precision.fp8='{build.precision.fp8}' needs transformer_engine, which is not installed"
        )
    return available


def _local_layer_spec() -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from rlmt_megatron.models.norm import RMSNorm
    from rlmt_megatron.models.sdpa_attention import SDPACoreAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def decoder_block_spec(build: ModelBuildConfig, config, vp_stage: int | None) -> TransformerBlockSubmodules | ModuleSpec:
    """The decoder spec for this rank's (virtual) pipeline stage."""
    if uses_te_spec(build):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from rlmt_megatron.models.norm import RMSNorm

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[_local_layer_spec()] * num_layers, layer_norm=RMSNorm)
