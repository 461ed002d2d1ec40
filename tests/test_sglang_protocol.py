"""SGLang client and broadcast weight-sync protocol, tested without an SGLang server (it cannot
run on CPU), every payload checked with the real sglang 0.5.23 package's own classes.

The field-name sets below were read from SGLang 0.5.23's ``python/sglang/srt/managers/io_struct.py``
(PyPI wheel sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl, sha256 00b3cd5b265ac76c64185fbb6b95424f324ddd9f428d0306b77bc9db9d859937;
the wheel records no git commit: ``sglang/_version.py`` has ``__commit_id__ = None``); request
classes deriving from ``BaseReq`` also accept its ``rid`` and ``http_worker_ipc``. The sampling
parameter names come from ``sglang/api/v1/api_types.py::_FIELDS_SamplingParams`` of the same wheel.
They stay as the fast check other modules import (``test_sglang_colocated.py``), and
``test_copied_field_sets_are_sglangs`` proves them equal to the installed package's classes.

The real package: ``tests/sglang_side_env.py`` installs sglang 0.5.23 (no GPU dependencies) in a
side env, and ``tests/workers/sglang_reference_check.py`` runs there: each body is validated by
its request class as the server's FastAPI route does (the route table read from sglang's
``http_server.py``), with no key the class lacks, ``/generate`` also through the server's contract
gate, ``normalize_batch_and_arguments`` and ``SamplingParams.verify``.

Emulated: the SGLang servers. ``rlmt_megatron/testing/sglang_emulator.py`` is a small
HTTP server that answers the client's routes, refuses weight updates outside a
begin/end_weight_update session as 0.5.23 does, joins the weight-update group as SGLang's model
runner does (``init_custom_process_group``: tcp rendezvous, rank = rank_offset + tp_rank),
receives each bucket as SGLang's loader does (empty tensors of the requested dtype/shape, one
broadcast from group rank 0 per name) and answers ``/generate`` in 0.5.23's response format with
tokens that are a function of the prompt (no model). The trainer is real: a TP2 x PP2 Megatron
model under torchrun (``tests/workers/broadcast_worker.py --role trainer``) that builds a fleet of
two ``SGLangHTTPEngine`` + ``NCCLBroadcastTransport`` (gloo) members as a run does, pushes to both
servers at once through ``SyncPipeline`` and spreads one generation over them with
``fleet.generate_across``; every request both servers received is then judged by sglang's classes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import sglang_side_env
from helpers import REPO, free_ports, torchrun
from rlmt_megatron.rollout.fleet import request_seeds
from rlmt_megatron.testing import sglang_emulator
from rlmt_megatron.rollout import sglang_engine as se
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.rollout.types import SamplingParams

# ---- copied from sglang 0.5.23 python/sglang/srt/managers/io_struct.py (wheel above) ----
BASE_REQ = {"rid", "http_worker_ipc"}
GENERATE_REQ_INPUT = {
    "rid", "session_id", "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes",
    "mm_content_hashes", "use_audio_in_video", "video_config", "sampling_params", "watermark", "return_logprob",
    "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "return_sampling_mask", "sampling_logprobs_mode",
    "return_text_in_logprobs", "return_flat_raw_top_logprobs", "return_flat_raw_output_top_logprobs",
    "return_flat_raw_top_logprobs_b64", "stream", "log_metrics", "return_hidden_states", "return_routed_experts",
    "routed_experts_start_len", "return_indexer_topk", "modalities", "session_params", "lora_path", "lora_id",
    "custom_logit_processor", "positional_embed_overrides", "bootstrap_host", "bootstrap_port", "bootstrap_room",
    "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank",
    "routing_key", "conversation_id", "http_worker_ipc", "background", "require_reasoning", "max_thinking_tokens",
    "priority", "extra_key", "no_logs", "custom_labels", "return_bytes", "return_entropy", "return_prompt_token_ids",
    "external_trace_header", "received_time", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls",
    "max_dynamic_patch", "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
    "mm_processor_kwargs", "multi_item_delimiter_indices", "token_indices_to_pool", "cache_salt", "kv_hints",
}
INIT_WEIGHTS_UPDATE_GROUP_REQ_INPUT = BASE_REQ | {
    "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
UPDATE_WEIGHTS_FROM_DISTRIBUTED_REQ_INPUT = BASE_REQ | {
    "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version", "load_format",
    "selector", "torch_empty_cache"}
UPDATE_WEIGHTS_FROM_TENSOR_REQ_INPUT = BASE_REQ | {
    "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version", "selector",
    "torch_empty_cache"}
UPDATE_WEIGHT_FROM_DISK_REQ_INPUT = BASE_REQ | {
    "model_path", "load_format", "abort_all_requests", "weight_version", "is_async", "torch_empty_cache", "keep_pause",
    "recapture_cuda_graph", "token_step", "flush_cache", "manifest"}
BEGIN_WEIGHT_UPDATE_REQ_INPUT = BASE_REQ | {"selector"}
END_WEIGHT_UPDATE_REQ_INPUT = BASE_REQ
# fields without a default (the request is invalid without them)
REQUIRED = {"UpdateWeightsFromTensorReqInput": {"serialized_named_tensors"}, "UpdateWeightFromDiskReqInput": {"model_path"},
            "UpdateWeightsFromDistributedReqInput": {"names", "dtypes", "shapes"},
            "InitWeightsUpdateGroupReqInput": {"master_address", "master_port", "rank_offset", "world_size"}}
DESTROY_WEIGHTS_UPDATE_GROUP_REQ_INPUT = BASE_REQ | {"group_name"}
RELEASE_MEMORY_OCCUPATION_REQ_INPUT = BASE_REQ | {"tags"}
RESUME_MEMORY_OCCUPATION_REQ_INPUT = BASE_REQ | {"tags"}
PAUSE_GENERATION_REQ_INPUT = BASE_REQ | {"mode"}
CONTINUE_GENERATION_REQ_INPUT = BASE_REQ | {"torch_empty_cache"}
# sglang 0.5.23 python/sglang/api/v1/api_types.py: _FIELDS_SamplingParams
SAMPLING_PARAMS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice"}

FIELDS_BY_CLASS = {
    "GenerateReqInput": GENERATE_REQ_INPUT,
    "InitWeightsUpdateGroupReqInput": INIT_WEIGHTS_UPDATE_GROUP_REQ_INPUT,
    "UpdateWeightsFromDistributedReqInput": UPDATE_WEIGHTS_FROM_DISTRIBUTED_REQ_INPUT,
    "UpdateWeightsFromTensorReqInput": UPDATE_WEIGHTS_FROM_TENSOR_REQ_INPUT,
    "UpdateWeightFromDiskReqInput": UPDATE_WEIGHT_FROM_DISK_REQ_INPUT,
    "BeginWeightUpdateReqInput": BEGIN_WEIGHT_UPDATE_REQ_INPUT,
    "EndWeightUpdateReqInput": END_WEIGHT_UPDATE_REQ_INPUT,
    "DestroyWeightsUpdateGroupReqInput": DESTROY_WEIGHTS_UPDATE_GROUP_REQ_INPUT,
    "PauseGenerationReqInput": PAUSE_GENERATION_REQ_INPUT,
    "ContinueGenerationReqInput": CONTINUE_GENERATION_REQ_INPUT,
    "ReleaseMemoryOccupationReqInput": RELEASE_MEMORY_OCCUPATION_REQ_INPUT,
    "ResumeMemoryOccupationReqInput": RESUME_MEMORY_OCCUPATION_REQ_INPUT,
}
FULL_PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop=["\n"],
                             stop_token_ids=[2], n=3, seed=11)


def _bucket():
    return [("model.embed_tokens.weight", torch.zeros(4, 3, dtype=torch.bfloat16)),
            ("model.norm.weight", torch.ones(3, dtype=torch.float32))]


def built_requests():
    """route -> every body the client builds for it."""
    return {
        "/generate": [se.build_generate_request([[1, 2], [3]], FULL_PARAMS),
                      se.build_generate_request([[1]], SamplingParams())],
        "/init_weights_update_group": [se.build_init_weights_update_group_request("10.0.0.1", 29600, 1, 3, backend="gloo")],
        "/update_weights_from_distributed": [se.build_update_weights_from_distributed_request(_bucket(), 4),
                                             se.build_update_weights_from_distributed_request(_bucket(), 5, flush_cache=True)],
        "/update_weights_from_tensor": [se.build_update_weights_from_tensor_request(["AAAA", "AAAA"], 4)],
        "/update_weights_from_disk": [se.build_update_weights_from_disk_request("/tmp/v000004", 4),
                                      se.build_update_weights_from_disk_request("/tmp/v000004", 4, load_format="auto")],
        "/begin_weight_update": [se.build_begin_weight_update_request()],
        "/end_weight_update": [se.build_end_weight_update_request()],
        "/destroy_weights_update_group": [se.build_destroy_weights_update_group_request()],
        "/pause_generation": [se.build_pause_generation_request(m) for m in ("abort", "retract", "in_place")],
        "/continue_generation": [se.build_continue_generation_request()],
        "/release_memory_occupation": [se.build_release_memory_request(), se.build_release_memory_request(["weights"])],
        "/resume_memory_occupation": [se.build_resume_memory_request()],
    }


# ------------------------------------------------------------------ (a) request fields


@pytest.mark.parametrize("route", sorted(se.PROTOCOL))
def test_request_keys_are_sglang_fields(route):
    cls, documented = se.PROTOCOL[route]
    fields = FIELDS_BY_CLASS[cls]
    assert set(documented) <= fields, set(documented) - fields
    for body in built_requests()[route]:
        assert set(body) <= fields, f"{route}: {set(body) - fields} are not fields of {cls}"
        assert set(body) <= set(documented), f"{route}: module table misses {set(body) - set(documented)}"
        assert REQUIRED.get(cls, set()) <= set(body), f"{route}: required fields missing"


def test_sampling_params_and_generate_body():
    # seeded: every sample a request of its own (n=1) with a seed of its own, since SGLang copies a
    # request's seed to its n samples and its seeded sampler hashes only seed and position
    body = se.build_generate_request([[1, 2], [3]], FULL_PARAMS)
    assert body["input_ids"] == [[1, 2]] * 3 + [[3]] * 3
    seeds = [s for prompt_seed in request_seeds(11, 2) for s in request_seeds(prompt_seed, 3)]
    assert len(set(seeds)) == 6
    for sp, seed in zip(body["sampling_params"], seeds, strict=True):
        assert set(sp) <= SAMPLING_PARAMS and set(se.SAMPLING_PARAM_KEYS) <= SAMPLING_PARAMS
        assert sp == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 8, "stop": ["\n"],
                      "stop_token_ids": [2], "n": 1, "sampling_seed": seed}
    assert body["return_logprob"] is True and body["stream"] is False
    # unseeded: one request per prompt with n samples
    body = se.build_generate_request([[1, 2], [3]], FULL_PARAMS.model_copy(update={"seed": None}))
    assert body["input_ids"] == [[1, 2], [3]] and body["sampling_params"]["n"] == 3
    assert "sampling_seed" not in body["sampling_params"]
    assert se.sampling_params_to_sglang(SamplingParams(top_k=-1))["top_k"] == -1


def test_update_request_dtypes_are_torch_names():
    body = se.build_update_weights_from_distributed_request(_bucket(), 7)
    assert body["names"] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert [getattr(torch, d) for d in body["dtypes"]] == [torch.bfloat16, torch.float32]
    assert body["shapes"] == [[4, 3], [3]] and body["weight_version"] == "7"


def test_parse_generate_response():
    def item(ids, lps, reason):
        return {"text": "x", "output_ids": ids,
                "meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, ids)], "finish_reason": reason}}
    body = [item([5, 6], [-0.1, -0.2], {"type": "length", "length": 2}),
            item([7], [-0.3], {"type": "stop", "matched": 7}),
            item([8], [-0.4], {"type": "stop", "matched": "\n"}),
            item([9, 9], [-0.5, -0.6], {"type": "length", "length": 2})]
    out = se.parse_generate_response(body, n_prompts=2, n=2, weight_version=3)
    assert [[(g.prompt_index, g.sample_index) for g in gs] for gs in out] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    assert out[0][0].token_ids == [5, 6] and out[0][0].logprobs == [-0.1, -0.2] and out[0][0].finish_reason == "length"
    assert out[0][1].finish_reason == "stop" and out[1][1].weight_version == 3
    with pytest.raises(EngineError, match="aborted"):
        se.parse_generate_response([item([1], [-1.0], {"type": "abort", "message": "m"})], 1, 1, 0)
    with pytest.raises(EngineError, match="expected 2 outputs"):
        se.parse_generate_response(body[:1], 1, 2, 0)


# ------------------------------------------------------------------ (c) failures are bounded


def test_unreachable_server_is_an_engine_error():
    with socket.socket() as s:  # a port that was free a moment ago, now closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    engine = se.SGLangHTTPEngine(url, timeout=2, control_timeout=2)
    start = time.monotonic()
    with pytest.raises(EngineError) as e:
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert url in str(e.value) and "generating" in str(e.value) and "sglang" in str(e.value)
    with pytest.raises(EngineError, match="health check"):
        engine.health()
    assert time.monotonic() - start < 5


class _SlowHandler(BaseHTTPRequestHandler):
    delay = 5.0

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.delay)  # longer than the client's timeout, mid-generation
        try:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")
        except OSError:
            pass


def test_server_slower_than_timeout_is_an_engine_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        engine = se.SGLangHTTPEngine(url, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(EngineError, match="timed out") as e:
            engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
        assert time.monotonic() - start < 3.0
        assert url in str(e.value) and "generating" in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


def test_weight_sync_without_group_is_an_engine_error():
    engine = se.SGLangHTTPEngine("http://127.0.0.1:9", control_timeout=1)
    with pytest.raises(EngineError, match="syncing weights v2"):
        engine.update_weights([_bucket()], 2)


# ------------------------------------------------------------------ (d) sglang's own classes


def _bad_requests():
    """Bodies the real classes must refuse: a misspelt field, a wrong type, a missing required field."""
    good = se.build_update_weights_from_distributed_request(_bucket(), 4)
    return [("/update_weights_from_distributed", {**good, "weight_versoin": "4"}),
            ("/init_weights_update_group", {**se.build_init_weights_update_group_request("h", 1, 1, 2), "master_port": "x"}),
            ("/update_weights_from_tensor", {"load_format": "flattened_bucket"}),
            ("/generate", {**se.build_generate_request([[1]], SamplingParams()), "sampling_params": {"temprature": 1.0}})]


@pytest.fixture(scope="module")
def sglang_verdict(sglang_python, tmp_path_factory):
    """One run of the checker over every body the client builds (a tensor push with a real
    serialized CPU payload included) and the bad bodies, plus the real classes' field sets."""
    import multiprocessing

    from rlmt_megatron.rollout.weight_sync.cuda_ipc import flatten_bucket, serialize_bucket

    folder = tmp_path_factory.mktemp("sglang_verdict")
    log = [(route, body) for route, bodies in built_requests().items() for body in bodies
           if route != "/update_weights_from_tensor"]
    flat, meta = flatten_bucket(_bucket())
    log.append(("/update_weights_from_tensor", se.build_update_weights_from_tensor_request(serialize_bucket(flat, meta, 2), 4)))
    log.append(("/flush_cache?timeout=60", None))
    torch.save({"log": log, "rejected": _bad_requests()}, folder / "log.pt")
    env = {"RLMT_SENDER_AUTHKEY": bytes(multiprocessing.current_process().authkey).hex()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        sglang_side_env.run_checker(sglang_python, [
            "--log", str(folder / "log.pt"), "--summary-out", str(folder / "summary.json"),
            "--tensors-out", str(folder / "tensors.pt"), "--fields", str(folder / "fields.json"),
            "--classes", *sorted({cls for cls, _ in se.PROTOCOL.values()})])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    import json

    return {"log": log, "summary": json.loads((folder / "summary.json").read_text())[0],
            "fields": json.loads((folder / "fields.json").read_text()), "tensors": torch.load(folder / "tensors.pt")}


def test_copied_field_sets_are_sglangs(sglang_verdict):
    """The hand-copied sets above are exactly the installed sglang 0.5.23's, and so is our route table."""
    real = sglang_verdict["fields"]
    for route, (cls, _) in se.PROTOCOL.items():
        methods, real_cls = real["routes"][route]
        assert real_cls == cls and "POST" in methods, (route, real["routes"][route])
        assert set(real["classes"][cls]["fields"]) == FIELDS_BY_CLASS[cls], cls
        assert set(real["classes"][cls]["required"]) == REQUIRED.get(cls, set()), cls
    assert set(real["sampling_params"]) == SAMPLING_PARAMS
    assert real["routes"]["/flush_cache"][1] is None and real["routes"]["/health_generate"] == [["GET"], None]


def test_built_requests_pass_sglangs_own_classes(sglang_verdict):
    """Every body the client builds is accepted by sglang 0.5.23's own classes (a real tensor
    payload opened and rebuilt by them bit for bit), and bad bodies are refused by them."""
    counts = sglang_verdict["summary"]["counts"]
    expected = {}
    for path, _ in sglang_verdict["log"]:
        expected[path.split("?")[0]] = expected.get(path.split("?")[0], 0) + 1
    assert counts == expected  # every body judged, none refused
    # the tensor payload (one per TP rank) opened by sglang's serializer and flattened bucket
    assert [sorted(rank) for rank in sglang_verdict["tensors"][0]] == [sorted(n for n, _ in _bucket())] * 2
    for rank in sglang_verdict["tensors"][0]:
        for name, t in _bucket():
            assert torch.equal(rank[name].view(torch.uint8), t.view(torch.uint8)), name
    reasons = sglang_verdict["summary"]["rejected"]
    assert len(reasons) == len(_bad_requests())
    assert "weight_versoin" in reasons[0] and "master_port" in reasons[1]
    assert "serialized_named_tensors" in reasons[2] and "temprature" in reasons[3]


# ------------------------------------------------------------------ (e) a fleet of two emulated servers, broadcast over gloo


@pytest.fixture(scope="module")
def fleet_run(tiny_models, tmp_path_factory, sglang_python):
    """Two emulated servers, one torchrun job (TP2 x PP2) whose rollout supervisor syncs both
    (each pipeline stage's owner through a group of its own) and generates across both; then
    every request each server received judged by sglang's own classes (one run)."""
    folder = tmp_path_factory.mktemp("sglang_fleet")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    outs = [folder / f"server{i}.pt" for i in range(2)]
    servers = [subprocess.Popen(
        [sys.executable, "-m", "rlmt_megatron.testing.sglang_emulator", "--out", str(out), "--timeout", "240"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    port = free_ports(4)
    try:
        urls = [sglang_emulator.wait_ready(str(out), lambda s=s: s.poll() is None) for out, s in zip(outs, servers)]
        torchrun(4, ["tests/workers/broadcast_worker.py", "--role", "trainer", "--model", str(tiny_models / "llama-policy"),
                     "--url", *urls, "--master-port", str(port), "--out", str(folder / "trainer.pt"),
                     "--last-dump", str(outs[-1])], timeout=300)
        states = [sglang_emulator.dump_state(urls[0], str(outs[0])), torch.load(outs[-1])]  # the last one was stopped
    finally:
        for s in servers:
            if s.poll() is None:
                s.kill()
                s.wait(timeout=10)
    logs = []
    for i, state in enumerate(states):
        torch.save({"log": state["log"]}, folder / f"log{i}.pt")
        logs.append(str(folder / f"log{i}.pt"))
    sglang_side_env.run_checker(sglang_python, ["--log", *logs, "--summary-out", str(folder / "verdict.json")])
    import json

    return {"states": states, "trainer": torch.load(folder / "trainer.pt"), "port": port,
            "verdict": json.loads((folder / "verdict.json").read_text())}


def _stage_of(name: str, layers: int) -> int:
    """Which of two pipeline stages holds HF tensor ``name`` (first half of the layers and the
    embedding on stage 0; the rest, the final norm and the head on stage 1)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) >= layers // 2
    return 0 if name.startswith("model.embed_tokens") else 1


def test_fleet_sync_reaches_every_server(fleet_run, tiny_models):
    """Both emulated servers, synced at once by the supervisor of the real TP2 x PP2 trainer, hold
    the model bit for bit; each pipeline stage's owner sent its own layers, and only those, through
    a weight-update group of its own (rank 0 of it, meeting at master_port + 2i + stage), into one
    session the engine's host opened and closed."""
    import json

    from safetensors.torch import load_file

    expected = {}
    for f in sorted((tiny_models / "llama-policy").glob("*.safetensors")):
        expected.update(load_file(str(f)))
    layers = json.loads((tiny_models / "llama-policy" / "config.json").read_text())["num_hidden_layers"]
    sent_groups = {}  # (engine, stage) -> group name, as the stage owners report it
    for sender in fleet_run["trainer"]["senders"]:
        for member, group in sender["groups"].items():
            sent_groups[(member, sender["stage"])] = group
    assert sorted(sent_groups) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # two stage owners, each to both engines
    session = ["/pause_generation", "/begin_weight_update", "/update_weights_from_distributed",
               "/end_weight_update", "/flush_cache", "/continue_generation"]
    for i, got in enumerate(fleet_run["states"]):
        routes = [p.split("?")[0] for p, _ in got["log"] if not p.startswith("/_emulator")]
        routes = [r for k, r in enumerate(routes) if k == 0 or r != routes[k - 1]]  # one per run of buckets
        # server 1 was stopped after the generation; server 0 then took version 2 and the close
        assert routes == (["/init_weights_update_group"] + session + ["/generate"]
                          + (session + ["/destroy_weights_update_group"] if i == 0 else []))
        inits = {body["group_name"]: body for p, body in got["log"] if p == "/init_weights_update_group"}
        assert sorted(inits) == [f"weight_update_group_{i}_pp0", f"weight_update_group_{i}_pp1"]
        for stage in (0, 1):
            init = inits[f"weight_update_group_{i}_pp{stage}"]
            assert (init["rank_offset"], init["world_size"], init["backend"]) == (1, 2, "gloo")
            assert init["master_port"] == fleet_run["port"] + 2 * i + stage
            assert sent_groups[(i, stage)] == init["group_name"]
        by_group = {}
        for p, body in got["log"]:
            if p == "/update_weights_from_distributed":
                by_group.setdefault(body["group_name"], []).append(body["names"])
        for stage in (0, 1):
            buckets = by_group[f"weight_update_group_{i}_pp{stage}"]
            assert len(buckets) > 1  # several buckets per stage
            assert {_stage_of(n, layers) for names in buckets for n in names} == {stage}
        destroyed = sorted(body["group_name"] for p, body in got["log"] if p == "/destroy_weights_update_group")
        assert destroyed == (sorted(inits) if i == 0 else [])
        versions = [body["weight_version"] for p, body in got["log"] if p == "/update_weights_from_distributed"]
        assert sorted(set(versions)) == (["1", "2"] if i == 0 else ["1"])
        for version in versions:  # each sync sends every tensor exactly once, over the two groups
            names = [n for p, body in got["log"] if p == "/update_weights_from_distributed"
                     and body["weight_version"] == version for n in body["names"]]
            assert sorted(names) == sorted(expected), version
        state = got["ranks"][0]
        assert sorted(state) == sorted(expected)
        for name, t in expected.items():
            assert state[name].dtype == t.dtype and state[name].shape == t.shape, name
            assert torch.equal(state[name].view(torch.uint8), t.contiguous().view(torch.uint8)), name
    assert fleet_run["trainer"]["versions"] == {0: 1, 1: 1}
    # with server 1 gone, version 2 reached server 0 (the session opened on server 1 failed), and
    # every rank marks engine 1 broken alike
    for sender in fleet_run["trainer"]["senders"]:
        assert sender["after_loss"]["broken"] == [1]
    assert fleet_run["trainer"]["senders"][0]["after_loss"]["versions"] == {0: 2, 1: 1}


def test_fleet_generation_spreads_over_both_servers(fleet_run):
    """The supervisor gives each emulated server its share (in one /generate each) and puts the
    answers back in prompt order; the emulator's tokens are a function of the prompt, so a
    misplaced answer shows."""
    trainer = fleet_run["trainer"]
    prompts = trainer["prompts"]
    shares = trainer["shares"]
    assert sorted(p for share in shares.values() for p in share) == list(range(len(prompts)))
    assert all(shares[i] for i in (0, 1))  # both servers served prompts
    # each prompt's seed comes from its place in the whole request (whichever server serves it),
    # and each of its two samples is a request of its own with a seed of its own
    seeds = [request_seeds(seed, 2) for seed in request_seeds(5, len(prompts))]
    for i, got in enumerate(fleet_run["states"]):
        (body,) = [b for p, b in got["log"] if p == "/generate"]
        assert body["input_ids"] == [prompts[p] for p in shares[i] for _ in range(2)]  # each server: its share only
        assert [sp["sampling_seed"] for sp in body["sampling_params"]] == [s for p in shares[i] for s in seeds[p]]
    rollouts = trainer["rollouts"]
    assert [r[0] for r in rollouts] == [p for p in range(len(prompts)) for _ in range(2)]  # back in prompt order
    for k, (p, tokens, logprobs, version) in enumerate(rollouts):
        assert tokens == sglang_emulator.emulated_completion(prompts[p], 0, 4, seeds[p][k % 2])
        assert len(logprobs) == 4 and version == 1


def test_fleet_payloads_pass_sglangs_own_classes(fleet_run):
    """Every request either emulated server received was accepted by sglang 0.5.23's own classes."""
    for got, verdict in zip(fleet_run["states"], fleet_run["verdict"]):
        expected = {}
        for path, _ in got["log"]:
            if not path.startswith("/_emulator"):
                expected[path.split("?")[0]] = expected.get(path.split("?")[0], 0) + 1
        assert verdict["counts"] == expected  # every request of both servers judged, none refused
