"""Run Megatron-Core's real code on a CPU-only machine (gloo backend).

Megatron-Core assumes CUDA in a handful of places that have nothing to do with the maths. On a
machine without CUDA we redirect exactly those, and nothing else, so that the same GPTModel, TP
layers, pipeline schedules, DDP and distributed optimizer run on CPU for tests and the demo:

1. ``torch.cuda.current_device()`` is used as an allocation device -> return the CPU device
   (and ``torch.cuda.set_device`` becomes a no-op).
2. The RNG tracker's ``add``/``fork`` read and write CUDA RNG state -> book-keeping only and a
   no-op context (CPU ops draw from the CPU generator, which the caller seeds); activation
   recomputation saves and restores the CUDA RNG state around the recomputed forward -> nothing
   to save on CPU (its CPU RNG state is still saved and restored).
3. Pipeline schedules allocate with a literal ``device="cuda"`` and call ``Tensor.cuda()`` /
   ``torch.cuda.synchronize()`` -> a ``TorchFunctionMode`` rewrites ``device="cuda"`` to CPU and
   makes ``Tensor.cuda`` the identity; ``synchronize`` becomes a no-op.
4. The optimizer and grad-clip code assert ``tensor.type() == 'torch.cuda.FloatTensor'`` ->
   ``Tensor.type()`` (no arguments) reports CPU tensors under their CUDA type name. The rewrite
   happens once, inside the mode's handler, where the mode is disabled, so it is never applied
   twice.

``activate()`` is idempotent and does nothing when CUDA is available.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_active_mode: "_CudaToCpuMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch function call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        return func(*args, **kwargs)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = None

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        yield

    mrandom.CudaRNGStatesTracker.add = add
    mrandom.CudaRNGStatesTracker.fork = fork
    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def is_active() -> bool:
    return _active_mode is not None


def activate() -> bool:
    """Install the CPU redirections if CUDA is absent. Returns True when they are active."""
    global _active_mode
    if torch.cuda.is_available():
        return False
    with _lock:
        if _active_mode is not None:
            return True
        torch.cuda.current_device = lambda: _CPU
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.set_device = lambda *a, **k: None
        _patch_rng_tracker()
        _active_mode = _CudaToCpuMode()
        _active_mode.__enter__()
    return True
