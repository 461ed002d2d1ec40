"""The CPU compatibility layer redirects exactly the CUDA assumptions listed in its docstring."""

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive when CUDA exists")


def test_redirections():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    from rlmt_megatron.distributed import cpu_compat

    assert cpu_compat.activate() and cpu_compat.activate()  # idempotent
    assert torch.cuda.current_device() == torch.device("cpu")
    t = torch.empty(3, device="cuda")
    assert t.device.type == "cpu"
    assert t.cuda() is t
    assert torch.zeros(2).to("cuda").device.type == "cpu"
    # Megatron's optimizer asserts this exact string; a second query must not become "torch.cuda.cuda."
    assert t.type() == "torch.cuda.FloatTensor" and t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # type conversion with an argument is untouched
    assert t.type(torch.float64).dtype == torch.float64
    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        pass
    assert torch.equal(before, torch.get_rng_state())
    torch.cuda.synchronize()
