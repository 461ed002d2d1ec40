"""Megatron distributed checkpoints (``megatron.core.dist_checkpointing``) for resume and convert.

A checkpoint folder holds the sharded tensors, keyed by global names and offsets, so it loads back
at any TP x PP x VPP plus ``rlmt_model.json`` with what is needed to rebuild the model without the original
HF folder: the HF config, the role and the padded vocabulary size. Tokenizer files are copied
beside it so an export needs nothing else.

Stop signals during a save: a stop signal (run.stop_signals) may reach every process of the job
(SLURM preemption and scancel signal them all, torchrun forwards to each rank's process group),
but the ranks answer it by *writing* a checkpoint, so no helper process of the writer may die of
it. See :func:`writer_survives_stop_signals`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from rlmt_megatron.errors import CheckpointError
from rlmt_megatron.models.builder import BuiltModel

META_NAME = "rlmt_model.json"
FORMAT_VERSION = 1


# Every signal run.stop_signals accepts: the default action of each one kills a process.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
_saving = False


def _writer_child_ignores_stop_signals() -> None:
    # Runs in the child of every os.fork; only forks made during a save (the writer's worker
    # processes) ignore the stop signals. Changing the child only: the rank keeps its handlers.
    if _saving:
        for s in _STOP_SIGNALS:
            try:
                signal.signal(s, signal.SIG_IGN)
            except ValueError:  # forked from a thread other than the main one
                return


os.register_at_fork(after_in_child=_writer_child_ignores_stop_signals)


@contextlib.contextmanager
def writer_survives_stop_signals() -> Iterator[None]:
    """Around ``dist_checkpointing.save``: its helper processes outlive a stop signal.

    Megatron-Core's torch_dist save (``FileSystemWriterAsync``, also for synchronous saves)
    uses two kinds of helper processes (megatron/core/dist_checkpointing/strategies/
    filesystem_async.py):

    * ``_get_write_results_queue`` returns a queue of a ``multiprocessing`` *spawn* Manager,
      started at the first save and kept for the life of the process. A spawned interpreter has
      the default SIGTERM action, so a stop signal sent to the whole job kills it and the next
      save (the stop checkpoint) fails with BrokenPipeError in
      ``write_preloaded_data_multiproc``'s ``global_results_queue.put``. A synchronous save puts
      to and reads from that queue in the rank itself, so an in-process queue does the same job
      without the Manager (set once; Megatron only creates its own when none is set).
    * ``write_preloaded_data_multiproc`` *forks* one writer per bucket (``thread_count``, 2) for
      each save; these ignore the stop signals (set in the child, see above). The rank keeps its
      handlers and so never misses the signal: it stops after the checkpoint it is writing.
    """
    global _saving
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
        filesystem_async._results_queue = queue.Queue()
    _saving = True
    try:
        yield
    finally:
        _saving = False


def _sharded_state_dict(built: BuiltModel) -> dict:
    if len(built.chunks) == 1:
        return built.chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(built.chunks)}


def save_model_checkpoint(built: BuiltModel, ckpt_dir: str | Path, tokenizer_src: Optional[str | Path] = None) -> Path:
    """Save ``built`` (collective over all ranks) to ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    from rlmt_megatron.checkpoint.safetensors_io import copy_tokenizer_files

    ckpt = Path(ckpt_dir)
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with writer_survives_stop_signals():
        dist_checkpointing.save(_sharded_state_dict(built), str(ckpt))
    if dist.get_rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "role": built.role,
            "padded_vocab_size": built.padded_vocab_size,
            # The tensors are stored in the model's dtype; exports write that dtype, not the
            # source's (a float32 model converted in bf16 holds bf16-rounded values).
            "hf_config": {**built.spec.raw, "torch_dtype": built.build.precision.params_dtype,
                          "dtype": built.build.precision.params_dtype},
        }
        (ckpt / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, ckpt)
    dist.barrier()
    return ckpt


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / META_NAME
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a directory (expected a Megatron checkpoint folder)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a checkpoint written by rlmt_megatron)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    for key in ("role", "padded_vocab_size", "hf_config"):
        if key not in meta:
            raise CheckpointError(f"{path}: field '{key}' is missing")
    return meta


def load_model_checkpoint(built: BuiltModel, ckpt_dir: str | Path) -> None:
    """Load tensors saved by :func:`save_model_checkpoint` into ``built`` (any layout)."""
    from megatron.core import dist_checkpointing

    try:
        state = dist_checkpointing.load(_sharded_state_dict(built), str(ckpt_dir))
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: cannot load the Megatron checkpoint ({type(e).__name__}: {e})") from None
    # strict: every parameter must come from the checkpoint, none keeps its random init.
    if len(built.chunks) == 1:
        built.chunks[0].load_state_dict(state, strict=True)
    else:
        for i, chunk in enumerate(built.chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=True)
