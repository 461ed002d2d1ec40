"""Weights through the filesystem: each version becomes a loadable HF folder, then the engine loads it.

Layout of ``root`` (one trainer per root):

* ``v000012/`` -- version 12, complete: ``model.safetensors`` (or ``model-0000k-of-0000n``
  shards + ``model.safetensors.index.json``), ``config.json`` and the tokenizer files of the
  engine's base folder, so transformers, vLLM and SGLang can all load it as a model;
* ``.tmp-v000013-…/`` -- a version being written. It becomes ``v000013`` by one ``rename`` (atomic
  on one filesystem) after every file is written and fsynced, so a crash at any point leaves
  either the complete folder or only a ``.tmp-`` folder, which is never listed and is removed by
  the next transport on that root.

Writing streams: buckets are appended to a shard that is written once it reaches
``max_shard_bytes``, so the trainer holds at most one shard of weights beyond the current bucket.
After the engine has loaded a version, all but the newest ``keep_versions`` are deleted.

Loading: an engine with ``update_weights_from_disk`` (``SGLangHTTPEngine``) is told the folder's
path (``/update_weights_from_disk``; the server must see the same path: same machine or a shared
filesystem); any other engine gets ``update_weights`` fed from the files read back lazily, one
bucket of at most ``bucket_bytes`` at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from rlmt_megatron.checkpoint.safetensors_io import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    INDEX_NAME, SINGLE_NAME, SafetensorsReader, copy_tokenizer_files, fsync_path, pack_buckets, save_safetensors,
)
from rlmt_megatron.errors import CheckpointError
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.rollout.weight_sync.interfaces import WeightTransport

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def version_dirname(version: int) -> str:
    return f"v{version:06d}"


def _parse_version(name: str) -> Optional[int]:
    if name.startswith("v") and name[1:].isdigit():
        return int(name[1:])
    return None


def list_versions(root: str | Path) -> list[tuple[int, Path]]:
    """Complete versions under ``root``, oldest first (temp folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(_parse_version(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted((v, p) for v, p in found if v is not None)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes (safetensors refuses tensors that share storage,
    e.g. the q/k/v views split out of one fused weight)."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_version(buckets: Iterable[Bucket], folder: str | Path, base_dir: Optional[str | Path] = None,
                  max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write the buckets' tensors as an HF safetensors folder at ``folder`` (must not exist).

    Not atomic by itself: ``DiskTransport`` writes into a temp folder and renames it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True)
    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0
    seen: set[str] = set()

    def flush_shard():
        nonlocal shard, shard_bytes
        path = folder / f"part-{len(parts) + 1:05d}.safetensors"
        save_safetensors(shard, path)
        fsync_path(path)
        parts.append((path, list(shard)))
        shard, shard_bytes = {}, 0

    for bucket in buckets:
        for name, tensor in bucket:
            if name in seen:
                raise EngineError(f"disk weight sync: tensor '{name}' was sent twice")
            seen.add(name)
            t = _owned(tensor)
            nbytes = t.numel() * t.element_size()
            if shard and shard_bytes + nbytes > max_shard_bytes:
                flush_shard()
            shard[name] = t
            shard_bytes += nbytes
            total += nbytes
    if not seen:
        raise EngineError("disk weight sync: the bucket stream was empty")
    if shard:
        flush_shard()

    if len(parts) == 1:
        parts[0][0].rename(folder / SINGLE_NAME)
    else:
        weight_map = {}
        for k, (path, names) in enumerate(parts, start=1):
            final = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
            path.rename(folder / final)
            weight_map.update({n: final for n in names})
        index = folder / INDEX_NAME
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        fsync_path(index)
    if base_dir is not None:
        config = Path(base_dir) / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{base_dir}: no config.json to copy into the weight-sync folder")
        shutil.copy2(config, folder / "config.json")
        copy_tokenizer_files(base_dir, folder)
    fsync_path(folder)
    return folder


def read_buckets(folder: str | Path, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    """The folder's tensors, read lazily file by file, in buckets of at most ``bucket_bytes``
    (a larger tensor travels alone)."""
    return pack_buckets(SafetensorsReader(folder).iter_tensors(), bucket_bytes)


class DiskTransport(WeightTransport):
    """Write each version under ``root`` (atomically), then make ``engine`` load it."""

    def __init__(self, engine, root: str | Path, base_dir: Optional[str | Path], keep_versions: int = 2,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_shard_bytes: int = 4 * 2**30):
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, not {keep_versions}")
        self.engine = engine
        self.root = Path(root)
        self.base_dir = None if base_dir is None else Path(base_dir)
        self.keep_versions = int(keep_versions)
        self.bucket_bytes = int(bucket_bytes)
        self.max_shard_bytes = int(max_shard_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Folders a crashed write or replace left behind."""
        for p in self.root.iterdir():
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(OLD_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)

    def versions(self) -> list[tuple[int, Path]]:
        return list_versions(self.root)

    def write(self, buckets: Iterable[Bucket], version: int) -> Path:
        """Write ``version`` and make it visible in one rename; returns its folder."""
        final = self.root / version_dirname(version)
        tmp = self.root / f"{TMP_PREFIX}{version_dirname(version)}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            write_version(buckets, tmp, self.base_dir, self.max_shard_bytes)
            if final.exists():  # the same version pushed again (e.g. after a resume): replace it
                old = self.root / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def load(self, folder: Path, version: int) -> None:
        if hasattr(self.engine, "update_weights_from_disk"):
            self.engine.update_weights_from_disk(str(folder.resolve()), version)
        else:
            self.engine.update_weights(read_buckets(folder, self.bucket_bytes), version)

    def prune(self, keep: Path) -> None:
        versions = [p for _, p in self.versions()]
        for p in versions[:-self.keep_versions]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def push(self, buckets: Iterable[Bucket], version: int) -> None:
        self._remove_leftovers()
        folder = self.write(buckets, version)
        self.load(folder, version)
        self.prune(keep=folder)
