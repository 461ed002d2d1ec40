"""Colocated SGLang: weights handed over as CUDA IPC handles of flattened buckets.

What SGLang 0.5.23 does with ``/update_weights_from_tensor`` (``load_format="flattened_bucket"``),
read from the wheel's source:

* ``serialized_named_tensors`` holds one payload per server TP rank, and each rank deserializes
  only its own (``tp_worker.py::deserialize_own_rank``), with ``MultiprocessingSerializer``
  (``srt/utils/common.py``): base64-decode (``validate=True``), then ``SafeUnpickler`` -- a plain
  ``pickle.Unpickler`` that only resolves the globals in its ``ALLOWED_GLOBALS`` (torch's rebuild
  functions, tensor/storage types, dtypes, ``torch.Size``, ``types.SimpleNamespace``,
  ``multiprocessing.resource_sharer.DupFd``, sglang's ``FlattenedTensorMetadata``, ...). The sender
  side is ``ForkingPickler(buf).dump(obj)`` + base64 (``serialize(obj, output_str=True)``).
* the payload is ``{"flattened_tensor": uint8 1-D tensor, "metadata": [m, ...]}``; the model
  runner (``weight_updater.py::_update_weights_from_flattened_bucket``) reads ``m.name, m.shape,
  m.dtype, m.start_idx, m.end_idx, m.numel`` and ``FlattenedTensorBucket.reconstruct_tensors``
  (``srt/weight_sync/tensor_bucket.py``) makes each tensor as
  ``flat[start_idx:end_idx].view(dtype).reshape(shape)``; ``numel`` is the byte count.
* before deserializing, the server patches torch's ``rebuild_cuda_tensor``
  (``srt/utils/patch_torch.py``) so that argument 6 (the device) may be a GPU UUID string, mapped
  to the local index of that GPU; senders patch ``reduce_tensor`` to put the UUID there. This is
  what makes the handle resolve to the same physical GPU when the trainer's and the server's
  processes see different ``CUDA_VISIBLE_DEVICES``.

What this module sends, and why it is equivalent without importing sglang:

* metadata entries are ``types.SimpleNamespace`` with exactly the fields of
  ``FlattenedTensorMetadata`` (SimpleNamespace is in ``ALLOWED_GLOBALS``, and the server reads
  attributes only); pickling sglang's own dataclass would need sglang in the trainer's env;
* each tensor starts at a multiple of its element size. ``FlattenedTensorBucket`` itself packs
  without gaps, which breaks ``.view(dtype)`` when, say, an odd-length bf16 tensor precedes a
  float32 one; the gaps are invisible to reconstruction, which slices by ``start_idx:end_idx``;
* CUDA tensors are pickled by torch's own ``reduce_tensor`` with the device index replaced by the
  device's UUID, as sglang's patched reducer does, through a pickler-local dispatch entry (torch's
  global reducers are left alone);
* the bucket is serialized once per TP rank, as SGLang's ``Engine`` does, so the producer-side
  CUDA IPC reference counts drop once every rank has loaded.

CPU tensors go through the same serializer as shared-memory file descriptors (``DupFd``); a
receiver can only open those if it shares this process's multiprocessing authkey (a process it
spawned), which is how the CPU tests emulate the server. Only a GPU proves the CUDA IPC handles
themselves (``tests/gpu/test_gpu_cuda_ipc.py``).

Scope: every payload of this transport refers to memory on this process's GPU. Each server TP
rank maps it (CUDA IPC works across the GPUs of one node) and copies its shard. With one pipeline
stage the run feeds each server TP rank from the trainer rank on its own GPU instead
(``same_gpu_ipc.py``, which uses this module's flattening and serializer).
"""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace
from typing import Iterable, Iterator, Optional

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's reducers with ForkingPickler
from torch.multiprocessing import reductions
from multiprocessing.reduction import ForkingPickler

from rlmt_megatron.rollout.engine import Bucket, EngineError
from rlmt_megatron.rollout.weight_sync.interfaces import WeightTransport

