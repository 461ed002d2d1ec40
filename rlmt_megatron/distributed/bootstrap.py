"""The one place that starts torch.distributed and Megatron-Core's parallel state.

Backend: with CUDA, ``cpu:gloo,cuda:nccl`` — weights, activations and gradients are CUDA
tensors and go through NCCL, while the loop's small book-keeping collectives (token counts,
metric sums, stop flags, pickled objects) use CPU tensors, which an NCCL-only group refuses
("no backend type associated with device type cpu"); every group Megatron creates inherits
both. Without CUDA, gloo (with the CPU compatibility layer). Under
torchrun the rendezvous comes from the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``, ``LOCAL_RANK``); a plain ``python`` process becomes a world of one on a free
local port, so every CLI also works without torchrun.

Timeouts: ``timeout_minutes`` bounds every collective of the world and of Megatron's groups
(gloo raises; NCCL's own watchdog aborts the communicator, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``
at its default), so a rank that never arrives ends the job instead of hanging it. rlmt-train
takes it from ``run.collective_timeout_minutes``.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed import cpu_compat
from rlmt_megatron.distributed.collectives import free_port
from rlmt_megatron.distributed.layout_checks import check_world_size


def init_process_group(timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed once; a no-op when it is already initialised."""
    if dist.is_initialized():
        return
    if "RANK" in os.environ:  # torchrun / SLURM-launched torchrun: rendezvous from the environment
        rendezvous = {}
    else:  # a plain process: a world of one, without touching os.environ (children inherit it)
        rendezvous = dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if torch.cuda.is_available():
        # modulo: under per-task CUDA_VISIBLE_DEVICES (srun --gpus-per-task) each rank sees one GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        cpu_compat.activate()
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes), **rendezvous)


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: float = 30.0) -> int:
    """Start torch.distributed and Megatron's TP/PP/DP groups for ``parallel``.

    Returns the data-parallel size. Re-initialising with a different layout tears down the
    previous model-parallel groups first (tests and CLIs build several roles in one process).
    """
    from megatron.core import parallel_state, tensor_parallel

    init_process_group(timeout_minutes)
    world = dist.get_world_size()
    check_world_size(parallel, world)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        distributed_timeout_minutes=timeout_minutes,  # a float is fine (timedelta(minutes=...)); int() made 0.5 zero
    )
    # Same seed on every rank; on GPU Megatron offsets it per TP rank for model-parallel regions
    # (its RNG tracker is book-keeping only on CPU, see cpu_compat).
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return world // (parallel.tp * parallel.pp)


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (end of a CLI or test worker), and free
    every process group object while the interpreter is whole.

    ``destroy_process_group`` only unregisters the groups: a group object lives on, with its
    gloo threads, while anything still refers to it, and is then destroyed during interpreter
    finalization, where its threads can take the process down with SIGABRT ("terminate called
    without an active exception") after a run that finished; torchrun then reports the job
    failed. Megatron-Core 0.16 keeps two references past ``destroy_model_parallel``: the
    ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP[_GLOO]`` globals, which it never resets, and
    ``RotaryEmbedding.forward``'s ``lru_cache``, which keeps its modules (and their
    ``cp_group``) alive. The rest are cycles between modules, freed by a collection.
    """
    import gc

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for name, value in list(vars(parallel_state).items()):
        if name.isupper() and isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    if hasattr(RotaryEmbedding.forward, "cache_clear"):
        RotaryEmbedding.forward.cache_clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
