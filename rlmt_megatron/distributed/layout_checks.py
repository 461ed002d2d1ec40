"""Checks that a parallel layout can work, with messages that name the broken constraint.

Megatron asserts the same things deep inside its constructors; checking them first turns an
``AssertionError`` from ``megatron/core/...`` into a sentence the user can act on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlmt_megatron.errors import LayoutError

if TYPE_CHECKING:
    from rlmt_megatron.config.model_build import ParallelConfig
    from rlmt_megatron.models.hf_config import HFModelSpec


def check_world_size(parallel: "ParallelConfig", world_size: int) -> None:
    model_parallel = parallel.tp * parallel.pp
    if world_size % model_parallel != 0:
        raise LayoutError(
            f"world size {world_size} is not divisible by tp*pp = {parallel.tp}*{parallel.pp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes or change tp/pp"
        )
    if parallel.sequence_parallel and parallel.tp == 1:
        raise LayoutError("sequence_parallel=true needs tp > 1")
    if parallel.vpp is not None and parallel.pp < 2:
        raise LayoutError(f"vpp={parallel.vpp} (virtual pipeline) needs pp >= 2, got pp={parallel.pp}")


def check_model_layout(parallel: "ParallelConfig", spec: "HFModelSpec") -> None:
    """Raise LayoutError if ``spec`` cannot be split as ``parallel`` asks."""
    src = spec.source
    if spec.num_attention_heads % parallel.tp != 0:
        raise LayoutError(
            f"{src}: num_attention_heads={spec.num_attention_heads} is not divisible by tp={parallel.tp}"
        )
    if spec.num_key_value_heads % parallel.tp != 0:
        raise LayoutError(
            f"{src}: num_key_value_heads={spec.num_key_value_heads} is not divisible by "
            f"tp={parallel.tp} (each TP rank must hold whole KV heads)"
        )
    if spec.intermediate_size % parallel.tp != 0:
        raise LayoutError(
            f"{src}: intermediate_size={spec.intermediate_size} is not divisible by tp={parallel.tp}"
        )
    chunks = parallel.pp * (parallel.vpp or 1)
    if spec.num_hidden_layers % chunks != 0:
        what = f"pp={parallel.pp}" + (f" * vpp={parallel.vpp}" if parallel.vpp else "")
        raise LayoutError(
            f"{src}: num_hidden_layers={spec.num_hidden_layers} is not divisible by {what} = {chunks}"
        )
