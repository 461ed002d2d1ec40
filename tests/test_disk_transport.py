"""Disk weight transport: atomic versioned HF folders, loaded by the HF engine (read back bucket by
bucket) and by SGLang (``/update_weights_from_disk``, against the emulated server).

The reference checksum is computed independently of torch and the safetensors library: it parses
the safetensors files' bytes (8-byte header length, JSON header, data offsets) and hashes them with
the formula ``weight_sync/checksum.py`` documents (per tensor sha256 of "name|dtype|shape|" + bytes,
combined in name order).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO
from test_sglang_protocol import FIELDS_BY_CLASS
from rlmt_megatron.testing import sglang_emulator
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.rollout.weight_sync.disk import DiskTransport, list_versions, read_buckets

_ST_DTYPES = {"F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16", "F64": "torch.float64",
              "I64": "torch.int64", "I32": "torch.int32", "BOOL": "torch.bool", "U8": "torch.uint8"}


def reference_checksum(files) -> str:
    digests = {}
    for path in files:
        raw = Path(path).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            h = hashlib.sha256(f"{name}|{_ST_DTYPES[info['dtype']]}|{tuple(info['shape'])}|".encode())
            h.update(raw[8 + n + begin: 8 + n + end])
            assert name not in digests
            digests[name] = h.digest()
    total = hashlib.sha256()
    for name in sorted(digests):
        total.update(digests[name])
    return total.hexdigest()


@pytest.fixture(scope="module")
def source(tiny_models, tmp_path_factory):
    """The tiny policy's weights, perturbed (so a sync visibly changes the engine), as a file."""
    weights = load_file(str(tiny_models / "llama-policy" / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    changed = {n: t + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in weights.items()}
    path = tmp_path_factory.mktemp("source") / "model.safetensors"
    save_file(changed, str(path))
    return path


def _buckets(path, bucket_bytes=64 * 1024):
    return read_buckets(path.parent, bucket_bytes)


def test_hf_engine_loads_a_disk_version_exactly(tiny_models, source, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlmt_megatron.rollout.hf_engine import HFEngine

    base = tiny_models / "llama-policy"
    engine = HFEngine(base, device="cpu")
    assert engine.checksum() != reference_checksum([source])
    seen = []

    class Watch:  # records the buckets the engine is fed, then forwards them
        name = "hf"

        def update_weights(self, buckets, version):
            def tap():
                for b in buckets:
                    seen.append((sum(t.numel() * t.element_size() for _, t in b), len(b)))
                    yield b
            engine.update_weights(tap(), version)

    transport = DiskTransport(Watch(), tmp_path / "sync", base, keep_versions=2, bucket_bytes=100_000,
                              max_shard_bytes=300_000)
    transport.push(_buckets(source), version=1)
    assert engine.weight_version == 1
    assert engine.checksum() == reference_checksum([source])
    assert len(seen) > 2 and all(size <= 100_000 or n == 1 for size, n in seen)  # read back bucket by bucket
    folder = tmp_path / "sync" / "v000001"
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    assert reference_checksum(shards) == reference_checksum([source])
    assert (folder / "config.json").read_text() == (base / "config.json").read_text()
    assert (folder / "tokenizer.json").is_file()
    # the folder is a model transformers loads, holding exactly the pushed tensors
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    expected = load_file(str(source))
    params = dict(model.named_parameters())
    for name, t in expected.items():
        assert torch.equal(params[name].detach(), t), name


def test_read_buckets_respects_the_budget(source):
    sizes = [[t.numel() * t.element_size() for _, t in b] for b in read_buckets(source.parent, 50_000)]
    assert len(sizes) > 2
    assert all(sum(s) <= 50_000 or len(s) == 1 for s in sizes)
    assert sum(len(s) for s in sizes) == len(load_file(str(source)))


class _Recording:
    name = "hf"

    def __init__(self):
        self.got = []

    def update_weights(self, buckets, version):
        self.got.append((version, {n: t.clone() for b in buckets for n, t in b}))


def test_keeps_the_last_versions_and_replaces_a_repeated_one(tmp_path):
    engine = _Recording()
    transport = DiskTransport(engine, tmp_path, None, keep_versions=2)
    for v in (1, 2, 3):
        transport.push([[("w", torch.full((2,), float(v)))]], v)
    assert [v for v, _ in list_versions(tmp_path)] == [2, 3]
    transport.push([[("w", torch.full((2,), 30.0))]], 3)  # same version again (e.g. after a resume)
    assert [v for v, _ in list_versions(tmp_path)] == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000002", "v000003"]
    assert torch.equal(load_file(str(tmp_path / "v000003" / "model.safetensors"))["w"], torch.full((2,), 30.0))
    assert [(v, s["w"][0].item()) for v, s in engine.got] == [(1, 1.0), (2, 2.0), (3, 3.0), (3, 30.0)]
    with pytest.raises(EngineError, match="'w' was sent twice"):
        transport.push([[("w", torch.ones(1))], [("w", torch.ones(1))]], 4)
    with pytest.raises(EngineError, match="empty"):
        transport.push([], 5)


def test_shared_storage_views_are_written(tmp_path):
    """Exported q/k/v are views of one fused tensor; safetensors refuses shared storage."""
    fused = torch.arange(12.0).reshape(6, 2)
    q, k = fused[:4], fused[4:]
    engine = _Recording()
    DiskTransport(engine, tmp_path, None).push([[("q", q), ("k", k)]], 1)
    assert torch.equal(engine.got[0][1]["q"], q) and torch.equal(engine.got[0][1]["k"], k)


def test_exception_mid_write_leaves_nothing_visible(tmp_path):
    engine = _Recording()
    transport = DiskTransport(engine, tmp_path, None, max_shard_bytes=16)
    transport.push([[("w", torch.ones(2))]], 1)

    def failing():
        yield [("a", torch.ones(8))]
        yield [("b", torch.ones(8))]  # the first shard is on disk by now
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        transport.push(failing(), 2)
    assert [v for v, _ in list_versions(tmp_path)] == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["v000001"]
    assert [v for v, _ in engine.got] == [1]


def test_crash_mid_write_leaves_no_version_visible(tmp_path):
    """The writing process dies (os._exit) after one shard hit the disk: only a temp folder is
    left, never listed, and removed by the next transport on that root."""
    DiskTransport(_Recording(), tmp_path, None).push([[("w", torch.ones(2))]], 1)
    script = textwrap.dedent(f"""
        import os, torch
        from rlmt_megatron.rollout.weight_sync.disk import DiskTransport
        class Engine:
            name = "hf"
            def update_weights(self, buckets, version):
                raise AssertionError("never loaded")
        def buckets():
            yield [("a", torch.ones(8))]
            yield [("b", torch.ones(8))]
            os._exit(7)
        DiskTransport(Engine(), {str(tmp_path)!r}, None, max_shard_bytes=16).push(buckets(), 2)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and list(leftovers[0].glob("*.safetensors"))  # half-written, hidden
    assert [v for v, _ in list_versions(tmp_path)] == [1]
    engine = _Recording()
    transport = DiskTransport(engine, tmp_path, None)
    assert [p.name for p in tmp_path.iterdir()] == ["v000001"]
    transport.load(tmp_path / "v000001", 1)
    assert torch.equal(engine.got[0][1]["w"], torch.ones(2))


def test_sglang_loads_from_disk(tmp_path, tiny_models, source):
    from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine

    out = tmp_path / "state.pt"
    root = tmp_path / "sync"
    with sglang_emulator.running(str(out)) as url:
        engine = SGLangHTTPEngine(url, control_timeout=30, weight_sync_timeout=60)
        engine.sleep()
        DiskTransport(engine, root, tiny_models / "llama-policy", max_shard_bytes=300_000).push(_buckets(source), 4)
        got = sglang_emulator.dump_state(url, str(out))
    assert engine.weight_version == 4
    log = [(p, b) for p, b in got["log"] if not p.startswith("/_emulator")]
    assert [p for p, _ in log] == ["/release_memory_occupation", "/resume_memory_occupation", "/update_weights_from_disk"]
    assert log[1][1] == {"tags": ["weights"]}
    body = log[2][1]
    assert set(body) <= FIELDS_BY_CLASS["UpdateWeightFromDiskReqInput"] and "model_path" in body
    assert body["model_path"] == str((root / "v000004").resolve()) and body["weight_version"] == "4"
    expected = load_file(str(source))
    state = got["ranks"][0]
    assert sorted(state) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(state[name], t), name
