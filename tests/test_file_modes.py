"""Every file a run writes gets the mode of a plain ``open()``: 0o666 less the umask.

The atomic writers (tempfile + rename) and safetensors create files 0600 by themselves, so a
group sharing the run folder could not read final_hf/ or config.yaml. The reference mode comes
from a file created with a plain ``open()`` under the same umask.
"""

import os
import stat
from pathlib import Path

import pytest
import torch


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request, tmp_path):
    old = os.umask(request.param)
    try:
        ref = tmp_path / "plain"
        with open(ref, "w"):
            pass
        yield stat.S_IMODE(ref.stat().st_mode)
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_reference_mode(umask):
    assert umask in (0o644, 0o640, 0o664)


def test_text_writers(umask, tmp_path):
    from rlmt_megatron.monitoring.metrics import atomic_write_text, encode_line, truncate_metrics, write_resolved_config
    from rlmt_megatron.monitoring.samples import write_samples

    cfg = write_resolved_config(tmp_path / "run", {"a": 1})
    assert cfg.name == "config.yaml" and _mode(cfg) == umask

    metrics = tmp_path / "run" / "metrics.jsonl"
    atomic_write_text(metrics, encode_line(1, {"x": 1.0}) + encode_line(2, {"x": 2.0}))
    assert _mode(metrics) == umask
    os.chmod(metrics, 0o600)  # the rewrite must not keep a stricter mode either
    assert truncate_metrics(metrics, 1) == 1
    assert _mode(metrics) == umask

    row = {"prompt": "p", "thinking": None, "answer": "a", "reward": 1.0, "format_ok": True,
           "response_tokens": 3, "finish_reason": "stop", "weight_version": 1}
    path = write_samples(tmp_path / "run", 3, [row])
    assert _mode(path) == umask
    # No temporary file is left behind.
    assert not [p for p in (tmp_path / "run").rglob("*.tmp")]


@pytest.mark.parametrize("shard_bytes", [1 << 30, 16], ids=["single", "sharded"])
def test_safetensors_folder(umask, tmp_path, shard_bytes):
    from rlmt_megatron.checkpoint.safetensors_io import write_safetensors_folder

    tensors = {"a": torch.zeros(8), "b": torch.ones(8)}
    paths = write_safetensors_folder(tensors, tmp_path / "hf", max_shard_bytes=shard_bytes)
    assert len(paths) == (1 if shard_bytes > 100 else 2)
    written = sorted((tmp_path / "hf").iterdir())
    assert written and all(_mode(p) == umask for p in written), [(p.name, oct(_mode(p))) for p in written]


def test_weight_sync_disk_versions(umask, tmp_path):
    """The disk transport's version folders: the engine (maybe another user's server) reads them."""
    from rlmt_megatron.rollout.weight_sync.disk import write_version

    folder = write_version([[("a", torch.zeros(8))], [("b", torch.ones(8))]], tmp_path / "v1", max_shard_bytes=16)
    written = sorted(folder.glob("*.safetensors"))
    assert len(written) == 2 and all(_mode(p) == umask for p in written), [(p.name, oct(_mode(p))) for p in written]


def test_hf_export_folder(tiny_models, world_of_one, tmp_path):
    """final_hf/: safetensors, config.json and the tokenizer files."""
    from rlmt_megatron.checkpoint.hf_export import save_hf_folder
    from rlmt_megatron.checkpoint.load import load_model

    built = load_model(tiny_models / "llama-policy", "policy", world_of_one)
    old = os.umask(0o022)
    try:
        out = save_hf_folder(built, tmp_path / "final_hf", tokenizer_src=tiny_models / "llama-policy")
    finally:
        os.umask(old)
    written = sorted(out.iterdir())
    assert any(p.suffix == ".safetensors" for p in written) and (out / "config.json") in written
    assert all(_mode(p) == 0o644 for p in written), [(p.name, oct(_mode(p))) for p in written]
