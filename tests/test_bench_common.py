"""benchmarks/common.py: the FLOP count against independent figures, the peak probes, the header."""

import math

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
    # ../shared/ARCHITECTURE.md: 4 Llama-3.1-8B-shaped layers + 128K head, 4 x 4096 tokens,
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


def test_matmul_peak_is_positive_and_finite():
    rate = common.matmul_peak_tflops("cpu", torch.float32, n=128, repeats=2)
    assert math.isfinite(rate) and rate > 0


def test_header_names_the_command_without_write(tmp_path):
    head = common.section_header("Title", "benchmarks/x.py", ["--a", "1", "--write", "out.md"])
    assert head.startswith("\n## Title (") and "`python benchmarks/x.py --a 1`" in head
    assert "torch " in head and "megatron-core " in head
    common.append_section(tmp_path / "r.md", head + "| a |")
    assert (tmp_path / "r.md").read_text().endswith("| a |\n")
