"""Colocated SGLang: flattened buckets through ``/update_weights_from_tensor``, memory release/resume,
and the client's session and group bookkeeping, tested without SGLang.

The receiver is ``rlmt_megatron/testing/sglang_emulator.py`` in a spawned process: it base64-decodes each
TP rank's own payload, unpickles it with an allow-list unpickler that admits a subset of SGLang
0.5.23's ``SafeUnpickler.ALLOWED_GLOBALS``, and rebuilds the tensors as ``FlattenedTensorBucket``
does. What is emulated: the tensors here are CPU tensors, which the same serializer sends as
shared-memory file descriptors instead of CUDA IPC handles (only a process spawned by the sender
can open those, hence the spawned receiver). Only a GPU proves the CUDA IPC handles and the
device-UUID mapping: ``tests/gpu/test_gpu_cuda_ipc.py``. Field names of the request bodies are
checked against the io_struct field sets copied in ``test_sglang_protocol.py`` (themselves checked
against the real classes there).

``test_payloads_opened_by_sglangs_own_classes``: the emulator only records, and every payload of
the run (tensor pushes at TP 2, memory release/resume, a generation) is judged by the real sglang
0.5.23 package in a side env (``tests/sglang_side_env.py``, ``tests/workers/sglang_reference_check.py``):
its request classes validate each body as the server's FastAPI routes do, its
``MultiprocessingSerializer`` opens each TP rank's payload and its ``FlattenedTensorBucket``
rebuilds the tensors, which must equal the sent ones bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import sglang_side_env
from test_sglang_protocol import FIELDS_BY_CLASS
from rlmt_megatron.rollout.fleet import request_seeds
from rlmt_megatron.testing import sglang_emulator
from rlmt_megatron.rollout import sglang_engine as se
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.rollout.types import SamplingParams
from rlmt_megatron.rollout.weight_sync.cuda_ipc import CudaIPCTransport, flatten_bucket


def _buckets():
    """Mixed dtypes and shapes, with layouts that need alignment (odd-length bf16 before float32),
    a 0-d tensor, an empty tensor and a non-contiguous one."""
    g = torch.Generator().manual_seed(0)
    first = [
        ("model.layers.0.input_layernorm.weight", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 6, generator=g)),
        ("model.layers.0.mlp.gate_proj.weight", torch.randn(6, 4, generator=g).t()),  # non-contiguous
        ("scalar", torch.tensor(1.5, dtype=torch.float16)),
        ("flags", torch.tensor([True, False, True])),
        ("model.layers.0.empty", torch.empty(0, 5)),
        ("ids", torch.arange(-3, 4, dtype=torch.int64)),
    ]
    second = [("model.norm.weight", torch.randn(5, generator=g).to(torch.bfloat16)),
              ("lm_head.weight", torch.randn(7, 5, generator=g, dtype=torch.float64))]
    return [first, second]


def _assert_bit_equal(got: dict, buckets):
    expected = {n: t for b in buckets for n, t in b}
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        a, b = got[name].contiguous().reshape(-1), t.contiguous().reshape(-1)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


def _routes(log):
    return [p.split("?")[0] for p, _ in log if not p.startswith("/_emulator")]


def _check_fields(log):
    for path, body in log:
        route = path.split("?")[0]
        if route in se.PROTOCOL:
            cls = se.PROTOCOL[route][0]
            assert set(body or {}) <= FIELDS_BY_CLASS[cls], (route, set(body) - FIELDS_BY_CLASS[cls])


def test_flattened_layout_is_aligned_and_needed():
    bucket = [("a", torch.ones(3, dtype=torch.bfloat16)), ("b", torch.full((2,), 7.0)), ("c", torch.ones(1, dtype=torch.int8)),
              ("d", torch.ones(1, dtype=torch.float64))]
    flat, meta = flatten_bucket(bucket)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert [(m.name, m.start_idx, m.end_idx, m.numel) for m in meta] == [
        ("a", 0, 6, 6), ("b", 8, 16, 8), ("c", 16, 17, 1), ("d", 24, 32, 8)]
    assert [m.shape for m in meta] == [torch.Size([3]), torch.Size([2]), torch.Size([1]), torch.Size([1])]
    # SGLang's own FlattenedTensorBucket packs back to back: "b" would start at byte 6, which
    # cannot be viewed as float32 -- the reason for the gaps.
    with pytest.raises(RuntimeError):
        flat[6:14].view(torch.float32)
    with pytest.raises(ValueError, match="empty bucket"):
        flatten_bucket([])


@pytest.mark.parametrize("tp_size", [1, 2])
def test_cuda_ipc_transport_to_emulated_server(tmp_path, tp_size):
    out = tmp_path / "state.pt"
    buckets = _buckets()
    with sglang_emulator.running(str(out), tp_size=tp_size) as url:
        engine = se.SGLangHTTPEngine(url, control_timeout=30, weight_sync_timeout=60)
        CudaIPCTransport(engine, engine_tp_size=tp_size, device="cpu").push(iter(buckets), version=3)
        got = sglang_emulator.dump_state(url, str(out))
    assert engine.weight_version == 3
    assert len(got["ranks"]) == tp_size
    for rank_state in got["ranks"]:  # every TP rank rebuilt every tensor from its own payload
        _assert_bit_equal(rank_state, buckets)
    assert _routes(got["log"]) == ["/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
                                   "/update_weights_from_tensor", "/end_weight_update", "/flush_cache",
                                   "/continue_generation"]
    _check_fields(got["log"])
    for path, body in got["log"]:
        if path == "/update_weights_from_tensor":
            assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is False
            assert body["weight_version"] == "3" and body["abort_all_requests"] is False
            assert len(body["serialized_named_tensors"]) == tp_size
            assert len(set(body["serialized_named_tensors"])) == tp_size  # serialized once per rank


def test_payloads_opened_by_sglangs_own_classes(tmp_path, sglang_python, monkeypatch):
    out = tmp_path / "state.pt"
    buckets = _buckets()
    with sglang_emulator.running(str(out), tp_size=2, open_tensor_payloads=False) as url:
        engine = se.SGLangHTTPEngine(url, control_timeout=30, weight_sync_timeout=60)
        engine.sleep()
        CudaIPCTransport(engine, engine_tp_size=2, device="cpu").push(iter(buckets), version=6)
        # each sample a request of its own, with a seed of its own (SGLang would copy one seed to all n)
        sample_seed = request_seeds(request_seeds(1, 1)[0], 2)[1]
        assert engine.generate([[4, 5, 6]], SamplingParams(max_new_tokens=3, n=2, seed=1))[0][1].token_ids == \
            sglang_emulator.emulated_completion([4, 5, 6], 0, 3, sample_seed)
        got = sglang_emulator.dump_state(url, str(out))
    assert got["ranks"] == [{}, {}]  # the emulator opened nothing: each handle is left for sglang
    log = tmp_path / "log.pt"
    torch.save({"log": got["log"]}, log)
    # The payloads' shared-memory handles are served by this process's resource sharer, to a
    # client holding this process's authkey (what a process spawned from here inherits).
    monkeypatch.setenv("RLMT_SENDER_AUTHKEY", bytes(multiprocessing.current_process().authkey).hex())
    rebuilt = tmp_path / "rebuilt.pt"
    sglang_side_env.run_checker(sglang_python, ["--log", str(log), "--tensors-out", str(rebuilt)])
    requests = torch.load(rebuilt)
    assert len(requests) == len(buckets) and all(len(ranks) == 2 for ranks in requests)
    for rank in range(2):  # each TP rank's own payload, rebuilt by FlattenedTensorBucket
        _assert_bit_equal({n: t for ranks in requests for n, t in ranks[rank].items()}, buckets)
    assert {p.split("?")[0] for p, _ in got["log"]} >= {
        "/release_memory_occupation", "/resume_memory_occupation", "/pause_generation", "/begin_weight_update",
        "/update_weights_from_tensor", "/end_weight_update", "/flush_cache", "/continue_generation", "/generate"}


def test_failed_bucket_ends_the_session(tmp_path):
    """A payload the server rejects (2 ranks, 1 payload) fails the sync with the server's message,
    still ends the session and continues generation, so the next sync works."""
    out = tmp_path / "state.pt"
    buckets = _buckets()
    with sglang_emulator.running(str(out), tp_size=2) as url:
        engine = se.SGLangHTTPEngine(url, control_timeout=30, weight_sync_timeout=60)
        with pytest.raises(EngineError, match=r"syncing weights v4 \(bucket 0.*1 payloads for 2 TP ranks"):
            CudaIPCTransport(engine, engine_tp_size=1, device="cpu").push(iter(buckets), version=4)
        assert engine.weight_version == 0
        CudaIPCTransport(engine, engine_tp_size=2, device="cpu").push(iter(buckets), version=5)
        got = sglang_emulator.dump_state(url, str(out))
    routes = _routes(got["log"])
    assert routes[:5] == ["/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
                          "/end_weight_update", "/continue_generation"]
    assert routes[5:] == ["/pause_generation", "/begin_weight_update"] + ["/update_weights_from_tensor"] * 2 + [
        "/end_weight_update", "/flush_cache", "/continue_generation"]
    assert engine.weight_version == 5
    _assert_bit_equal(got["ranks"][1], buckets)


def test_sleep_push_generate_order(tmp_path):
    """sleep releases everything once; a push takes the weights back first; generate takes the
    rest; nothing is resumed twice (the server would fail on that)."""
    out = tmp_path / "state.pt"
    with sglang_emulator.running(str(out)) as url:
        engine = se.SGLangHTTPEngine(url, control_timeout=30, weight_sync_timeout=60)
        engine.sleep()
        engine.sleep()  # already released: no request
        CudaIPCTransport(engine, device="cpu").push(iter(_buckets()), version=1)
        generated = engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        assert generated[0][0].token_ids == sglang_emulator.emulated_completion([1, 2], 0, 2)
        engine.wake()  # nothing left to resume: no request
        got = sglang_emulator.dump_state(url, str(out))
    memory = [(p, b["tags"]) for p, b in got["log"] if "memory" in p]
    assert memory == [("/release_memory_occupation", ["kv_cache", "weights", "cuda_graph"]),
                      ("/resume_memory_occupation", ["weights"]),
                      ("/resume_memory_occupation", ["kv_cache", "cuda_graph"])]
    routes = _routes(got["log"])
    assert routes.index("/resume_memory_occupation") < routes.index("/pause_generation")
    assert routes[-2:] == ["/resume_memory_occupation", "/generate"]
    assert got["offload_tags"] == []
    _check_fields(got["log"])
    with pytest.raises(ValueError, match="memory tags"):
        engine.sleep(["kv"])


class _Recorder(BaseHTTPRequestHandler):
    """Answers every POST with ``reply`` (code ``code``) and records (path, body)."""

    log: list = []
    code = 200

    def log_message(self, *args):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.log.append((self.path, json.loads(self.rfile.read(n)) if n else None))
        data = json.dumps({"success": self.code == 200, "message": "recorded"}).encode()
        self.send_response(self.code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def recorder():
    handler = type("Handler", (_Recorder,), {"log": [], "code": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_close_destroys_an_initialised_group_once(recorder):
    handler, url = recorder
    se.SGLangHTTPEngine(url, control_timeout=5).close()
    assert handler.log == []  # no group, nothing to destroy
    engine = se.SGLangHTTPEngine(url, control_timeout=5, group_name="g1")
    engine.init_weights_update_group("127.0.0.1", 29999, 1, 2, backend="gloo")
    engine.close()
    engine.close()
    assert [p for p, _ in handler.log] == ["/init_weights_update_group", "/destroy_weights_update_group"]
    assert handler.log[1][1] == {"group_name": "g1"}
    _check_fields(handler.log)


def test_close_survives_a_failing_destroy(recorder, caplog):
    handler, url = recorder
    engine = se.SGLangHTTPEngine(url, control_timeout=5)
    engine.init_weights_update_group("127.0.0.1", 29999, 1, 2, backend="gloo")
    handler.code = 400
    engine.close()  # logged, not raised
    assert [p for p, _ in handler.log][-1] == "/destroy_weights_update_group"
    assert "destroying weight-update group" in caplog.text


def test_disk_and_session_request_bodies():
    body = se.build_update_weights_from_disk_request("/shared/v000007", 7)
    assert body == {"model_path": "/shared/v000007", "load_format": None, "abort_all_requests": False,
                    "weight_version": "7", "flush_cache": True}
    tensor = se.build_update_weights_from_tensor_request(["QUJD"], 2)
    assert tensor["serialized_named_tensors"] == ["QUJD"] and tensor["load_format"] == "flattened_bucket"
    with pytest.raises(ValueError, match="base64 strings"):
        se.build_update_weights_from_tensor_request([], 2)
    with pytest.raises(ValueError, match="selector"):
        se.build_begin_weight_update_request("both")


def test_colocated_fleet_feeds_each_server_from_the_trainer_rank_on_its_gpu(tmp_path, tiny_models, monkeypatch):
    """A TP-2 trainer (2 ranks, one node) and two colocated servers of TP 1 (engine i at slot i:
    GPU i): the supervisor's sync hands each server the payload of the trainer rank on its GPU
    (``weight_sync/same_gpu_ipc.py``). Both servers hold the model bit for bit, every handle of
    both ranks was opened (exactly once: a second fetch of a shared-memory handle fails), and each
    server got one request per bucket inside one session."""
    from safetensors.torch import load_file

    from helpers import torchrun
    from rlmt_megatron.rollout.weight_sync.same_gpu_ipc import payloads_for

    # the routing itself: engine at slot 1 with TP 2 on GPUs 2, 3 takes their ranks' payloads, in TP order
    assert payloads_for([2, 3], {0: "a", 1: "b", 2: "c", 3: "d"}) == ["c", "d"]
    with pytest.raises(ValueError, match=r"no trainer rank on GPU\(s\) \[3\]"):
        payloads_for([2, 3], {2: "c"})
    monkeypatch.setenv("RLMT_SENDER_AUTHKEY", bytes(multiprocessing.current_process().authkey).hex())
    outs = [tmp_path / f"server{i}.pt" for i in range(2)]
    with sglang_emulator.running(str(outs[0])) as url0, sglang_emulator.running(str(outs[1])) as url1:
        torchrun(2, ["tests/workers/colocated_fleet_worker.py", "--model", str(tiny_models / "llama-policy"),
                     "--url", url0, url1, "--out", str(tmp_path / "trainer")], timeout=300)
        states = [sglang_emulator.dump_state(url, str(out)) for url, out in zip((url0, url1), outs)]
    ranks = [torch.load(tmp_path / f"trainer.{r}") for r in range(2)]
    assert ranks[0]["gpus"] == {0: [0], 1: [1]}  # rank 0 hosts both engines, on GPUs 0 and 1
    assert [r["unfetched"] for r in ranks] == [0, 0]
    assert ranks[0]["versions"] == {0: 1, 1: 1} and ranks[0]["broken"] == {}
    expected = {}
    for f in sorted((tiny_models / "llama-policy").glob("*.safetensors")):
        expected.update(load_file(str(f)))
    for state in states:
        routes = [p.split("?")[0] for p, _ in state["log"] if not p.startswith("/_emulator")]
        n = routes.count("/update_weights_from_tensor")
        assert n > 1 and routes == (["/pause_generation", "/begin_weight_update"] + ["/update_weights_from_tensor"] * n
                                    + ["/end_weight_update", "/flush_cache", "/continue_generation"])
        got = state["ranks"][0]
        assert sorted(got) == sorted(expected)
        for name, t in expected.items():
            assert torch.equal(got[name].view(torch.uint8), t.contiguous().view(torch.uint8)), name
