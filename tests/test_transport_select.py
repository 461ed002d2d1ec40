"""Transport choice by topology, checked against the rules written out independently below."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError

from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.rollout.weight_sync import select
from rlmt_megatron.rollout.weight_sync.interfaces import InProcessTransport
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig, make_transport, resolve_transport

KINDS = ("hf", "vllm", "sglang")
PLACEMENTS = ("colocated", "disaggregated")
TRANSPORTS = ("in_process", "cuda_ipc", "nccl", "disk")


def expected(kind: str, placement: str, transport: str):
    """The rules, from the design: None = impossible."""
    if kind == "hf" and placement == "disaggregated":
        return None  # the embedded engine lives in the trainer's process
    if transport == "disk":
        return "disk"
    default = {("hf", "colocated"): "in_process", ("vllm", "colocated"): "in_process",
               ("vllm", "disaggregated"): "in_process", ("sglang", "colocated"): "cuda_ipc",
               ("sglang", "disaggregated"): "nccl"}[(kind, placement)]
    if transport == "auto":
        return default
    return transport if transport == default else None


@pytest.mark.parametrize("kind,placement,transport",
                         list(itertools.product(KINDS, PLACEMENTS, ("auto",) + TRANSPORTS)))
def test_table(kind, placement, transport):
    want = expected(kind, placement, transport)
    if want is None:
        with pytest.raises(RLMTError) as e:
            resolve_transport(kind, placement, transport)
        assert repr(kind) in str(e.value) and repr(placement) in str(e.value)
    else:
        assert resolve_transport(kind, placement, transport) == want


def test_errors_say_what_is_allowed():
    with pytest.raises(RLMTError, match=r"'nccl' cannot work with engine 'sglang' placed 'colocated'; "
                                        r"allowed: cuda_ipc, disk \(auto = cuda_ipc\)"):
        resolve_transport("sglang", "colocated", "nccl")
    with pytest.raises(RLMTError, match="inside the trainer's process"):
        resolve_transport("hf", "disaggregated")
    with pytest.raises(RLMTError, match="'tgi' with placement 'colocated' is impossible"):
        resolve_transport("tgi", "colocated")


def test_config():
    cfg = WeightSyncConfig()
    assert (cfg.transport, cfg.bucket_mb, cfg.checksum, cfg.keep_versions, cfg.fp8) == ("auto", 512, False, 2, "none")
    assert WeightSyncConfig(transport="disk", fp8="block", keep_versions=3).fp8 == "block"
    with pytest.raises(ValidationError):
        WeightSyncConfig(transport="ipc")
    with pytest.raises(ValidationError):
        WeightSyncConfig(fp8="e4m3")
    with pytest.raises(ValidationError):
        WeightSyncConfig(bucket_size=1)  # unknown key
    with pytest.raises(ValidationError):
        WeightSyncConfig(keep_versions=0)


class _Engine:
    def __init__(self, name):
        self.name = name
        self.group_name = "weight_update_group"


def test_make_transport_builds_the_chosen_class(tmp_path):
    from rlmt_megatron.rollout.weight_sync.disk import DiskTransport
    from rlmt_megatron.rollout.weight_sync.nccl_broadcast import NCCLBroadcastTransport

    hf = _Engine("hf")
    t = make_transport(WeightSyncConfig(), hf, "colocated")
    assert isinstance(t, InProcessTransport) and t.engine is hf
    t = make_transport(WeightSyncConfig(transport="disk", keep_versions=3, bucket_mb=2), hf, "colocated",
                       base_dir="base", disk_dir=str(tmp_path / "d"))
    assert isinstance(t, DiskTransport) and t.keep_versions == 3 and t.bucket_bytes == 2 * 2**20
    assert t.root == tmp_path / "d"
    # engine 1 of a fleet: a folder of its own under the configured one (a shared folder would have
    # the engines' transports replace and prune each other's versions)
    t = make_transport(WeightSyncConfig(transport="disk", disk_dir=str(tmp_path / "shared")), hf, "colocated",
                       base_dir="base", member=1)
    assert t.root == tmp_path / "shared" / "engine_1"
    t = make_transport(WeightSyncConfig(master_address="10.1.2.3", master_port=29555, nccl_backend="gloo"),
                       _Engine("sglang"), "disaggregated", engine_tp_size=4)
    assert isinstance(t, NCCLBroadcastTransport)
    s = t.sender
    assert (s.master_address, s.master_port, s.world_size, s.backend) == ("10.1.2.3", 29555, 5, "gloo")
    # engine 2 of a fleet: its own group, rendezvous at master_port + 2
    t = make_transport(WeightSyncConfig(master_address="10.1.2.3", master_port=29555, nccl_backend="gloo"),
                       _Engine("sglang"), "disaggregated", member=2)
    assert t.sender.master_port == 29557
    with pytest.raises(RLMTError, match="disk_dir"):
        make_transport(WeightSyncConfig(transport="disk"), hf, "colocated", base_dir="base")
    with pytest.raises(RLMTError, match="base HF folder"):
        make_transport(WeightSyncConfig(transport="disk"), hf, "colocated", disk_dir=str(tmp_path))
    with pytest.raises(RLMTError, match="'sglang' placed 'colocated'"):
        make_transport(WeightSyncConfig(transport="in_process"), _Engine("sglang"), "colocated")


def test_make_transport_cuda_ipc():
    from rlmt_megatron.rollout.weight_sync.cuda_ipc import CudaIPCTransport

    cfg = WeightSyncConfig()
    if torch.cuda.is_available():
        t = make_transport(cfg, _Engine("sglang"), "colocated", engine_tp_size=2)
        assert isinstance(t, CudaIPCTransport) and t.engine_tp_size == 2 and t.device.type == "cuda"
    else:
        with pytest.raises(EngineError, match="cuda_ipc weight transport needs a GPU"):
            make_transport(cfg, _Engine("sglang"), "colocated", engine_tp_size=2)


def test_table_covers_exactly_the_possible_pairs():
    possible = {(k, p) for k in KINDS for p in PLACEMENTS if expected(k, p, "auto") is not None}
    assert set(select.TRANSPORTS) == possible
