"""A rank's random-number generator states (Python, NumPy, torch CPU and CUDA, Megatron's
model-parallel tracker), captured in plain types and tensors so that a checkpoint can store them
with ``torch.save`` and load them back with ``weights_only=True``; the loop also uses them to
rewind an abandoned step."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlmt_megatron.errors import CheckpointError


def _tracker_states() -> dict[str, torch.Tensor]:
    """Megatron's model-parallel CUDA RNG tracker states, as CPU tensors (empty on CPU, where
    the compat layer keeps the tracker as book-keeping without states)."""
    from megatron.core import tensor_parallel

    out = {}
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        if isinstance(state, torch.Tensor):
            out[name] = state.detach().cpu().clone()
        elif isinstance(state, torch.Generator):  # graph-safe tracker keeps generators
            out[name] = state.get_state().cpu().clone()
    return out


def _set_tracker_states(saved: dict[str, torch.Tensor], path: Path) -> None:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    current = tracker.get_states()
    if set(saved) - set(current):
        raise CheckpointError(f"{path}: RNG tracker states {sorted(set(saved) - set(current))} are not "
                              f"registered in this job (it has {sorted(current)})")
    for name, state in saved.items():
        if isinstance(current[name], torch.Generator):
            current[name].set_state(state)
        else:
            current[name] = state.clone()
    tracker.set_states(current)


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states in plain types and tensors (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state().cpu() if torch.cuda.is_available() else None,
        "megatron_tracker": _tracker_states(),
    }


def restore_rng_state(state: dict[str, Any], path: Path) -> None:
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
        np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
        torch.set_rng_state(state["torch_cpu"])
        if state["torch_cuda"] is not None:
            if not torch.cuda.is_available():
                raise CheckpointError(f"{path}: holds a CUDA RNG state but this job has no GPU")
            torch.cuda.set_rng_state(state["torch_cuda"])
        tracker = state["megatron_tracker"]
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed RNG state ({type(e).__name__}: {e})") from None
    if tracker:
        _set_tracker_states(tracker, path)
