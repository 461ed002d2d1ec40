"""FP8 export of the weight stream (rollout/weight_sync/fp8.py).

References are independent of the code under test: a float64 block quantiser and an e4m3
rounding written from the format's definition (1 sign, 4 exponent bits with bias 7, 3 mantissa
bits, subnormals below 2^-6, max 448, round to nearest even); the engines' tensor layouts as read
in their source (SGLang/vLLM ``Fp8LinearMethod.create_weights``); transformers' own FP8 quantizer
(the module tree it builds, and its loader dequantising our folder).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.weight_sync import fp8 as fp8_mod
from rlmt_megatron.rollout.weight_sync.fp8 import (
    Fp8ExportConfig,
    check_block_layout,
    config_for_sync,
    quantization_config,
    quantize_buckets,
    quantize_weight,
    write_fp8_hf_folder,
)

NAME = "model.layers.3.mlp.down_proj.weight"
REL_BOUND = 2.0**-4  # e4m3 round-to-nearest: half of a 2^-3 mantissa step, relative to the block amax


# ----------------------------------------------------------------------------- float64 reference

def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3fn value (ties to even) of float64 ``x`` with |x| <= 448."""
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))  # subnormals share the step of 2^-6
    step = torch.pow(2.0, e - 3)
    return torch.round(x / step) * step


def near_tie(x: torch.Tensor) -> torch.Tensor:
    """Where a float32 quotient may round differently from the float64 one (within 2^-14 of a tie)."""
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))
    frac = (x / torch.pow(2.0, e - 3)).abs()
    return ((frac - frac.floor()) - 0.5).abs() < 2.0**-14


def reference_blocks(w: torch.Tensor, block):
    """Per-block (row slice, col slice, amax, scale) in float64; block=None: the whole tensor."""
    w64 = w.double()
    rows, cols = w64.shape
    bn, bk = block or (rows, cols)
    out = []
    for i in range(math.ceil(rows / bn)):
        for j in range(math.ceil(cols / bk)):
            rs, cs = slice(i * bn, min((i + 1) * bn, rows)), slice(j * bk, min((j + 1) * bk, cols))
            amax = w64[rs, cs].abs().max().item()
            out.append((i, j, rs, cs, amax, amax / 448.0))
    return out


def awkward_tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    rows, cols = shape
    if rows > 128 and cols > 128:
        w[:128, 128:256] = 0.0  # an all-zero block
        w[128:256, :128] *= 1e30  # huge magnitudes
        w[256:, :] *= 1e-30  # tiny magnitudes (edge row block)
        w[0, 0] = 3.0e38  # near the float32 maximum
    return w.to(dtype)


CASES = [((300, 200), torch.float32), ((300, 200), torch.bfloat16), ((128, 128), torch.float32),
         ((1, 5), torch.float32), ((129, 257), torch.bfloat16), ((384, 130), torch.float32)]


def dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """fp8 * scale in float64, each scale applied to its block (the engines' semantics)."""
    q64 = q.double()
    if block is None:
        return q64 * s.double().reshape(())
    bn, bk = block
    full = s.double().repeat_interleave(bn, 0)[: q.shape[0]].repeat_interleave(bk, 1)[:, : q.shape[1]]
    return q64 * full


@pytest.mark.parametrize("slab", [None, 1])
@pytest.mark.parametrize("shape,dtype", CASES)
@pytest.mark.parametrize("scheme", ["block", "per_tensor"])
def test_matches_float64_reference(monkeypatch, scheme, shape, dtype, slab):
    if slab is not None:  # force one block row (block) / one row (per tensor) per slab
        monkeypatch.setattr(fp8_mod, "_SLAB_ELEMENTS", slab)
    block = (128, 128) if scheme == "block" else None
    w = awkward_tensor(shape, dtype, seed=shape[0] * 7 + shape[1])
    before = w.clone()
    cfg = Fp8ExportConfig(scheme=scheme, engine="sglang")
    (qn, q), (sn, s) = quantize_weight(NAME, w, cfg)
    assert torch.equal(w, before)  # the exported tensor is not modified
    assert qn == NAME and q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and torch.isfinite(s).all() and (s > 0).all()

    w64 = w.double()
    deq = dequantize(q, s, block)
    s_grid = s.double().reshape(-1, 1) if block is None else s.double()
    nonzero_scales = []
    for i, j, rs, cs, amax, s_ref in reference_blocks(w, block):
        s_ours = s_grid[i, j].item()
        if amax == 0.0:
            assert (deq[rs, cs] == 0).all()
            continue
        nonzero_scales.append(s_ours)
        assert abs(s_ours - s_ref) <= 2.0**-24 * s_ref  # float32 rounding of amax / 448
        x = (w64[rs, cs] / s_ref).clamp(-448.0, 448.0)
        ref_codes = e4m3_round(x)
        codes = q[rs, cs].double()
        tie = near_tie(x)
        assert torch.equal(codes[~tie], ref_codes[~tie])
        step_at = torch.pow(2.0, torch.floor(torch.log2(x.abs().clamp(min=2.0**-6))) - 3)
        assert ((codes - ref_codes).abs()[tie] <= step_at[tie]).all()
        err = (deq[rs, cs] - w64[rs, cs]).abs().max().item()
        assert err <= REL_BOUND * amax
    # An all-zero block's scale never exceeds a real one (fused shards take the max scale).
    zero_scales = [s_grid[i, j].item() for i, j, *_, amax, _ in reference_blocks(w, block) if amax == 0.0]
    if zero_scales and nonzero_scales:
        assert max(zero_scales) <= min(nonzero_scales)


