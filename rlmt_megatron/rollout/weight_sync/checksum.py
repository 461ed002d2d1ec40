"""A checksum of named tensors: the trainer and the engine compute it the same way, so equal
checksums mean the engine holds exactly the trainer's weights (names, dtypes, shapes, bytes).

Each tensor is hashed on its own and the per-tensor digests are combined in name order, so the
trainer can checksum a bucket stream as it flows to the engine without holding every tensor.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


class StreamingChecksum:
    """Add tensors in any order; ``hexdigest()`` equals ``tensors_checksum`` of the same set."""

    def __init__(self):
        self._digests: dict[str, bytes] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._digests:
            raise ValueError(f"tensor {name} added twice to a checksum")
        self._digests[name] = tensor_digest(name, t)

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._digests):
            h.update(self._digests[name])
        return h.hexdigest()


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    c = StreamingChecksum()
    for name, t in named:
        c.add(name, t)
    return c.hexdigest()