_DEVICE_ARG = 6  # index of the device in rebuild_cuda_tensor's arguments (sglang patch_torch.py)


def flatten_bucket(bucket: Bucket, device: Optional[torch.device | str] = None) -> tuple[torch.Tensor, list[SimpleNamespace]]:
    """One uint8 tensor holding every tensor's bytes, and the metadata SGLang reconstructs from."""
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    metadata: list[SimpleNamespace] = []
    end = 0
    for name, tensor in bucket:
        itemsize = tensor.element_size()
        start = -(-end // itemsize) * itemsize  # aligned, so the slice can be viewed as the dtype
        nbytes = tensor.numel() * itemsize
        metadata.append(SimpleNamespace(name=name, shape=torch.Size(tensor.shape), dtype=tensor.dtype,
                                        start_idx=start, end_idx=start + nbytes, numel=nbytes))
        end = start + nbytes
    # empty, not zeros: every byte a receiver reads is written below (alignment gaps are never
    # read), and zero-filling a 512 MiB bucket would add a full extra write per sync.
    flat = torch.empty(end, dtype=torch.uint8, device=device if device is not None else bucket[0][1].device)
    for (name, tensor), meta in zip(bucket, metadata):
        if meta.numel:
            flat[meta.start_idx:meta.end_idx].copy_(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    return flat, metadata


def device_uuid(index: int) -> str:
    """How sglang names a GPU in a CUDA IPC handle (``patch_torch._device_to_uuid``)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_tensor(tensor: torch.Tensor):
    fn, args = reductions.reduce_tensor(tensor)
    if tensor.device.type == "cuda" and isinstance(args[_DEVICE_ARG], int):
        args = (*args[:_DEVICE_ARG], device_uuid(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
    return fn, args


def serialize(obj) -> str:
    """``MultiprocessingSerializer.serialize(obj, output_str=True)`` with sglang's device-UUID patch."""
    buf = io.BytesIO()
    pickler = ForkingPickler(buf)
    pickler.dispatch_table[torch.Tensor] = _reduce_tensor  # this pickler only
    pickler.dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def serialize_bucket(flat: torch.Tensor, metadata: list[SimpleNamespace], tp_size: int) -> list[str]:
    """``serialized_named_tensors`` for one flattened bucket: one payload per server TP rank."""
    payload = {"flattened_tensor": flat, "metadata": metadata}
    return [serialize(payload) for _ in range(tp_size)]


class CudaIPCTransport(WeightTransport):
    """Push buckets to a colocated ``SGLangHTTPEngine`` through ``/update_weights_from_tensor``.

    ``device`` is where the flattened buckets live (default: this process's current GPU).
    ``device="cpu"`` sends shared-memory handles instead, which only a process spawned by this one
    can open: tests use it to emulate the server; a real SGLang server cannot.
    """

    def __init__(self, engine, engine_tp_size: int = 1, device: Optional[str | torch.device] = None):
        if engine_tp_size < 1:
            raise ValueError(f"engine_tp_size must be >= 1, not {engine_tp_size}")
        if device is None:
            if not torch.cuda.is_available():
                raise EngineError(f"{engine.name} engine: the cuda_ipc weight transport needs a GPU in the trainer's "
                                  "process (use transport nccl or disk otherwise)")
            device = torch.device("cuda", torch.cuda.current_device())
        self.engine = engine
        self.engine_tp_size = int(engine_tp_size)
        self.device = torch.device(device)

    def _payloads(self, buckets: Iterable[Bucket]) -> Iterator[list[str]]:
        for bucket in buckets:
            flat, metadata = flatten_bucket(bucket, self.device)
            payloads = serialize_bucket(flat, metadata, self.engine_tp_size)
            yield payloads
            # The server answered: every rank has loaded (and closed) its handle.
            del flat, payloads
            if self.device.type == "cuda":
                torch.cuda.ipc_collect()

    def push(self, buckets: Iterable[Bucket], version: int) -> None:
        self.engine.update_weights_from_tensor(self._payloads(buckets), version)
