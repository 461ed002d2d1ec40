"""The weight-sync benchmark's colocated rows on a GPU: the SGLang emulator holding its weights on
the same GPU takes real CUDA IPC handles and copies them in, and the worker's CUDA IPC row carries
every byte of the tiny model. Skipped without a GPU."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from benchmarks import weight_sync as ws
from helpers import torchrun
from test_weight_sync_bench import push_model_and_refusals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_emulated_server_copies_cuda_ipc_buckets_into_gpu_weights(tiny_models, tmp_path):
    stats, got, expected = push_model_and_refusals(tiny_models / "llama-policy", tmp_path / "state.pt",
                                                   "bfloat16", "cuda:0")
    (weights,) = got["ranks"]
    assert sorted(weights) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(weights[name], t.to(torch.bfloat16)), name
    assert stats["bytes"] == [sum(t.numel() * t.element_size() for t in expected.values())]


def test_worker_cuda_ipc_row_on_gpu(tiny_models, tmp_path):
    model = tiny_models / "llama-policy"
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        expected_bytes = 4 * sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # float32 model
    out = tmp_path / "rows.json"
    torchrun(1, [str(ws.WORKER), "--model", str(model), "--bucket-mib", "1", "--repeats", "2", "--params-dtype",
                 "float32", "--engine-dtype", "bfloat16", "--out", str(out), "--sync"])
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    ipc = rows["export + sync via CUDA IPC (SGLang protocol, emulated server)"]
    assert ipc["bytes"] == expected_bytes and ipc["buckets"] >= expected_bytes / 2**20
    assert rows["floor: copy_ into preallocated"]["bytes"] == expected_bytes  # the bandwidth is measured on as much
