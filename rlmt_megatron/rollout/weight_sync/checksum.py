"""A checksum of named tensors: the trainer and the engine compute it the same way, so equal
checksums mean the engine holds exactly the trainer's weights (names, dtypes, shapes, bytes)."""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
