"""GPU check (skipped without CUDA): the world started by bootstrap carries both backends, so the
loop's CPU book-keeping tensors (gloo) and device tensors (NCCL) both reduce, in the default
group and in Megatron's groups."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_and_cuda_tensors_reduce_in_every_group():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from rlmt_megatron.config.model_build import ParallelConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.runner.model_runner import global_counts
    from rlmt_megatron.runner.batching import Sample

    bootstrap.initialize(ParallelConfig())
    try:
        for group in (None, parallel_state.get_data_parallel_group(), parallel_state.get_tensor_model_parallel_group()):
            cpu = torch.ones(3, dtype=torch.float64)
            gpu = torch.ones(3, device="cuda")
            dist.all_reduce(cpu, group=group)
            dist.all_reduce(gpu, group=group)
            assert cpu.tolist() == gpu.tolist() == [1.0, 1.0, 1.0]
        sample = Sample(torch.arange(5), {"loss_mask": torch.tensor([0.0, 1.0, 1.0, 1.0])})
        counts, n, fewest = global_counts([sample])
        assert (counts.num_tokens, counts.num_seqs, n, fewest) == (3.0, 1.0, 1, 1)
    finally:
        bootstrap.shutdown()
