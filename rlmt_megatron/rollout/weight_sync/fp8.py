"""On-the-fly FP8 (e4m3) quantisation of the exported weights, for rollout engines serving FP8.

The trainer exports HF-named tensors in its own dtype (``checkpoint/hf_export.py``). An engine
started with an FP8 ``quantization_config`` holds each decoder linear layer as a
``float8_e4m3fn`` weight plus float32 scale(s), and its loader expects exactly those tensors on
every weight update. :func:`quantize_buckets` wraps the bucket stream and replaces every linear
weight of the decoder layers by that pair; every other tensor passes through untouched.

What the engines expect (source read for this module):

* SGLang, ``python/sglang/srt/layers/quantization/fp8.py`` (commit 00563d36):
  ``Fp8Config.from_config`` reads ``quant_method`` ("fp8" in it => FP8-serialised checkpoint),
  ``activation_scheme``, ``weight_block_size`` (None => per-tensor) and ``ignored_layers`` /
  ``modules_to_not_convert``; ``get_quant_method`` quantises only ``LinearBase`` layers (the
  ``ParallelLMHead`` and embeddings are ``VocabParallelEmbedding``, not ``LinearBase``).
  ``Fp8LinearMethod.create_fp8_weight_`` registers ``weight`` (float8_e4m3fn, [out, in]) and
  either ``weight_scale_inv`` (float32, [ceil(out/bn), ceil(in/bk)], block) or ``weight_scale``
  (``PerTensorScaleParameter``, float32, one entry per fused shard). Block scales require the
  dynamic activation scheme. ``python/sglang/srt/layers/parameter.py`` (commit 00b08c49),
  ``PerTensorScaleParameter._load_into_shard_id``: a checkpoint scale is a scalar or shape [1].
* vLLM, ``vllm/model_executor/layers/quantization/fp8.py`` (commit 0071b24b): the same
  ``Fp8Config.from_config`` keys and the same ``Fp8LinearMethod.create_weights`` tensors
  (``weight_scale`` per tensor, ``weight_scale_inv`` per block, "intentional for deepseekv3").
* transformers 5.23.0, ``integrations/finegrained_fp8.py`` ``FP8Linear``: ``weight_scale_inv``
  for both schemes, a 0-d scalar when ``weight_block_size`` is None (per tensor), else
  [ceil(out/bn), ceil(in/bk)]; ``utils/quantization_config.py`` ``FineGrainedFP8Config``
  defaults ``weight_block_size`` to (128, 128), so per-tensor must say ``None`` explicitly;
  ``quantizers/quantizer_finegrained_fp8.py`` keeps the output embedding (lm_head) unquantised.
* All three dequantise as ``weight_fp8 * scale`` (the "inv" in ``weight_scale_inv`` is
  DeepSeek-V3's spelling, not a reciprocal). Prior art: slime's
  ``megatron_to_hf/processors/quantizer.py`` (per tensor ``weight_scale`` of shape [1]).

Numerics, per block (the whole tensor for per-tensor): ``scale = amax / 448`` in float32, floored
at the smallest normal float32 so an all-zero block never divides by zero (its values stay 0 and
its tiny scale never wins the max over fused shards that SGLang's per-tensor path takes);
``fp8 = cast(clamp(w / scale, -448, 448))`` with round-to-nearest-even. Edge blocks smaller than
the block size take the amax of the part that exists.

Memory: buckets are quantised as they stream, tensors one at a time in row slabs of at most
``_SLAB_ELEMENTS``, so the extra memory over the unquantised stream is one output bucket (1 byte per
quantised element) plus a few float32 temporaries of one slab (64 MiB) each.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional

import torch
from pydantic import Field, PositiveInt

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.errors import RLMTError

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = torch.finfo(torch.float32).tiny  # smallest normal float32
_SLAB_ELEMENTS = 1 << 24  # 64 MiB of float32 working memory per slab

Engine = Literal["sglang", "vllm", "hf"]
Scheme = Literal["per_tensor", "block"]

# Which exported tensors become FP8: the linear weights of the decoder layers. Everything else
# (embeddings, norms, lm_head, biases, a reward head) keeps its dtype: SGLang and vLLM quantise
# only LinearBase layers, transformers keeps the output embedding unquantised.
FP8_TARGETS: tuple[str, ...] = (
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
)
_TARGET_RE = re.compile("|".join(f"(?:{p})" for p in FP8_TARGETS))

# (scheme, engine) -> (name of the scale tensor beside "<module>.weight", its shape rule).
# "blocks": [ceil(out/bn), ceil(in/bk)]; a tuple: that fixed shape.
SCALE_LAYOUT: dict[tuple[str, str], tuple[str, object]] = {
    ("block", "sglang"): ("weight_scale_inv", "blocks"),
    ("block", "vllm"): ("weight_scale_inv", "blocks"),
    ("block", "hf"): ("weight_scale_inv", "blocks"),
    ("per_tensor", "sglang"): ("weight_scale", (1,)),
    ("per_tensor", "vllm"): ("weight_scale", (1,)),
    ("per_tensor", "hf"): ("weight_scale_inv", ()),
}


class Fp8ExportConfig(StrictModel):
    """How exported weights are quantised for an FP8 rollout engine."""

    scheme: Scheme = Field("block", description="block: DeepSeek-V3 style block scales; per_tensor: one scale")
    weight_block_size: tuple[PositiveInt, PositiveInt] = Field(
        (128, 128), description="block: [rows (output dim), columns (input dim)] per scale")
    fmt: Literal["e4m3"] = Field("e4m3", description="FP8 format of the weights (float8_e4m3fn)")
    engine: Engine = Field("sglang", description="whose loader the scale names and shapes follow")


def config_for_sync(fp8: str, engine_kind: str) -> Optional[Fp8ExportConfig]:
    """The export config for ``weight_sync.fp8`` (none | per_tensor | block) and the engine kind."""
    if fp8 == "none":
        return None
    if engine_kind not in ("sglang", "vllm", "hf"):
        raise RLMTError(f"weight_sync.fp8={fp8!r}: no FP8 loader layout is known for engine {engine_kind!r}")
    return Fp8ExportConfig(scheme=fp8, engine=engine_kind)


def is_fp8_target(name: str) -> bool:
    return _TARGET_RE.fullmatch(name) is not None


def scale_name(weight_name: str, config: Fp8ExportConfig) -> str:
    """``a.b.weight`` -> ``a.b.weight_scale`` or ``a.b.weight_scale_inv`` (per :data:`SCALE_LAYOUT`)."""
    suffix, _ = SCALE_LAYOUT[(config.scheme, config.engine)]
    return weight_name[: -len("weight")] + suffix


def scale_shape(weight_shape: tuple[int, ...], config: Fp8ExportConfig) -> tuple[int, ...]:
    _, rule = SCALE_LAYOUT[(config.scheme, config.engine)]
    if rule == "blocks":
        (rows, cols), (bn, bk) = weight_shape, config.weight_block_size
        return (-(-rows // bn), -(-cols // bk))
    return tuple(rule)


def _scale_of(amax: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(amax).all()):
        raise RLMTError(f"FP8 export: weight '{name}' holds inf or NaN values; it cannot be quantised")
    return (amax.float() / E4M3_MAX).clamp_(min=_MIN_SCALE)


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Explicit saturation: whether an out-of-range float8 cast saturates or gives NaN has differed
    # between torch versions and devices (torch 2.13 on CPU saturates).
    return (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _quantize_per_tensor(w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    amax = torch.maximum(w.max(), -w.min())  # no |w| temporary of the whole tensor
    scale = _scale_of(amax, name)
    out = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    step = max(1, _SLAB_ELEMENTS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        out[r:r + step] = _cast(w[r:r + step].float(), scale)
    return out, scale


def _quantize_block(w: torch.Tensor, name: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    (rows, cols), (bn, bk) = w.shape, block
    nb_cols = -(-cols // bk)
    out = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scales = torch.empty((-(-rows // bn), nb_cols), dtype=torch.float32, device=w.device)
    step = bn * max(1, _SLAB_ELEMENTS // max(1, bn * cols))
    for r in range(0, rows, step):
        x = w[r:r + step].float()
        n = x.shape[0]
        # Zero padding to whole blocks: |0| never raises an amax, so edge blocks see only real values.
        padded = torch.nn.functional.pad(x, (0, nb_cols * bk - cols, 0, -(-n // bn) * bn - n))
        amax = padded.abs().view(-1, bn, nb_cols, bk).amax(dim=(1, 3))
        del padded
        s = _scale_of(amax, name)
        scales[r // bn: r // bn + s.shape[0]] = s
        full = s.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :cols]
        out[r:r + n] = _cast(x, full)
    return out, scales


def quantize_weight(name: str, w: torch.Tensor, config: Fp8ExportConfig) -> list[tuple[str, torch.Tensor]]:
    """``[(name, fp8 weight), (scale name, float32 scale)]`` for one linear weight."""
    if w.dim() != 2 or w.numel() == 0:
        raise RLMTError(f"FP8 export: '{name}' has shape {tuple(w.shape)}; a non-empty 2-D linear weight "
                        "was expected")
    if not w.is_floating_point():
        raise RLMTError(f"FP8 export: '{name}' has dtype {w.dtype}; a floating-point weight was expected")
    w = w.detach()
    if config.scheme == "block":
        q, s = _quantize_block(w, name, config.weight_block_size)
    else:
        q, s = _quantize_per_tensor(w, name)
    return [(name, q), (scale_name(name, config), s.reshape(scale_shape(tuple(w.shape), config)))]


def quantize_buckets(buckets: Iterable[Bucket], config: Fp8ExportConfig) -> Iterator[Bucket]:
    """Yield each bucket with its linear weights replaced by FP8 weight + scale; lazy, in order."""
    for bucket in buckets:
        out: Bucket = []
        for name, tensor in bucket:
            if is_fp8_target(name):
                out.extend(quantize_weight(name, tensor, config))
            else:
                out.append((name, tensor))
        yield out


def make_quantizer(config: Fp8ExportConfig) -> Callable[[Iterable[Bucket]], Iterator[Bucket]]:
    """A bucket-stream wrapper (the FP8 stage of ``weight_sync/pipeline.py``)."""
    return functools.partial(quantize_buckets, config=config)


def quantization_config(config: Fp8ExportConfig) -> dict:
    """The ``quantization_config`` of config.json that makes an engine expect these tensors.

    ``weight_block_size`` is written as null for per-tensor: SGLang and vLLM read a missing and a
    null key alike, but transformers' ``FineGrainedFP8Config`` defaults a missing one to (128, 128).
    Dynamic activation scales: no ``input_scale`` tensors are sent (block scales require it).
    """
    return {
        "quant_method": "fp8",
        "fmt": config.fmt,
        "activation_scheme": "dynamic",
        "weight_block_size": list(config.weight_block_size) if config.scheme == "block" else None,
    }


def fp8_hf_config(hf_config: dict, config: Fp8ExportConfig) -> dict:
    """A copy of an HF config.json dict that declares the FP8 weights."""
    out = dict(hf_config)
    out["quantization_config"] = quantization_config(config)
    return out


def check_block_layout(hf_config: dict, config: Fp8ExportConfig, engine_tp_size: int = 1) -> None:
    """Fail early where SGLang/vLLM would refuse the block layout when building the model.

    Their ``validate_block_quant_shapes`` / ``create_weights``: every shard of a fused layer
    (q/k/v, gate/up) and every column-parallel output per TP rank must be a multiple of the block
    rows; a row-parallel input (o_proj, down_proj) per TP rank a multiple of the block columns.
    transformers has no such rule. Only Llama/Qwen2-style dense decoders are covered.
    """
    if config.scheme != "block" or config.engine == "hf":
        return
    bn, bk = config.weight_block_size
    tp = engine_tp_size
    heads, kv = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads", hf_config["num_attention_heads"])
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    inter = hf_config["intermediate_size"]
    outputs = {"q_proj": heads * head_dim // tp, "k_proj": max(1, kv // tp) * head_dim,
               "v_proj": max(1, kv // tp) * head_dim, "gate_proj": inter // tp, "up_proj": inter // tp}
    inputs = {"o_proj": heads * head_dim // tp, "down_proj": inter // tp} if tp > 1 else {}
    bad = [f"{k} output {n} (per TP rank) is not a multiple of {bn}" for k, n in outputs.items() if n % bn]
    bad += [f"{k} input {n} (per TP rank) is not a multiple of {bk}" for k, n in inputs.items() if n % bk]
    if bad:
        raise RLMTError(f"weight_sync.fp8=block with block size {[bn, bk]} and engine TP {tp}: "
                        f"{config.engine} cannot load this model: " + "; ".join(bad))


def write_fp8_hf_folder(src: str | Path, dst: str | Path, config: Fp8ExportConfig) -> Path:
    """Write an FP8 copy of the HF folder ``src`` (weights, config.json, tokenizer) to ``dst``.

    An engine must start from such a folder so that its layers are FP8 when the trainer's
    quantised updates arrive. Tensors are read and quantised one at a time.
    """
    from rlmt_megatron.checkpoint.safetensors_io import (
        SafetensorsReader, copy_tokenizer_files, write_safetensors_folder)

    src, dst = Path(src), Path(dst)
    reader = SafetensorsReader(src)
    stream = quantize_buckets(([(n, reader.read(n))] for n in sorted(reader.names())), config)
    state = {name: t for bucket in stream for name, t in bucket}
    write_safetensors_folder(state, dst)
    cfg_path = src / "config.json"
    try:
        hf_config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RLMTError(f"{cfg_path}: cannot read the model's config.json ({e})") from None
    (dst / "config.json").write_text(json.dumps(fp8_hf_config(hf_config, config), indent=2, sort_keys=True) + "\n")
    copy_tokenizer_files(src, dst)
    return dst
