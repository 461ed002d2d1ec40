"""benchmarks/common.py: the FLOP count against independent figures, the peak probes, the header."""

import math
import statistics
import time

import pytest
import torch

from benchmarks import common


def test_matmul_params_equal_the_linear_weights_transformers_builds():
    # Independent count: every 2-D weight of LlamaForCausalLM except the embedding lookup.
    shapes = common.parameter_shapes(4, 128256)
    linear = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and "embed_tokens" not in n)
    assert common.DecoderShape.llama31_8b(layers=4).matmul_params() == linear


@pytest.mark.parametrize("ms, tflops", [(310.7, 463), (302.4, 476), (252.8, 570), (246.7, 584)])
def test_flops_reproduce_the_rates_measured_on_an_h100(ms, tflops):
    # docs/benchmarks.md, the H100 table: 4 Llama-3.1-8B-shaped layers + 128K head, 4 x 4096 tokens,
    # forward+backward, "model FLOPs, causal attention counted once": the rates printed there.
    shape = common.DecoderShape.llama31_8b(layers=4)
    rate = 4 * 4096 * shape.train_flops_per_token(4096) / (ms / 1e3) / 1e12
    assert rate == pytest.approx(tflops, abs=0.6)


def test_attention_term_by_hand():
    # One layer, 2 heads of 4, seq 10: forward QK^T and AV are 10 * 8 MACs each per token
    # (160 MACs = 320 FLOPs), x3 for forward+backward, halved for causality -> 480 per token.
    shape = common.DecoderShape(layers=1, hidden=8, ffn=16, heads=2, kv_heads=1, head_dim=4, vocab=32)
    assert shape.train_flops_per_token(10) - 6 * shape.matmul_params() == pytest.approx(480)


def test_cpu_peak_memory_sees_a_large_allocation():
    base = common.reset_peak_memory("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = common.peak_memory("cpu") - base
    del block
    assert 60 * 2**20 < grown < 200 * 2**20


def test_matmul_peak_is_the_flops_of_one_product_over_the_median_time(monkeypatch):
    # The clock faked: what is timed must be one n x n x n product in the given dtype, and the
    # rate 2 n^3 FLOPs over the median of the timed calls, in TFLOP/s.
    seen = {}

    def fake_time_calls(fn, repeats, warmup, device):
        result = fn()
        seen.update(shape=tuple(result.shape), dtype=result.dtype, repeats=repeats, warmup=warmup, device=device)
        return [0.5, 4.0, 2.0, 8.0, 1.0]  # median 2.0 s

    monkeypatch.setattr(common, "time_calls", fake_time_calls)
    rate = common.matmul_peak_tflops("cpu", torch.float64, n=96, repeats=5)
    assert rate == pytest.approx(2 * 96**3 / 2.0 / 1e12, rel=1e-12)
    assert seen == {"shape": (96, 96), "dtype": torch.float64, "repeats": 5, "warmup": 3, "device": "cpu"}


def test_matmul_peak_agrees_with_a_product_timed_here():
    # Independent figure: a (192 x 384) @ (384 x 320) product timed with perf_counter here,
    # 2 m k n FLOPs over its median time. Another size, so only the order of magnitude can
    # agree on a shared machine: within 10x either way (a FLOP count off by n, or seconds taken
    # for milliseconds, would be out by far more).
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(192, 384, generator=g), torch.randn(384, 320, generator=g)
    for _ in range(3):
        a @ b
    seconds = []
    for _ in range(9):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    mine = 2 * 192 * 384 * 320 / statistics.median(seconds) / 1e12
    rate = common.matmul_peak_tflops("cpu", torch.float32, n=256, repeats=9)
    assert mine / 10 < rate < mine * 10, (rate, mine)


def test_header_names_the_command_without_write(tmp_path):
    head = common.section_header("Title", "benchmarks/x.py", ["--a", "1", "--write", "out.md"])
    assert head.startswith("\n## Title (") and "`python benchmarks/x.py --a 1`" in head
    assert "torch " in head and "megatron-core " in head
    common.append_section(tmp_path / "r.md", head + "| a |")
    assert (tmp_path / "r.md").read_text().endswith("| a |\n")
