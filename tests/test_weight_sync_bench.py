"""benchmarks/weight_sync.py: argument handling, the 8B model shape, and the worker end to end on
the tiny Llama (its byte counts checked against the safetensors file it was loaded from)."""

import json
import math

import pytest
from safetensors import safe_open

from benchmarks import common
from benchmarks import weight_sync as ws
from helpers import torchrun


def test_defaults_follow_the_device():
    cpu = ws.parse_args([], cuda=False)
    assert (cpu.layers, cpu.vocab, cpu.layouts, cpu.params_dtype) == (2, 32768, [(1, 1), (2, 1), (1, 2)], "float32")
    gpu = ws.parse_args([], cuda=True)
    assert (gpu.layers, gpu.vocab, gpu.layouts, gpu.params_dtype) == (32, 128256, [(1, 1)], "bfloat16")
    given = ws.parse_args(["--layers", "4", "--vocab", "8192", "--layouts", "1x1,4x2", "--bucket-mib", "64"], cuda=False)
    assert (given.layers, given.vocab, given.layouts, given.bucket_mib) == (4, 8192, [(1, 1), (4, 2)], 64)


@pytest.mark.parametrize("argv, cuda, message", [
    (["--layouts", "1x1,3x1"], False, "8 KV heads"),
    (["--layers", "3", "--layouts", "1x1,1x2"], False, "PP must divide --layers 3"),
    (["--layouts", "1x1,2x1"], True, "only the colocated 1x1"),
    (["--layouts", "2x1"], False, "must include 1x1"),
    (["--layouts", "2by1"], False, "is not TPxPP"),
    (["--bucket-mib", "0"], False, "positive integer"),
    (["--layers", "-1"], False, "positive integer"),
])
def test_rejected_arguments(argv, cuda, message, capsys):
    with pytest.raises(SystemExit):
        ws.parse_args(argv, cuda=cuda)
    assert message in capsys.readouterr().err


def test_full_shape_is_llama_3_1_8b():
    # Meta's published parameter count of Llama-3.1-8B (model card / safetensors index: 8,030,261,248).
    shapes = common.parameter_shapes(32, 128256)
    total = sum(math.prod(s) for s in shapes.values())
    assert total == 8_030_261_248
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (8 * 128, 4096)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (14336, 4096)


def test_rates_are_against_the_floor_of_the_same_run():
    rows = [
        {"tp": 1, "pp": 1, "what": "export (bf16)", "bytes": 4e9, "best_s": 2.0},
        {"tp": 1, "pp": 1, "what": "floor: copy_ into preallocated", "bytes": 4e9, "best_s": 0.5},
        {"tp": 2, "pp": 1, "what": "export (bf16)", "bytes": 4e9, "best_s": 4.0},
        {"tp": 2, "pp": 1, "what": "floor: copy_ into preallocated", "bytes": 4e9, "best_s": 0.25},
    ]
    out = ws.add_rates(rows)
    assert [r["gbps"] for r in out] == pytest.approx([2.0, 8.0, 1.0, 16.0])
    assert [r["of_floor"] for r in out] == pytest.approx([0.25, 1.0, 1.0 / 16, 1.0])


def test_worker_counts_every_exported_byte(tiny_models, tmp_path):
    # 1x1 only (the engine path); the TP/PP layouts run in the benchmark itself (a two-process
    # run costs ~40 s on a busy 2-core machine), and buckets_at's layouts have their own tests.
    model = tiny_models / "llama-policy"
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        expected = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # The tiny model declares float32, so the export is float32: 4 bytes per element.
    expected_bytes = 4 * sum(math.prod(s) for s in expected.values())
    out = tmp_path / "rows.json"
    torchrun(1, [str(ws.WORKER), "--model", str(model), "--bucket-mib", "1", "--repeats", "1", "--params-dtype",
                 "float32", "--engine-dtype", "float32", "--out", str(out), "--sync"])
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"export (fp32)", "export + sync into HF engine", "engine update_weights only",
                         "floor: copy_ into preallocated", "floor: clone (fresh memory)"}
    for r in rows.values():
        assert r["bytes"] == expected_bytes, r["what"]
        assert r["procs"] == 1 and 0 < r["best_s"] <= r["median_s"]
    # 1 MiB buckets: a tensor joins a bucket unless it would overflow it (the largest tensors,
    # above 1 MiB, travel alone), so there are at least total / 1 MiB buckets.
    assert rows["export (fp32)"]["buckets"] >= expected_bytes / 2**20


def test_recorded_command_leaves_out_where_results_go():
    argv = ["--layers", "1", "--write", "docs/benchmarks.md", "--vocab", "8192", "--write=x.md"]
    assert ws.measured_command(argv) == "python benchmarks/weight_sync.py --layers 1 --vocab 8192"