def test_all_zero_tensor_per_tensor_and_block():
    w = torch.zeros(130, 3)
    for scheme in ("block", "per_tensor"):
        (_, q), (_, s) = quantize_weight(NAME, w, Fp8ExportConfig(scheme=scheme))
        assert (q.double() == 0).all() and torch.isfinite(s).all() and (s > 0).all()


def test_non_finite_and_bad_shapes_are_named():
    w = torch.ones(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(RLMTError, match="down_proj.*inf or NaN"):
        quantize_weight(NAME, w, Fp8ExportConfig())
    with pytest.raises(RLMTError, match="2-D"):
        quantize_weight(NAME, torch.ones(8), Fp8ExportConfig())


# ----------------------------------------------------------------------------- engine layouts

# From the engines' source (see the module docstring): name of the scale beside "<m>.weight" and
# its shape for a weight of shape (out, in) and block (bn, bk).
UPSTREAM = {
    ("sglang", "per_tensor"): ("weight_scale", lambda o, i, b: (1,)),
    ("vllm", "per_tensor"): ("weight_scale", lambda o, i, b: (1,)),
    ("hf", "per_tensor"): ("weight_scale_inv", lambda o, i, b: ()),
    ("sglang", "block"): ("weight_scale_inv", lambda o, i, b: (-(-o // b[0]), -(-i // b[1]))),
    ("vllm", "block"): ("weight_scale_inv", lambda o, i, b: (-(-o // b[0]), -(-i // b[1]))),
    ("hf", "block"): ("weight_scale_inv", lambda o, i, b: (-(-o // b[0]), -(-i // b[1]))),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def safetensor_buckets(path, bucket_bytes, pulled=None):
    """The file's tensors as export buckets, read lazily; ``pulled`` counts buckets handed out."""
    with safe_open(str(path), framework="pt") as f:
        bucket, size = [], 0
        for name in f.keys():
            t = f.get_tensor(name)
            if bucket and size + t.numel() * t.element_size() > bucket_bytes:
                if pulled is not None:
                    pulled.append(len(bucket))
                yield bucket
                bucket, size = [], 0
            bucket.append((name, t))
            size += t.numel() * t.element_size()
        if bucket:
            if pulled is not None:
                pulled.append(len(bucket))
            yield bucket


def _is_linear_weight(name):
    return name.startswith("model.layers.") and name.endswith(".weight") and any(f".{p}." in name for p in LINEARS)


@pytest.mark.parametrize("model", ["llama-policy", "qwen2-policy"])
@pytest.mark.parametrize("engine,scheme", sorted(UPSTREAM))
def test_tiny_model_stream(tiny_models, model, engine, scheme):
    path = tiny_models / model / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        original = {n: f.get_tensor(n) for n in f.keys()}
    cfg = Fp8ExportConfig(scheme=scheme, engine=engine, weight_block_size=(128, 128))
    out_buckets = list(quantize_buckets(safetensor_buckets(path, 200_000), cfg))
    out = [item for b in out_buckets for item in b]
    names = [n for n, _ in out]
    assert len(names) == len(set(names))
    got = dict(out)
    suffix, shape_of = UPSTREAM[(engine, scheme)]
    linear = [n for n in original if _is_linear_weight(n)]
    assert len(linear) == 7 * 4  # 4 layers x 7 projections: every one is quantised
    expected_names = set(original) | {n[: -len("weight")] + suffix for n in linear}
    assert set(got) == expected_names  # nothing dropped, nothing unexpected
    for name, t in original.items():
        if name in linear:
            o, i = t.shape
            q, s = got[name], got[name[: -len("weight")] + suffix]
            assert q.dtype == torch.float8_e4m3fn and q.shape == t.shape
            assert s.dtype == torch.float32 and tuple(s.shape) == shape_of(o, i, (128, 128))
            err = (dequantize(q, s, (128, 128) if scheme == "block" else None) - t.double()).abs().max()
            assert err <= REL_BOUND * t.abs().max().item()
        else:  # embeddings, norms, lm_head, biases: bit for bit, same dtype
            assert got[name].dtype == t.dtype and torch.equal(got[name], t)


@pytest.mark.parametrize("model", ["llama-policy", "qwen2-policy"])
@pytest.mark.parametrize("block", [(128, 128), None])
def test_hf_names_match_transformers_fp8_model(tiny_models, model, block):
    """The stream for engine=hf fills exactly the parameters of transformers' own FP8 model."""
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.quantizers import AutoHfQuantizer

    folder = tiny_models / model
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    AutoHfQuantizer.from_config(FineGrainedFP8Config(weight_block_size=block), pre_quantized=True).preprocess_model(ref)
    want = {n: (tuple(p.shape), p.dtype) for n, p in ref.named_parameters()}
    if ref.config.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    cfg = Fp8ExportConfig(scheme="block" if block else "per_tensor", engine="hf")
    stream = quantize_buckets(safetensor_buckets(folder / "model.safetensors", 10**9), cfg)
    got = {n: (tuple(t.shape), t.dtype) for b in stream for n, t in b}
    assert got == want


def test_stream_is_lazy_and_keeps_bucket_boundaries(tiny_models):
    pulled = []
    path = tiny_models / "llama-policy" / "model.safetensors"
    stream = quantize_buckets(safetensor_buckets(path, 150_000, pulled), Fp8ExportConfig())
    first = next(stream)
    assert len(pulled) == 1  # one input bucket read for one output bucket
    n_linear = sum(_is_linear_weight(n) for n, _ in first)
    assert len(first) == pulled[0] + n_linear  # each linear weight gained its scale, in place
    rest = list(stream)
    assert len(rest) == len(pulled) - 1 and len(pulled) > 2


# ----------------------------------------------------------------------------- engine config

def test_quantization_config_parsed_by_transformers():
    from transformers import FineGrainedFP8Config

    block = quantization_config(Fp8ExportConfig(scheme="block", weight_block_size=(128, 64)))
    assert block == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 64]}
    per_tensor = quantization_config(Fp8ExportConfig(scheme="per_tensor"))
    json.dumps(per_tensor)  # goes into config.json as is
    for qc, bs in ((block, [128, 64]), (per_tensor, None)):
        parsed = FineGrainedFP8Config.from_dict(dict(qc))
        assert parsed.activation_scheme == "dynamic" and parsed.weight_block_size == bs
        assert parsed.quant_method == "fp8"


@pytest.mark.parametrize("model,scheme", [("llama-policy", "block"), ("qwen2-policy", "per_tensor")])
def test_transformers_loads_fp8_folder(tiny_models, tmp_path, model, scheme):
    """transformers' own loader reads our folder (names, config, scale semantics) and dequantises it.

    Block uses the Llama model: transformers' CPU dequantisation needs whole blocks (Qwen2's 352
    rows are not), which its GPU kernels and SGLang/vLLM do not.
    """
    pytest.importorskip("accelerate")  # transformers needs it for any quantised checkpoint
    from transformers import AutoModelForCausalLM

    src = tiny_models / model
    out = write_fp8_hf_folder(src, tmp_path / "fp8", Fp8ExportConfig(scheme=scheme, engine="hf"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if _is_linear_weight(name):
                assert (loaded[name].double() - t.double()).abs().max() <= REL_BOUND * t.abs().max()
            else:
                assert torch.equal(loaded[name], t), name


def test_block_layout_checks_follow_engine_rules():
    llama = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
             "intermediate_size": 384}
    qwen = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 352}
    sglang = Fp8ExportConfig(scheme="block", engine="sglang")
    check_block_layout(llama, sglang)  # q 256, k/v 128, gate/up 384: all multiples of 128
    with pytest.raises(RLMTError, match="gate_proj output 352"):
        check_block_layout(qwen, sglang)
    with pytest.raises(RLMTError, match="k_proj output 64.*down_proj input 192"):  # TP 2: kv 1x64, 384/2
        check_block_layout(llama, sglang, engine_tp_size=2)
    check_block_layout(qwen, Fp8ExportConfig(scheme="block", engine="hf"))  # no such rule there
    check_block_layout(qwen, Fp8ExportConfig(scheme="per_tensor", engine="sglang"))


def test_config_for_sync():
    assert config_for_sync("none", "sglang") is None
    cfg = config_for_sync("per_tensor", "vllm")
    assert cfg.scheme == "per_tensor" and cfg.engine == "vllm" and cfg.weight_block_size == (128, 128)
    with pytest.raises(Exception):
        Fp8ExportConfig(scheme="block", block=3)  # unknown field
