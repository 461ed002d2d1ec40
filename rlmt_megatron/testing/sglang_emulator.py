"""An emulation of an SGLang 0.5.23 server's weight-sync side (SGLang needs a GPU and its own torch).

Why it lives in the package (``rlmt_megatron.testing``) and not under ``tests/``: two kinds of
callers need it, the protocol tests and the weight-sync benchmark (``benchmarks/weight_sync.py``),
which measures the colocated CUDA IPC path on a machine where SGLang cannot be installed (it pins
another torch). An importable module works for both from any working directory, for the spawned
server process too (``benchmarks`` and ``tests/workers`` are importable only with the checkout's
root or ``tests/`` on ``sys.path``, which a plain ``pytest`` run does not give). ``testing`` says
what it is: no config or engine factory can select it.

It answers the routes ``SGLangHTTPEngine`` uses and does with each request what the 0.5.23 wheel
does (file references are to ``python/sglang/srt``):

* ``/begin_weight_update`` / ``/end_weight_update`` open and close the weight-update session;
  ``/update_weights_from_distributed`` and ``/update_weights_from_tensor`` are refused outside one,
  with the server's message (``managers/scheduler_components/weight_updater.py``);
* ``/update_weights_from_tensor``: each emulated TP rank r takes ``serialized_named_tensors[r]``
  only, base64-decodes it with ``validate=True`` and unpickles it with an allow-list unpickler
  (``utils/common.py::MultiprocessingSerializer.deserialize`` / ``SafeUnpickler``; the list below
  is a subset of SGLang's ``ALLOWED_GLOBALS``, so a payload it accepts SGLang accepts), after
  patching ``rebuild_cuda_tensor`` to map a GPU UUID in argument 6 to the local device index
  (``utils/patch_torch.py``); a ``flattened_bucket`` payload is rebuilt as
  ``FlattenedTensorBucket.reconstruct_tensors`` does: ``flat[start_idx:end_idx].view(dtype).reshape(shape)``
  from metadata read attribute by attribute (``_update_weights_from_flattened_bucket``);
* ``/update_weights_from_distributed``: empty tensors of the requested dtype/shape, one broadcast
  from rank 0 of the group the request names per name (``nccl_broadcast.receive_bucket``);
  ``/init_weights_update_group`` joins as the model runner does (``join_as_receiver``), and the
  groups are kept by name as it does (``_model_update_group[group_name]``), several side by side;
* one request at a time, but ``/generate``: the server's communicators queue concurrent callers
  and its scheduler runs one request after another (``managers/communicator.py``), so two
  senders' weight updates never interleave;
* ``/update_weights_from_disk``: reads every ``*.safetensors`` file of ``model_path`` (filtered by
  the index when there is one), as the default loader does; no session needed;
* ``/generate``: a batched, non-streamed request answered in 0.5.23's response format (one item
  per prompt and sample, prompt-major; ``meta_info`` with ``output_token_logprobs`` as
  ``[logprob, token_id, null]``, ``finish_reason`` ``{"type": "length", "length": k}``, ``weight_version``
  as ``tokenizer_manager.py`` fills it). The tokens are not sampled from a model: they are
  :func:`emulated_completion` of the prompt, so a test can tell which prompt each answer belongs to;
* ``/release_memory_occupation`` / ``/resume_memory_occupation``: the scheduler's ``offload_tags``
  set; no tags = all of kv_cache, weights, cuda_graph; resuming a tag that is not released is an
  error (the server does ``offload_tags.remove(tag)``).

What it does with received tensors, two modes:

* recording (the default, for protocol tests): each rank keeps a CPU clone of every tensor it
  received, so a test can compare them bit for bit;
* weights (``weights=<HF folder>``, for the benchmark): like a server that has loaded the model,
  each rank holds that folder's tensors preallocated on ``device`` (in ``dtype``, or as stored) and
  copies every received tensor into its weight with ``copy_``, as a model's default weight loader
  does (``model_loader/weight_utils.py::default_weight_loader``); an unknown name or another shape
  is an error. On CUDA the server synchronises before it answers, so a reply means the copy is
  done: a client timing its push stops when the last bucket is in the weights.

``open_tensor_payloads=False`` (``--leave-tensor-payloads``): ``/update_weights_from_tensor`` is
answered without opening the payloads. A CPU payload's shared-memory handles can be fetched once
only, so this leaves them to sglang's own deserializer run by the test
(``tests/workers/sglang_reference_check.py``); nothing is recorded for those requests.

What it cannot show: that a real model's ``load_weights`` accepts the HF names (the HF and vLLM
engine tests cover the names), and real CUDA IPC handles without a GPU (``tests/gpu/test_gpu_cuda_ipc.py``).

Emulator-only routes: ``/_emulator/dump`` saves the received tensors or the weights (per emulated
TP rank, on the CPU), the request log and the released tags to ``out``; ``/_emulator/stats`` answers
how many bytes, tensors and distinct names each rank has taken in;
``/_emulator/stop`` stops the server.

Run it with :func:`running` (a process spawned by the caller, so it can open CPU shared-memory
handles, which need the caller's multiprocessing authkey) or as a script:
``python -m rlmt_megatron.testing.sglang_emulator --out FILE [--port P] [--tp-size N] [--weights DIR --device D]``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import multiprocessing as mp
import os
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

MEMORY_TAGS = ["kv_cache", "weights", "cuda_graph"]  # srt/constants.py GPU_MEMORY_ALL_TYPES

# A subset of SafeUnpickler.ALLOWED_GLOBALS (sglang 0.5.23 srt/utils/common.py).
_DTYPES = ["bfloat16", "bool", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "int16",
           "int32", "int64", "uint8", "half", "float", "double", "long", "int", "short"]
ALLOWED_GLOBALS = {
    ("builtins", "bool"), ("builtins", "bytearray"), ("builtins", "bytes"), ("builtins", "dict"),
    ("builtins", "float"), ("builtins", "int"), ("builtins", "list"), ("builtins", "set"), ("builtins", "str"),
    ("builtins", "tuple"), ("collections", "OrderedDict"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"),
    ("multiprocessing.resource_sharer", "DupFd"), ("types", "SimpleNamespace"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage_child"),
} | {("torch", d) for d in _DTYPES}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def _patch_torch_reductions() -> None:
    """sglang's ``monkey_patch_torch_reductions`` on the receiving side: a GPU UUID in argument 6 of
    ``rebuild_cuda_tensor`` becomes the index of that GPU in this process."""
    from torch.multiprocessing import reductions

    if hasattr(reductions, "_emulator_original_rebuild_cuda_tensor"):
        return
    original = reductions.rebuild_cuda_tensor
    reductions._emulator_original_rebuild_cuda_tensor = original

    def rebuild(*args):
        device = args[6]
        if isinstance(device, str):
            matches = [i for i in range(torch.cuda.device_count())
                       if str(torch.cuda.get_device_properties(i).uuid) == device]
            if not matches:
                raise RuntimeError(f"Invalid device_uuid={device}")
            device = matches[0]
        return original(*args[:6], device, *args[7:])

    reductions.rebuild_cuda_tensor = rebuild


def deserialize(data: str):
    """``MultiprocessingSerializer.deserialize`` of a base64 string."""
    return SafeUnpickler(io.BytesIO(base64.b64decode(data, validate=True))).load()


def reconstruct_flattened_bucket(payload) -> list[tuple[str, torch.Tensor]]:
    flat = payload["flattened_tensor"]
    out = []
    for meta in payload["metadata"]:
        name, shape, dtype, start, end = meta.name, meta.shape, meta.dtype, meta.start_idx, meta.end_idx
        _ = meta.numel  # read by the server too
        out.append((name, flat[start:end].view(dtype).reshape(shape)))
    return out


def emulated_completion(prompt, sample: int, length: int, seed=None) -> list[int]:
    """The tokens the emulator "generates" for sample ``sample`` of ``prompt`` (under a request's
    ``sampling_seed``, when it has one): a function of the prompt and the seed, so the fleet's
    reassembly in prompt order, and the seeds sent, are checkable."""
    base = sum(int(t) for t in prompt) + (7 * sample if seed is None else int(seed) % 1009)
    return [(base + 3 * j) % 50 + 1 for j in range(length)]


def _generate(body: dict, weight_version) -> list:
    """A 0.5.23 non-streamed ``/generate`` answer (see the module docstring)."""
    if body.get("stream"):
        raise ValueError("the emulator answers non-streamed requests only")
    prompts = body["input_ids"]
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    # one dict for every prompt, or a list with one per prompt (as GenerateReqInput takes them)
    params = body.get("sampling_params") or {}
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    out = []
    for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
        n, length = int(p.get("n", 1)), int(p.get("max_new_tokens", 128))
        for k in range(n):
            ids = emulated_completion(prompt, k, length, p.get("sampling_seed"))
            out.append({"text": " ".join(map(str, ids)), "output_ids": ids, "meta_info": {
                "id": f"emulated-{i}-{k}", "finish_reason": {"type": "length", "length": length},
                "prompt_tokens": len(prompt), "completion_tokens": length, "weight_version": weight_version,
                "output_token_logprobs": [[-0.5 - 0.01 * j, t, None] for j, t in enumerate(ids)]}})
    return out


def _weight_files(model_path: str) -> list[Path]:
    """The folder's ``*.safetensors`` files (only those the index names, when there is one)."""
    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        files = [f for f in files if f.name in wanted]
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_path}")
    return files


