"""Real CUDA IPC: flattened buckets of CUDA tensors reach a spawned receiver bit for bit.

The receiver is the SGLang emulator (``rlmt_megatron/testing/sglang_emulator.py``), which deserializes each
TP rank's payload as SGLang 0.5.23 does, including its patched ``rebuild_cuda_tensor`` that maps
the GPU UUID our serializer writes back to a device index. Skipped without a GPU.
"""

import base64

import pytest
import torch

from rlmt_megatron.testing import sglang_emulator
from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine
from rlmt_megatron.rollout.weight_sync.cuda_ipc import CudaIPCTransport, device_uuid, serialize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _buckets():
    g = torch.Generator(device="cuda").manual_seed(0)
    return [
        [("model.layers.0.input_layernorm.weight", torch.randn(3, device="cuda", generator=g).to(torch.bfloat16)),
         ("model.layers.0.self_attn.q_proj.weight", torch.randn(512, 1024, device="cuda", generator=g)),
         ("model.layers.0.mlp.up_proj.weight", torch.randn(64, 32, device="cuda", generator=g).t()),
         ("fp8", torch.randn(17, device="cuda", generator=g).to(torch.float8_e4m3fn))],
        [("model.norm.weight", torch.randn(1024, device="cuda", generator=g).to(torch.bfloat16)),
         ("ids", torch.arange(-5, 6, device="cuda"))],
    ]


def test_payload_is_a_handle_naming_the_gpu_by_uuid():
    t = torch.zeros(4 * 2**20, dtype=torch.uint8, device="cuda")
    payload = serialize({"flattened_tensor": t, "metadata": []})
    raw = base64.b64decode(payload)
    assert len(raw) < 64 * 1024  # a handle, not the 4 MiB of data
    assert device_uuid(torch.cuda.current_device()).encode() in raw


@pytest.mark.parametrize("tp_size", [1, 2])
def test_cuda_tensors_reach_the_receiver_bit_exact(tmp_path, tp_size):
    out = tmp_path / "state.pt"
    buckets = _buckets()
    with sglang_emulator.running(str(out), tp_size=tp_size) as url:
        engine = SGLangHTTPEngine(url, control_timeout=60, weight_sync_timeout=120)
        CudaIPCTransport(engine, engine_tp_size=tp_size).push(iter(buckets), version=2)
        got = sglang_emulator.dump_state(url, str(out))
    expected = {n: t.cpu() for b in buckets for n, t in b}
    for state in got["ranks"]:
        assert sorted(state) == sorted(expected)
        for name, t in expected.items():
            assert state[name].dtype == t.dtype and state[name].shape == t.shape, name
            a = state[name].contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(a, t.contiguous().reshape(-1).view(torch.uint8)), name
    assert engine.weight_version == 2
