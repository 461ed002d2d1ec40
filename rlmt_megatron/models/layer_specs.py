"""Choose the Megatron layer spec: Transformer Engine when it imports, else local + SDPA.

The two specs name the norm weights differently (TE fuses each norm into the following linear);
``uses_te_spec`` tells the checkpoint tables which names to expect. The choice itself,
:func:`picks_te_spec`, needs no Megatron (the dry run asks it too); Megatron is imported only to
build a spec.
"""

from __future__ import annotations

import copy
import importlib.util
from typing import TYPE_CHECKING

from rlmt_megatron.config.model_build import ModelBuildConfig
from rlmt_megatron.errors import RLMTError

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def picks_te_spec(build: ModelBuildConfig) -> bool:
    """The spec ``build`` gets on this machine: ``te`` -> Transformer Engine, ``sdpa`` -> local,
    ``auto`` -> Transformer Engine when it imports. Nothing checks that it can be built here
    (:func:`uses_te_spec` does)."""
    if build.attention_backend == "auto":
        return transformer_engine_available()
    return build.attention_backend == "te"


def uses_te_spec(build: ModelBuildConfig) -> bool:
    """:func:`picks_te_spec`, refusing a choice that cannot be built here."""
    te = picks_te_spec(build)
    if te and not transformer_engine_available():
        raise RLMTError(
            "attention_backend='te' but transformer_engine is not installed; "
            "install the 'te' extra (pip install 'rlmt_megatron[te]') or use 'sdpa'/'auto'"
        )
    if build.precision.fp8 and not te:
        if build.attention_backend == "sdpa":
            raise RLMTError("precision.fp8 needs the Transformer Engine spec (attention_backend te/auto)")
        raise RLMTError(
            f"precision.fp8='{build.precision.fp8}' needs transformer_engine, which is not installed"
        )
    return te


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
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if uses_te_spec(build):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from rlmt_megatron.models.norm import RMSNorm

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[_local_layer_spec()] * num_layers, layer_norm=RMSNorm)
