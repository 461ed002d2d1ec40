"""Load an HF safetensors folder straight into a TP/PP-sharded Megatron model.

Each rank walks its own parameters, looks each one up in the mapping table, and reads only the
rows or columns its TP rank owns. Every HF tensor must be consumed by some rank: a checkpoint
tensor nobody loads is an error, never a silent skip.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.mapping import fuse, layer_index, resolve
from rlmt_megatron.checkpoint.safetensors_io import SafetensorsReader
from rlmt_megatron.errors import CheckpointError
from rlmt_megatron.models.builder import BuiltModel

log = logging.getLogger(__name__)

# HF tensors that legitimately have no Megatron counterpart, by role.
_IGNORABLE = {
    "policy": set(),
    "critic": {"lm_head.weight"},  # critic initialised from a policy checkpoint
    "reward": set(),
}


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _read_part(reader: SafetensorsReader, name: str, rule, tp_rank: int, tp: int, built: BuiltModel) -> torch.Tensor:
    """This TP rank's chunk of one HF tensor (vocab rows padded with zeros)."""
    if rule.tp_dim is None:
        return reader.read(name)
    full = reader.shape(name)
    if rule.vocab:
        if full[0] != built.spec.vocab_size:
            raise CheckpointError(
                f"{reader.folder}: '{name}' has {full[0]} rows, config.json says vocab_size={built.spec.vocab_size}"
            )
        rows = built.padded_vocab_size // tp
        start, stop = tp_rank * rows, (tp_rank + 1) * rows
        got = reader.read(name, 0, start, min(stop, full[0])) if start < full[0] else None
        out = torch.zeros(rows, *full[1:], dtype=got.dtype if got is not None else torch.float32)
        if got is not None:
            out[: got.shape[0]] = got
        return out
    size = full[rule.tp_dim]
    if size % tp != 0:
        raise CheckpointError(f"{reader.folder}: '{name}' dim {rule.tp_dim} = {size} is not divisible by tp={tp}")
    step = size // tp
    return reader.read(name, rule.tp_dim, tp_rank * step, (tp_rank + 1) * step)


def global_layer_numbers(chunk) -> dict[int, int]:
    """Local layer index in a chunk -> global (HF) layer index."""
    return {local: layer.layer_number - 1 for local, layer in enumerate(chunk.decoder.layers)}


def load_hf_weights(built: BuiltModel, hf_dir: str | Path) -> None:
    """Fill ``built``'s parameters on this rank from the HF folder ``hf_dir``."""
    reader = SafetensorsReader(hf_dir)
    tp_rank, tp = _tp()
    spec = built.spec
    heads, kv_heads = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    available = reader.names()
    used: set[str] = set()
    for chunk in built.chunks:
        layers = global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            local = layer_index(name)
            rr = resolve(name, layers.get(local), built.role, spec.qkv_bias, built.tied_embeddings)
            if built.role == "critic" and name.startswith("output_layer.") and rr.hf_names[0] not in available:
                # A critic starts from a policy (or RM) checkpoint: a head tensor it lacks starts
                # at zero, so the first value estimates are 0 (or the RM's score, without bias).
                log.info("critic %s not in %s: initialised to zeros", rr.hf_names[0], hf_dir)
                with torch.no_grad():
                    param.zero_()
                continue
            parts = [_read_part(reader, n, rr.rule, tp_rank, tp, built) for n in rr.hf_names]
            try:
                tensor = fuse(rr.rule.fuse, parts, heads, kv_heads)
            except RuntimeError as e:
                raise CheckpointError(
                    f"{reader.folder}: {rr.hf_names} do not fit Megatron '{name}' {tuple(param.shape)} ({e})"
                ) from None
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{reader.folder}: {', '.join(rr.hf_names)} give shape {tuple(tensor.shape)} on TP rank "
                    f"{tp_rank}, but Megatron '{name}' is {tuple(param.shape)}; config.json and weights disagree"
                )
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            used.update(rr.hf_names)
    # Tied checkpoints sometimes store the LM head anyway; it equals the embedding we loaded.
    ignorable = _IGNORABLE[built.role] | ({"lm_head.weight"} if built.tied_embeddings else set())
    _check_all_consumed(reader, available, used, ignorable, built.role)


def _check_all_consumed(reader: SafetensorsReader, available: set[str], used: set[str], ignorable: set[str], role: str) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(used))
        used = set().union(*map(set, gathered))
    unused = available - used - ignorable
    if unused:
        raise CheckpointError(
            f"{reader.folder}: {len(unused)} tensor(s) have no place in the Megatron {role} model: "
            f"{sorted(unused)[:8]}{' ...' if len(unused) > 8 else ''}"
        )
