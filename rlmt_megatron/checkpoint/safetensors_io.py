"""Read and write HF safetensors folders (single file or sharded with an index).

Reading is by slice: a TP rank asks for its rows or columns and the file is memory-mapped, so a
rank never materialises a tensor it does not own. Every failure names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rlmt_megatron.errors import CheckpointError
from rlmt_megatron.file_modes import apply_default_mode

# The unit of every weight stream (export, sync, disk folders): HF-named tensors, in order.
Bucket = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 * 2**20

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
    """Name -> file lookup over an HF folder, with sliced reads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self._file_of = {name: self.folder / f for name, f in weight_map.items()}
        elif single.is_file():
            self._file_of = {name: single for name in self._keys(single)}
        else:
            raise CheckpointError(
                f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)"
            )
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        return self._handles[path]

    def check_files(self) -> None:
        """Open every file's header now, so that a truncated or missing file is named before any
        model is built rather than deep inside a loader."""
        for path in sorted(set(self._file_of.values())):
            self._handle(path)

    def names(self) -> set[str]:
        return set(self._file_of)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, read lazily file by file (files in name order, tensors in file order)."""
        files: dict[Path, list[str]] = {}
        for name, path in self._file_of.items():
            files.setdefault(path, []).append(name)
        for path in sorted(files):
            handle = self._handle(path)
            wanted = set(files[path])
            for name in handle.keys():
                if name in wanted:
                    try:
                        yield name, handle.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"{path}: tensor '{name}' cannot be read ({e})") from None

    def _slice(self, name: str):
        path = self._file_of.get(name)
        if path is None:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        try:
            return self._handle(path).get_slice(name), path
        except SafetensorError as e:
            raise CheckpointError(f"{path}: tensor '{name}' cannot be read ({e})") from None

    def shape(self, name: str) -> list[int]:
        sl, _ = self._slice(name)
        return list(sl.get_shape())

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Read ``name``, or only ``[start:stop]`` along ``dim``."""
        sl, path = self._slice(name)
        try:
            if dim is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, stop)
            return sl[tuple(index)]
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: tensor '{name}' cannot be read ({e})") from None


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into buckets of at most ``bucket_bytes`` (a larger tensor
    travels alone), pulling the stream only as far as the current bucket needs."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """One safetensors file as transformers writes it (``format: pt``), with the mode a plain
    ``open()`` gives: safetensors creates its files 0600 whatever the umask."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    apply_default_mode(path)


def write_safetensors_folder(
    tensors: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int = 4 * 2**30
) -> list[Path]:
    """Write ``tensors`` as one file, or shards plus an index when larger than ``max_shard_bytes``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = [{name: t.contiguous() for name, t in shard} for shard in pack_buckets(tensors.items(), max_shard_bytes)]
    shards = shards or [{}]
    if len(shards) == 1:
        path = folder / SINGLE_NAME
        save_safetensors(shards[0], path)
        return [path]
    paths, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        path = folder / f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, path)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return paths


def copy_tokenizer_files(src: str | Path, dst: str | Path, names: Iterable[str] = ()) -> list[str]:
    """Copy tokenizer and generation files from an HF folder; returns the names copied."""
    import shutil

    wanted = set(names) or {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_template.json",
        "generation_config.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
    }
    copied = []
    for name in sorted(wanted):
        path = Path(src) / name
        if path.is_file():
            shutil.copy2(path, Path(dst) / name)
            copied.append(name)
    return copied


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