def _read_disk_folder(model_path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in _weight_files(model_path):
        state.update(load_file(str(f)))
    return state


# safetensors header dtype names (the format's spec) -> torch
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _allocate_weights(model_path: str, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the folder's names and shapes (headers only: nothing is read), in
    ``dtype`` for floating tensors (what ``--dtype`` does to a server's model) or as stored."""
    from safetensors import safe_open

    weights = {}
    for f in _weight_files(model_path):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                stored = _SAFETENSORS_DTYPES[sl.get_dtype()]
                as_dtype = dtype if dtype is not None and stored.is_floating_point else stored
                weights[name] = torch.empty(sl.get_shape(), dtype=as_dtype, device=device)
    return weights


class _Ranks:
    """What each emulated TP rank does with the tensors it receives (see "two modes" above), and
    how many bytes and tensors it has taken in."""

    def __init__(self, tp_size: int, weights: str | None = None, device: str = "cpu", dtype: str | None = None):
        self.device = torch.device(device)
        self.fixed = weights is not None
        if self.fixed:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            as_dtype = getattr(torch, dtype) if dtype else None
            self.state = [_allocate_weights(weights, self.device, as_dtype) for _ in range(tp_size)]
        else:
            self.state = [{} for _ in range(tp_size)]
        self.bytes = [0] * tp_size
        self.tensors = [0] * tp_size
        self.written: list[set[str]] = [set() for _ in range(tp_size)]

    def take(self, rank: int, name: str, tensor: torch.Tensor) -> None:
        if self.fixed:
            weight = self.state[rank].get(name)
            if weight is None:
                raise KeyError(f"TP rank {rank}: the loaded model has no weight named {name!r}")
            if weight.shape != tensor.shape:  # copy_ would broadcast; default_weight_loader asserts
                raise ValueError(f"TP rank {rank}: attempted to load weight {name} ({tuple(tensor.shape)}) "
                                 f"into parameter ({tuple(weight.shape)})")
            weight.copy_(tensor)
        else:
            self.state[rank][name] = tensor.detach().cpu().clone()
        self.bytes[rank] += tensor.numel() * tensor.element_size()
        self.tensors[rank] += 1
        self.written[rank].add(name)

    def replace_all(self, rank: int, state: dict[str, torch.Tensor]) -> None:
        """A full load from disk: the recorded state becomes exactly ``state``."""
        if not self.fixed:
            self.state[rank].clear()
        for name, t in state.items():
            self.take(rank, name, t)

    def finish(self) -> None:
        """Before answering: on CUDA the copies are queued, not done."""
        if self.fixed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def cpu_state(self) -> list[dict[str, torch.Tensor]]:
        return [{n: t.cpu() for n, t in rank.items()} for rank in self.state]

    def stats(self) -> dict:
        return {"bytes": self.bytes, "tensors": self.tensors, "written": [len(w) for w in self.written],
                "weights": [len(s) for s in self.state],
                "weight_bytes": [sum(t.numel() * t.element_size() for t in s.values()) for s in self.state]}


def serve(out: str, port: int = 0, tp_size: int = 1, timeout: float = 240.0, weights: str | None = None,
          device: str = "cpu", dtype: str | None = None, open_tensor_payloads: bool = True) -> None:
    """Answer until ``/_emulator/stop`` or ``timeout`` seconds (then exit code 3). ``weights``,
    ``device``, ``dtype``: the weights mode (module docstring); ``dtype`` a torch dtype name;
    ``open_tensor_payloads`` False: leave tensor payloads unopened (module docstring)."""
    from rlmt_megatron.rollout.weight_sync.nccl_broadcast import join_as_receiver, receive_bucket

    _patch_torch_reductions()
    ranks = _Ranks(tp_size, weights, device, dtype)
    log: list = []
    shared = {"session": None, "offload_tags": set(), "groups": {}, "paused": False, "weight_version": "default"}
    stop = threading.Event()
    one_at_a_time = threading.Lock()

    def dump():
        torch.save({"ranks": ranks.cpu_state(), "log": log, "offload_tags": sorted(shared["offload_tags"])}, out)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, obj, code=200, text=False):
            data = obj.encode() if text else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _result(self, success, message):
            return self._reply({"success": success, "message": message}, 200 if success else 400)

        def do_GET(self):
            if self.path == "/health_generate":
                return self._reply({})
            return self._reply({"error": f"no route {self.path}"}, 404)

        def do_POST(self):
            route = self.path.split("?")[0]
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            try:
                with contextlib.nullcontext() if route == "/generate" else one_at_a_time:
                    log.append((self.path, body))
                    return self._handle(route, body)
            except Exception as e:  # noqa: BLE001 - reported to the client like a server error
                return self._reply({"error": {"message": f"{type(e).__name__}: {e}"}}, 500)

        def _handle(self, route, body):
            if route == "/begin_weight_update":
                if shared["session"] is not None:
                    return self._result(False, "a weight-update session is already open; call end_weight_update() first")
                shared["session"] = body.get("selector", "all")
                return self._result(True, "Success")
            if route == "/end_weight_update":
                if shared["session"] is None:
                    return self._result(False, "no weight-update session is open; call begin_weight_update() first")
                shared["session"] = None
                return self._result(True, "Success")
            if route in ("/update_weights_from_tensor", "/update_weights_from_distributed") and shared["session"] is None:
                what = route.lstrip("/")
                return self._result(False, f"{what} must run between begin_weight_update() and end_weight_update()")
            if route == "/update_weights_from_tensor":
                payloads = body["serialized_named_tensors"]
                if len(payloads) != tp_size:
                    raise IndexError(f"{len(payloads)} payloads for {tp_size} TP ranks")
                shared["weight_version"] = body.get("weight_version") or shared["weight_version"]
                for r in range(tp_size if open_tensor_payloads else 0):  # each rank deserializes only its own payload
                    data = deserialize(payloads[r])
                    named = reconstruct_flattened_bucket(data) if body.get("load_format") == "flattened_bucket" else data
                    for name, t in named:
                        ranks.take(r, name, t)
                    del data, named  # drops this rank's mapping of the sender's memory
                ranks.finish()
                return self._result(True, "Success")
            if route == "/update_weights_from_distributed":
                shared["weight_version"] = body.get("weight_version") or shared["weight_version"]
                group = shared["groups"].get(body["group_name"])
                if group is None:  # the model runner's assertion
                    raise AssertionError(f"Group {body['group_name']} not in {list(shared['groups'])}")
                for name, t in receive_bucket(group, body["names"], body["dtypes"], body["shapes"]):
                    for r in range(tp_size):
                        ranks.take(r, name, t)
                ranks.finish()
                return self._result(True, "Succeeded to update parameter online.")
            if route == "/update_weights_from_disk":
                state = _read_disk_folder(body["model_path"])
                for r in range(tp_size):
                    ranks.replace_all(r, state)
                ranks.finish()
                return self._reply({"success": True, "message": "Succeeded to update model weights.",
                                    "num_paused_requests": 0})
            if route == "/generate":
                return self._reply(_generate(body, shared["weight_version"]))
            if route == "/init_weights_update_group":
                shared["groups"][body["group_name"]] = join_as_receiver(
                    body["master_address"], body["master_port"], body["rank_offset"], body["world_size"],
                    body["group_name"], body["backend"], tp_rank=0, timeout_s=60)
                return self._result(True, "Succeeded to initialize custom process group.")
            if route == "/destroy_weights_update_group":
                group = shared["groups"].pop(body["group_name"], None)
                if group is not None:
                    torch.distributed.destroy_process_group(group)
                return self._result(True, "Succeeded to destroy custom process group.")
            if route == "/release_memory_occupation":
                shared["offload_tags"].update(body.get("tags") or MEMORY_TAGS)
                return self._reply(None)
            if route == "/resume_memory_occupation":
                for tag in body.get("tags") or MEMORY_TAGS:
                    shared["offload_tags"].remove(tag)  # KeyError for a tag not released, as on the server
                return self._reply(None)
            if route in ("/pause_generation", "/continue_generation"):
                shared["paused"] = route == "/pause_generation"
                return self._reply({"message": "ok", "status": "ok"})
            if route == "/flush_cache":
                return self._reply("Cache flushed.\n", text=True)
            if route == "/_emulator/dump":
                dump()
                return self._reply({"ok": True})
            if route == "/_emulator/stats":
                return self._reply(ranks.stats())
            if route == "/_emulator/stop":
                # answer first: once stop is set the main thread may end the process (os._exit)
                # while this reply is still being written (seen as IncompleteRead under load)
                self._reply({"ok": True})
                self.wfile.flush()
                stop.set()
                return None
            return self._reply({"detail": "Not Found"}, 404)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Path(out + ".ready").write_text(str(server.server_address[1]))
    stopped = stop.wait(timeout=timeout)
    server.shutdown()
    server.server_close()
    os._exit(0 if stopped else 3)


def _post(url: str, route: str):
    import urllib.request

    req = urllib.request.Request(url + route, data=b"{}", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"null")


def wait_ready(out: str, alive, timeout: float = 60.0) -> str:
    """The emulator's URL once it listens; ``alive()`` says whether its process still runs."""
    ready = Path(out + ".ready")
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text():
        if not alive():
            raise RuntimeError("the SGLang emulator exited before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError("the SGLang emulator did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{ready.read_text()}"


def dump_state(url: str, out: str) -> dict:
    _post(url, "/_emulator/dump")
    return torch.load(out)


def stats(url: str) -> dict:
    """Per emulated TP rank: ``bytes`` and ``tensors`` taken in so far, ``written`` (distinct names),
    ``weights`` and ``weight_bytes`` held."""
    return _post(url, "/_emulator/stats")


@contextlib.contextmanager
def running(out: str, tp_size: int = 1, timeout: float = 120.0, weights: str | None = None, device: str = "cpu",
            dtype: str | None = None, open_tensor_payloads: bool = True):
    """Start the emulator in a spawned process; yields its URL; stops it afterwards. ``timeout``
    bounds its whole life; the other arguments as in :func:`serve`."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=serve, args=(str(out), 0, tp_size, timeout, weights, device, dtype, open_tensor_payloads),
                       daemon=True,
                       name="sglang-emulator")
    proc.start()
    url = None
    try:
        url = wait_ready(str(out), proc.is_alive)
        yield url
    finally:
        if url is not None and proc.is_alive():
            import http.client

            with contextlib.suppress(OSError, http.client.HTTPException):  # stopping is best effort
                _post(url, "/_emulator/stop")
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--weights", default=None, help="HF folder: hold its weights and copy received tensors into them")
    p.add_argument("--device", default="cpu", help="where the weights live (weights mode)")
    p.add_argument("--dtype", default=None, help="torch dtype name of the floating weights (default: as stored)")
    p.add_argument("--leave-tensor-payloads", action="store_true", help="answer /update_weights_from_tensor unopened")
    a = p.parse_args()
    serve(a.out, a.port, a.tp_size, a.timeout, a.weights, a.device, a.dtype, not a.leave_tensor_payloads)


if __name__ == "__main__":
    main()
