"""Export a TP/PP-sharded Megatron model back to HF names, tensors and folders.

- :func:`iter_hf_tensors` yields full HF tensors on the rank that holds each one after the TP
  all-gather (TP rank 0, DP rank 0 of the owning pipeline stage); other ranks take part in the
  gathers and yield nothing.
- :func:`gather_hf_state_dict` brings every tensor to one destination rank (point-to-point from
  each stage's sender), in a deterministic order every rank agrees on.
- :func:`save_hf_folder` writes safetensors + config.json + tokenizer files that transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_loader import global_layer_numbers
from rlmt_megatron.checkpoint.mapping import HF_ARCHITECTURES, ResolvedRule, layer_index, resolve, unfuse
from rlmt_megatron.checkpoint.safetensors_io import copy_tokenizer_files, write_safetensors_folder
from rlmt_megatron.models.builder import BuiltModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _local_entries(built: BuiltModel) -> list[tuple[ResolvedRule, torch.nn.Parameter]]:
    """This rank's parameters with their HF rules, skipping the tied duplicate of the embedding."""
    entries = []
    for chunk in built.chunks:
        layers = global_layer_numbers(chunk)
        for name, param in chunk.named_parameters():
            if built.tied_embeddings and name == "output_layer.weight":
                continue
            rr = resolve(name, layers.get(layer_index(name)), built.role, built.spec.qkv_bias, built.tied_embeddings)
            entries.append((rr, param))
    return entries


def _full_hf_tensors(built: BuiltModel, rr: ResolvedRule, shard: torch.Tensor) -> list[torch.Tensor]:
    """All-gather ``shard`` over TP and split it into the HF parts (collective over TP)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    spec = built.spec
    if rr.rule.tp_dim is None or tp == 1:
        per_rank = [shard.detach()]
    else:
        per_rank = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(per_rank, shard.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    heads, kv = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    split = [unfuse(rr.rule.fuse, t, heads, kv, spec.head_dim) for t in per_rank]
    dim = rr.rule.tp_dim or 0
    parts = [torch.cat([s[k] for s in split], dim=dim) for k in range(len(rr.hf_names))]
    if rr.rule.vocab:
        parts = [p[: spec.vocab_size] for p in parts]
    return parts


def iter_hf_tensors(built: BuiltModel, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) on each stage's sender rank; collective over TP."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_rank() != 0:
        return
    sender = parallel_state.get_tensor_model_parallel_rank() == 0
    for rr, param in _local_entries(built):
        parts = _full_hf_tensors(built, rr, param)
        if sender:
            for name, t in zip(rr.hf_names, parts):
                yield name, t if dtype is None else t.to(dtype)


def export_dtype(built: BuiltModel) -> torch.dtype:
    """The dtype the HF config declares (so a round trip is bit-exact), else the model's."""
    declared = built.spec.raw.get("torch_dtype") or built.spec.raw.get("dtype")
    return _DTYPES.get(declared, _DTYPES[built.build.precision.params_dtype])


def gather_hf_state_dict(built: BuiltModel, dst: int = 0, dtype: Optional[torch.dtype] = None) -> Optional[dict[str, torch.Tensor]]:
    """Collect the whole HF state dict on global rank ``dst`` (None elsewhere). Collective."""
    from megatron.core import parallel_state

    dtype = dtype or export_dtype(built)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    is_sender = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    local = {name: t for name, t in iter_hf_tensors(built, dtype)}
    if world == 1:
        return local
    # Everyone learns which sender holds which tensor (names, shapes, dtypes), in stage order.
    manifest = [(n, tuple(t.shape), str(t.dtype)) for n, t in local.items()] if is_sender else None
    manifests: list = [None] * world
    dist.all_gather_object(manifests, (parallel_state.get_pipeline_model_parallel_rank(), manifest))
    result: Optional[dict[str, torch.Tensor]] = {} if rank == dst else None
    for src, (_, entries) in sorted(enumerate(manifests), key=lambda kv: kv[1][0]):
        if entries is None:
            continue
        for name, shape, dt in entries:
            if src == dst == rank:
                result[name] = local[name]
            elif rank == src:
                dist.send(local[name].contiguous(), dst)
            elif rank == dst:
                buf = torch.empty(shape, dtype=getattr(torch, dt.split(".")[1]))
                dist.recv(buf, src)
                result[name] = buf
    return result


def hf_config_for(built: BuiltModel) -> dict:
    """config.json for the exported folder: the source config with this role's head."""
    cfg = dict(built.spec.raw)
    cfg["architectures"] = [HF_ARCHITECTURES[(built.spec.family, built.role)]]
    # transformers 5 reads "dtype", 4.x "torch_dtype": write both.
    cfg["torch_dtype"] = cfg["dtype"] = str(export_dtype(built)).split(".")[1]
    if built.role == "policy":
        for key in ("num_labels", "id2label", "label2id"):
            cfg.pop(key, None)
    else:
        cfg["num_labels"] = 1
        cfg["id2label"] = {"0": "LABEL_0"}
        cfg["label2id"] = {"LABEL_0": 0}
        cfg["tie_word_embeddings"] = False
    return cfg


def save_hf_folder(built: BuiltModel, out_dir: str | Path, tokenizer_src: Optional[str | Path] = None) -> Optional[Path]:
    """Export ``built`` to an HF folder at ``out_dir`` (written by global rank 0). Collective."""
    state = gather_hf_state_dict(built, dst=0)
    if state is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_folder(state, out)
    (out / "config.json").write_text(json.dumps(hf_config_for(built), indent=2, sort_keys=True) + "\n")
    if tokenizer_src is not None:
        copy_tokenizer_files(tokenizer_src, out)
    return out
