"""Export a TP/PP-sharded Megatron model back to HF names, tensors and folders.

- :func:`iter_hf_tensors` yields full HF tensors on the rank that holds each one after the TP
  all-gather (TP rank 0, DP rank 0 of the owning pipeline stage); other ranks take part in the
  gathers and yield nothing.
- :func:`iter_hf_buckets` groups them into buckets of at most ``bucket_bytes`` (a tensor larger
  than the budget travels alone); :func:`buckets_at` streams every stage's buckets to one rank
  (:func:`buckets_for`: to several, each fed by its own replica), stage by stage, so the
  destination holds at most one bucket beyond what it has consumed: peak
  extra memory is bounded by the bucket size, not the model size; :func:`stage_buckets` leaves
  each stage's buckets on its owner. All are collective: every rank must drive the iterator to
  the end. Weight sync to rollout engines uses them directly.
- :func:`gather_hf_state_dict` collects those buckets into one dict on the destination rank.
- :func:`save_hf_folder` writes safetensors + config.json + tokenizer files that transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from rlmt_megatron.distributed.collectives import device_tensors_device, stage_owners
from rlmt_megatron.checkpoint.hf_loader import global_layer_numbers
from rlmt_megatron.checkpoint.mapping import HF_ARCHITECTURES, ResolvedRule, layer_index, resolve, unfuse
from rlmt_megatron.checkpoint.safetensors_io import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    copy_tokenizer_files,
    pack_buckets,
    write_safetensors_folder,
)
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


def _full_hf_tensors(built: BuiltModel, rr: ResolvedRule, shard: torch.Tensor, dtype: Optional[torch.dtype],
                     sender: bool) -> list[torch.Tensor]:
    """All-gather ``shard`` over TP and split it into the HF parts (collective over TP).

    The cast to the export dtype happens before the gather (elementwise, so the result is the
    same bit for bit) to halve the bytes moved for bf16 exports; only the sender rebuilds the HF
    tensors, the other TP ranks just contribute their shard.
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    spec = built.spec
    shard = shard.detach() if dtype is None else shard.detach().to(dtype)
    if rr.rule.tp_dim is None or tp == 1:
        per_rank = [shard]
    else:
        per_rank = [torch.empty_like(shard) for _ in range(tp)]
        dist.all_gather(per_rank, shard.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if not sender:
        return []
    heads, kv = spec.num_attention_heads // tp, spec.num_key_value_heads // tp
    split = [unfuse(rr.rule.fuse, t, heads, kv, spec.head_dim) for t in per_rank]
    dim = rr.rule.tp_dim or 0
    parts = [split[0][k] if len(split) == 1 else torch.cat([s[k] for s in split], dim=dim) for k in range(len(rr.hf_names))]
    if rr.rule.vocab:
        parts = [p[: spec.vocab_size] for p in parts]
    return parts


def iter_hf_tensors(built: BuiltModel, dtype: Optional[torch.dtype] = None,
                    exporting: Optional[bool] = None, every_tp_rank: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) on each stage's sender rank; collective over TP.

    ``exporting``: whether this rank's data-parallel replica takes part (default: replica 0 only).
    ``every_tp_rank``: every TP rank rebuilds and yields the full tensors from the all-gather it
    takes part in anyway (not only TP rank 0).
    Tensors may be views of the live parameters (TP=1, no cast): copy before the next update."""
    from megatron.core import parallel_state

    if not (parallel_state.get_data_parallel_rank() == 0 if exporting is None else exporting):
        return
    sender = every_tp_rank or parallel_state.get_tensor_model_parallel_rank() == 0
    for rr, param in _local_entries(built):
        parts = _full_hf_tensors(built, rr, param, dtype, sender)
        yield from zip(rr.hf_names, parts)


def export_dtype(built: BuiltModel) -> torch.dtype:
    """The dtype the HF config declares (so a round trip is bit-exact), else the model's."""
    declared = built.spec.raw.get("torch_dtype") or built.spec.raw.get("dtype")
    return _DTYPES.get(declared, _DTYPES[built.build.precision.params_dtype])


def iter_hf_buckets(built: BuiltModel, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    dtype: Optional[torch.dtype] = None, exporting: Optional[bool] = None) -> Iterator[Bucket]:
    """Buckets of (HF name, full tensor) on each stage's sender rank (TP 0 of an exporting
    replica: DP 0 unless ``exporting`` says otherwise)."""
    return pack_buckets(iter_hf_tensors(built, dtype or export_dtype(built), exporting), bucket_bytes)


def buckets_at(built: BuiltModel, dst: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Every stage's buckets, yielded on global rank ``dst`` only (fed by data-parallel replica 0),
    in pipeline-stage order."""
    return buckets_for(built, {dst: 0}, bucket_bytes, dtype)


def buckets_for(built: BuiltModel, feeds: Mapping[int, int], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Every stage's buckets, in pipeline-stage order, yielded on each receiving rank of ``feeds``
    (global rank -> the data-parallel replica that feeds it). Collective.

    Each replica named in ``feeds`` exports once: its TP groups gather, and each stage's owner (its
    TP rank 0) sends its own layers, and only those, to every receiver that replica feeds; a
    receiver that owns a stage yields that stage's buckets without a copy. Replicas that feed
    nobody do nothing. Several receivers, each fed by the replica on its own node, so get the
    weights at once without anything passing through one rank (``trainer/rollout_supervisor.py``).

    A receiver inside an exporting replica must be fed by that replica and own a stage of it: any
    other rank of it is busy in its stage's TP gathers while the stages are sent (ValueError).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield from iter_hf_buckets(built, bucket_bytes, dtype, exporting=bool(feeds))
        return
    rank = dist.get_rank()
    layout = stage_owners()
    replica = layout.replica[rank]
    exporting = set(feeds.values())
    for r, d in feeds.items():
        own = layout.replica[r]
        if own in exporting and (d != own or not layout.owns(r)):
            raise ValueError(f"rank {r} cannot receive the weights from replica {d}: it is a rank of exporting "
                             f"replica {own} that does not own a stage of it")
    stages = sorted(set(layout.stage))
    local = iter_hf_buckets(built, bucket_bytes, dtype, exporting=replica in exporting)
    fed_by_me = [r for r, d in sorted(feeds.items()) if d == replica and r != rank] if layout.owns(rank) else []
    device = device_tensors_device()  # NCCL moves only device tensors; gloo takes CPU memory

    def own_stage() -> Iterator[Bucket]:
        for bucket in local:
            for r in fed_by_me:
                dist.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in bucket]], r)
                for _, t in bucket:
                    dist.send(t.contiguous(), r)
            yield bucket
        for r in fed_by_me:
            dist.send_object_list([None], r)  # end of this stage

    sent = False
    if rank in feeds:
        for p in stages:
            src = layout.owner[(feeds[rank], p)]
            if src == rank:
                yield from own_stage()
                sent = True
                continue
            while True:
                box = [None]
                dist.recv_object_list(box, src)
                if box[0] is None:
                    break
                bucket = []
                for name, shape, dt in box[0]:
                    buf = torch.empty(shape, dtype=dt, device=device)
                    dist.recv(buf, src)
                    bucket.append((name, buf))
                yield bucket
    if not sent:
        for _ in own_stage():  # a sender, or a rank taking part in its stage's TP gathers
            pass


def stage_buckets(built: BuiltModel, replicas: set[int], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """Each stage's own buckets, yielded on that stage's owner in each data-parallel replica of
    ``replicas``; the other ranks of those replicas take part in their stage's TP gathers and
    yield nothing, other replicas do nothing. Collective. For senders that reach the engines from
    every stage (``rollout/weight_sync/stage_groups.py``); :func:`buckets_for` brings every stage to one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return iter_hf_buckets(built, bucket_bytes, dtype, exporting=bool(replicas))
    from megatron.core import parallel_state

    return iter_hf_buckets(built, bucket_bytes, dtype, exporting=parallel_state.get_data_parallel_rank() in replicas)


def buckets_on_every_rank(built: BuiltModel, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                          dtype: Optional[torch.dtype] = None) -> Iterator[Bucket]:
    """The whole model's buckets on every rank at once, each replica exporting from its own TP
    all-gathers, with no other communication: the same buckets, in the same order, everywhere.
    Collective. One pipeline stage only (each rank holds every layer); for engines fed from the
    rank on each of their GPUs (``rollout/weight_sync/same_gpu_ipc.py``)."""
    if built.build.parallel.pp != 1:
        raise ValueError(f"every rank holds the whole model only with one pipeline stage, not pp={built.build.parallel.pp}")
    return pack_buckets(iter_hf_tensors(built, dtype or export_dtype(built), exporting=True, every_tp_rank=True),
                        bucket_bytes)


def gather_hf_state_dict(built: BuiltModel, dst: int = 0, dtype: Optional[torch.dtype] = None) -> Optional[dict[str, torch.Tensor]]:
    """Collect the whole HF state dict on global rank ``dst`` (None elsewhere). Collective."""
    # clone: the stream may hold views of live parameters, and the caller keeps this dict
    state = {name: t.clone() for bucket in buckets_at(built, dst, dtype=dtype) for name, t in bucket}
    rank = dist.get_rank() if dist.is_initialized() else 0
    return state if rank == dst else None


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
