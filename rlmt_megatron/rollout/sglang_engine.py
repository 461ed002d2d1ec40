"""A rollout engine backed by a running SGLang server, over plain HTTP.

Only the standard library talks to the server (``urllib.request`` + ``json``); every request has a
bounded timeout, and every failure becomes an ``EngineError`` that names the engine, the URL and
what the client was doing (generating, syncing weights v N, health check, ...).

Three ways in for weights, each driven by one transport in ``weight_sync/``:

* disaggregated (``nccl_broadcast.py``): the trainer's sender joins a process group with the
  server's ranks (``/init_weights_update_group``) and, for each bucket, POSTs the bucket's
  names/dtypes/shapes to ``/update_weights_from_distributed`` while broadcasting the tensors from
  rank 0 of that group, one by one in the order of the names; the server's model runner allocates
  empty tensors, joins each broadcast, then loads the bucket;
* colocated (``cuda_ipc.py``): each bucket is flattened into one uint8 tensor whose CUDA IPC
  handle (pickled, base64) is POSTed to ``/update_weights_from_tensor`` with
  ``load_format="flattened_bucket"``, one payload per server TP rank;
* anywhere (``disk.py``): a safetensors folder written by the trainer is loaded with
  ``/update_weights_from_disk``.

In 0.5.23 the scheduler refuses ``update_weights_from_distributed`` and ``update_weights_from_tensor``
outside a weight-update session (``scheduler_components/weight_updater.py``: "must run between
begin_weight_update() and end_weight_update()"), so a sync is: ``/pause_generation`` ->
``/begin_weight_update`` -> one update request per bucket (``flush_cache`` False) ->
``/end_weight_update`` -> ``/flush_cache`` -> ``/continue_generation``. A failed sync still ends
the session (a session left open makes the next ``begin`` fail) and continues generation.
``/update_weights_from_disk`` needs no session and flushes the cache itself.

Memory (colocated): ``sleep()`` is ``/release_memory_occupation`` and ``wake()``
``/resume_memory_occupation``; the tags are ``kv_cache``, ``weights`` and ``cuda_graph``
(``sglang/srt/constants.py``, ``GPU_MEMORY_ALL_TYPES``; no tags = all three). The server keeps the
released tags in a set and *removes* each resumed tag from it (a tag resumed twice is a server
error), so the client tracks what it released and resumes only that. A weight sync first resumes
``weights`` (loading into released memory would fault), and ``generate`` resumes whatever is still
released, so the colocated order "sleep -> train -> push (weights back) -> generate (KV cache and
CUDA graphs back)" needs no extra calls. The server must run with ``--enable-memory-saver`` for the
release to free anything.

Every request body is built by a small pure function (``build_*_request``) so tests can compare
its keys with SGLang's own request dataclasses without a server.

Protocol, read from the SGLang 0.5.23 wheel on PyPI
(sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl, sha256 00b3cd5b265ac76c...9859937;
``sglang/_version.py`` says ``__version__ = '0.5.23'``, ``__commit_id__ = None``). Routes are in
``python/sglang/srt/entrypoints/http_server.py``, request dataclasses in
``python/sglang/srt/managers/io_struct.py``:

=====================================  =========  ====================================  =========================================
route                                  method     io_struct dataclass                   fields this client sends
=====================================  =========  ====================================  =========================================
/generate                              POST       GenerateReqInput                      input_ids, sampling_params, return_logprob,
                                                                                        logprob_start_len, stream
/init_weights_update_group             POST       InitWeightsUpdateGroupReqInput        master_address, master_port, rank_offset,
                                                                                        world_size, group_name, backend
/update_weights_from_distributed       POST       UpdateWeightsFromDistributedReqInput  names, dtypes, shapes, group_name,
                                                                                        flush_cache, abort_all_requests,
                                                                                        weight_version
/update_weights_from_tensor            POST       UpdateWeightsFromTensorReqInput       serialized_named_tensors, load_format,
                                                                                        flush_cache, abort_all_requests,
                                                                                        weight_version
/update_weights_from_disk              POST       UpdateWeightFromDiskReqInput          model_path, load_format,
                                                                                        abort_all_requests, weight_version,
                                                                                        flush_cache
/begin_weight_update                   POST       BeginWeightUpdateReqInput             selector
/end_weight_update                     POST       EndWeightUpdateReqInput               (empty body)
/destroy_weights_update_group          POST       DestroyWeightsUpdateGroupReqInput     group_name
/pause_generation                      POST       PauseGenerationReqInput               mode
/continue_generation                   POST       ContinueGenerationReqInput            torch_empty_cache
/release_memory_occupation             POST       ReleaseMemoryOccupationReqInput       tags
/resume_memory_occupation              POST       ResumeMemoryOccupationReqInput        tags
/flush_cache                           POST       (query parameter ``timeout``; FlushCacheReqInput is internal)
/health_generate                       GET        (no body; 200 = healthy, 503 = starting/unhealthy)
=====================================  =========  ====================================  =========================================

``sampling_params`` keys follow ``python/sglang/srt/sampling/sampling_params.py::SamplingParams``:
temperature, top_p, top_k (-1 = all), max_new_tokens, stop, stop_token_ids, n, sampling_seed.

Response of a non-streamed batch ``/generate`` (``tokenizer_manager.py``): a list with one dict per
(prompt, sample), prompt-major (prompt i's n samples are items ``i*n .. i*n+n-1``), each
``{"text", "output_ids", "meta_info"}``; ``meta_info["output_token_logprobs"]`` is a list of
``[logprob, token_id, text_or_null]`` and ``meta_info["finish_reason"]`` a dict whose ``type`` is
``"stop"``, ``"length"`` or ``"abort"`` (``schedule_batch.py``, ``FINISH_*.to_json``). With
``SGLANG_RETURN_ORIGINAL_LOGPROB`` unset (the default) the sampler returns
``log_softmax(logits / temperature)`` before top-p/top-k truncation (``layers/sampler.py``), which
is what ``Generation.logprobs`` means.

``UpdateWeightsFromDistributedReqInput.dtypes`` are names of ``torch`` attributes (the server does
``getattr(torch, dtype)``), e.g. ``"bfloat16"``; ``flush_cache`` defaults to True on the server, so
the client sends False per bucket and flushes once after the last bucket. ``weight_version`` is a
string on the server. Note the disk request class is ``UpdateWeightFromDiskReqInput`` (singular).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from rlmt_megatron.rollout.engine import Bucket, EngineError, RolloutEngine
from rlmt_megatron.rollout.fleet import request_seeds
from rlmt_megatron.rollout.types import Generation, SamplingParams

SGLANG_VERSION = "0.5.23"
DEFAULT_GROUP_NAME = "weight_update_group"  # io_struct.py default for group_name
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # sglang/srt/constants.py GPU_MEMORY_ALL_TYPES
FLATTENED_BUCKET = "flattened_bucket"  # load_format of /update_weights_from_tensor for flattened buckets

log = logging.getLogger(__name__)

# route -> (io_struct dataclass, fields this client sends); the tests check these against SGLang's fields.
PROTOCOL: dict[str, tuple[str, tuple[str, ...]]] = {
    "/generate": ("GenerateReqInput", ("input_ids", "sampling_params", "return_logprob", "logprob_start_len", "stream")),
    "/init_weights_update_group": ("InitWeightsUpdateGroupReqInput", (
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")),
    "/update_weights_from_distributed": ("UpdateWeightsFromDistributedReqInput", (
        "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version")),
    "/update_weights_from_tensor": ("UpdateWeightsFromTensorReqInput", (
        "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version")),
    "/update_weights_from_disk": ("UpdateWeightFromDiskReqInput", (
        "model_path", "load_format", "abort_all_requests", "weight_version", "flush_cache")),
    "/begin_weight_update": ("BeginWeightUpdateReqInput", ("selector",)),
    "/end_weight_update": ("EndWeightUpdateReqInput", ()),
    "/destroy_weights_update_group": ("DestroyWeightsUpdateGroupReqInput", ("group_name",)),
    "/pause_generation": ("PauseGenerationReqInput", ("mode",)),
    "/continue_generation": ("ContinueGenerationReqInput", ("torch_empty_cache",)),
    "/release_memory_occupation": ("ReleaseMemoryOccupationReqInput", ("tags",)),
    "/resume_memory_occupation": ("ResumeMemoryOccupationReqInput", ("tags",)),
}
SAMPLING_PARAM_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids", "n", "sampling_seed")


# ---------------------------------------------------------------------------------- request builders


def sampling_params_to_sglang(params: SamplingParams) -> dict[str, Any]:
    """Our ``SamplingParams`` under SGLang's ``sampling_params`` names."""
    out: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_new_tokens": params.max_new_tokens,
        "n": params.n,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def build_generate_request(prompts: Sequence[Sequence[int]], params: SamplingParams,
                           seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """A batched, non-streamed ``GenerateReqInput`` with output-token logprobs.

    ``seeds`` (one per prompt): every sample becomes a request of its own (the prompt repeated
    ``n`` times, ``n=1`` each) with a seed of its own. SGLang copies a request's sampling params,
    seed included, to its ``n`` parallel samples, and its seeded sampler (deterministic
    inference) draws noise from the seed and the position only, so one seeded request with ``n``
    samples would give ``n`` identical answers. The answers come back in request order, prompt
    by prompt, as with ``n`` samples per request. Without ``seeds``, a ``params.seed`` is spread
    the same way (``request_seeds``)."""
    if seeds is None and params.seed is not None:
        seeds = request_seeds(params.seed, len(prompts))
    if seeds is None:
        return {"input_ids": [list(map(int, p)) for p in prompts], "sampling_params": sampling_params_to_sglang(params),
                "return_logprob": True, "logprob_start_len": -1, "stream": False}  # logprobs of output tokens only
    if len(seeds) != len(prompts):
        raise EngineError(f"sglang engine: {len(seeds)} seeds for {len(prompts)} prompts")
    one = sampling_params_to_sglang(params.model_copy(update={"n": 1, "seed": None}))
    sample_seeds = [s for seed in seeds for s in request_seeds(seed, params.n)]
    return {"input_ids": [list(map(int, p)) for p in prompts for _ in range(params.n)],
            "sampling_params": [{**one, "sampling_seed": s} for s in sample_seeds],
            "return_logprob": True, "logprob_start_len": -1, "stream": False}


def build_init_weights_update_group_request(master_address: str, master_port: int, rank_offset: int,
                                            world_size: int, group_name: str = DEFAULT_GROUP_NAME,
                                            backend: str = "nccl") -> dict[str, Any]:
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as SGLang reads it back with ``getattr(torch, name)``."""
    return str(dtype).removeprefix("torch.")


def bucket_metadata(bucket: Bucket) -> tuple[list[str], list[str], list[list[int]]]:
    return ([n for n, _ in bucket], [dtype_name(t.dtype) for _, t in bucket], [list(t.shape) for _, t in bucket])


def build_update_weights_from_distributed_request(bucket: Bucket, version: int, group_name: str = DEFAULT_GROUP_NAME,
                                                  flush_cache: bool = False) -> dict[str, Any]:
    names, dtypes, shapes = bucket_metadata(bucket)
    return {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "flush_cache": flush_cache, "abort_all_requests": False, "weight_version": str(version)}


def build_update_weights_from_tensor_request(serialized_named_tensors: Sequence[str], version: int,
                                             flush_cache: bool = False) -> dict[str, Any]:
    """One flattened bucket: ``serialized_named_tensors[r]`` is server TP rank r's payload (base64)."""
    if not serialized_named_tensors or not all(isinstance(p, str) for p in serialized_named_tensors):
        raise ValueError("serialized_named_tensors must be a non-empty list of base64 strings (one per TP rank)")
    return {"serialized_named_tensors": list(serialized_named_tensors), "load_format": FLATTENED_BUCKET,
            "flush_cache": flush_cache, "abort_all_requests": False, "weight_version": str(version)}


def build_update_weights_from_disk_request(model_path: str, version: int,
                                           load_format: Optional[str] = None) -> dict[str, Any]:
    """``load_format`` None = the server's own (``--load-format``); the server flushes the cache."""
    return {"model_path": str(model_path), "load_format": load_format, "abort_all_requests": False,
            "weight_version": str(version), "flush_cache": True}


def build_begin_weight_update_request(selector: str = "all") -> dict[str, Any]:
    if selector not in ("target", "draft", "all"):
        raise ValueError(f"weight-update selector must be target, draft or all, not {selector!r}")
    return {"selector": selector}


def build_end_weight_update_request() -> dict[str, Any]:
    return {}


def build_destroy_weights_update_group_request(group_name: str = DEFAULT_GROUP_NAME) -> dict[str, Any]:
    return {"group_name": group_name}


def build_pause_generation_request(mode: str = "retract") -> dict[str, Any]:
    if mode not in ("abort", "retract", "in_place"):
        raise ValueError(f"pause mode must be abort, retract or in_place, not {mode!r}")
    return {"mode": mode}


def build_continue_generation_request(torch_empty_cache: bool = True) -> dict[str, Any]:
    return {"torch_empty_cache": torch_empty_cache}


def _check_tags(tags: Optional[Sequence[str]]) -> Optional[list[str]]:
    if tags is None:
        return None
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise ValueError(f"memory tags must be among {list(MEMORY_TAGS)}, not {unknown}")
    return list(tags)


def build_release_memory_request(tags: Optional[Sequence[str]] = None) -> dict[str, Any]:
    return {"tags": _check_tags(tags)}


def build_resume_memory_request(tags: Optional[Sequence[str]] = None) -> dict[str, Any]:
    return {"tags": _check_tags(tags)}


# ---------------------------------------------------------------------------------- response parsing


def parse_generate_response(body: Any, n_prompts: int, n: int, weight_version: int,
                            where: str = "sglang") -> list[list[Generation]]:
    """SGLang's batch ``/generate`` response (prompt-major list) as ``Generation`` lists."""
    if isinstance(body, dict):  # a single prompt with n == 1 may come back as one object
        body = [body]
    if not isinstance(body, list) or len(body) != n_prompts * n:
        got = len(body) if isinstance(body, list) else type(body).__name__
        raise EngineError(f"{where}: expected {n_prompts * n} outputs ({n_prompts} prompts x n={n}), got {got}")
    results: list[list[Generation]] = [[] for _ in range(n_prompts)]
    for k, item in enumerate(body):
        prompt_index, sample_index = divmod(k, n)
        try:
            meta = item["meta_info"]
            lp = meta["output_token_logprobs"]
            token_ids = [int(e[1]) for e in lp]
            logprobs = [float(e[0]) if e[0] is not None else float("nan") for e in lp]
            if "output_ids" in item and list(item["output_ids"]) != token_ids:
                raise EngineError(f"{where}: output {k}: output_ids and output_token_logprobs disagree")
            reason = meta.get("finish_reason")
            kind = reason.get("type") if isinstance(reason, dict) else reason
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise EngineError(f"{where}: malformed output {k} ({type(e).__name__}: {e})") from None
        if kind == "abort":
            message = reason.get("message") if isinstance(reason, dict) else None
            raise EngineError(f"{where}: output {k} was aborted by the server ({message})")
        if kind not in ("stop", "length"):
            raise EngineError(f"{where}: output {k} has unknown finish reason {reason!r}")
        results[prompt_index].append(Generation(
            prompt_index=prompt_index, sample_index=sample_index, token_ids=token_ids, logprobs=logprobs,
            finish_reason=kind, weight_version=weight_version, text=item.get("text"),
        ))
    return results


# ---------------------------------------------------------------------------------- the engine


class SGLangHTTPEngine(RolloutEngine):
    """Client of one SGLang HTTP server (``python -m sglang.launch_server``).

    ``broadcast`` is set by the weight transport (``NCCLBroadcastTransport.connect``): a callable that
    broadcasts one bucket's tensors from rank 0 of the weight-update group. ``CudaIPCTransport`` and
    ``DiskTransport`` call ``update_weights_from_tensor`` / ``update_weights_from_disk`` instead.
    """

    name = "sglang"

    def __init__(self, url: str, timeout: float = 600.0, control_timeout: float = 60.0,
                 weight_sync_timeout: float = 600.0, pause_mode: str = "retract",
                 group_name: str = DEFAULT_GROUP_NAME, initial_version: int = 0):
        self.url = url.rstrip("/")
        self.timeout = timeout  # generation
        self.control_timeout = control_timeout  # pause / continue / flush / health / memory
        self.weight_sync_timeout = weight_sync_timeout  # group init and each bucket
        self.pause_mode = pause_mode
        self.group_name = group_name
        self.weight_version = initial_version
        self.broadcast: Optional[Callable[[Bucket], None]] = None
        self._group_initialised = False
        self._released: set[str] = set()  # memory tags released and not yet resumed (mirrors the server)
        build_pause_generation_request(pause_mode)  # validate early

    # ------------------------------------------------------------------ HTTP

    def _request(self, route: str, body: Optional[dict], doing: str, timeout: float, method: str = "POST") -> Any:
        url = self.url + route
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        where = f"{self.name} engine at {url}: {doing}"
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace") if e.fp is not None else ""
            raise EngineError(f"{where} failed: HTTP {e.code} {detail}".rstrip()) from None
        except (socket.timeout, TimeoutError) as e:
            raise EngineError(f"{where} timed out after {timeout:g}s ({e})") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise EngineError(f"{where} timed out after {timeout:g}s ({reason})") from None
            raise EngineError(f"{where} failed: cannot reach the server ({reason})") from None
        except (ConnectionError, OSError) as e:
            raise EngineError(f"{where} failed: {type(e).__name__}: {e}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _check_success(self, reply: Any, doing: str) -> None:
        """Weight routes answer ``{"success": bool, "message": str}``."""
        if isinstance(reply, dict) and reply.get("success") is False:
            raise EngineError(f"{self.name} engine at {self.url}: {doing} failed: {reply.get('message')}")

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[list[Generation]]:
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if not p:
                raise EngineError(f"{self.name} engine at {self.url}: prompt {i} is empty")
        if self._released:  # colocated: KV cache / CUDA graphs come back for the rollout
            self.wake()
        doing = f"generating ({len(prompts)} prompts x n={params.n})"
        body = self._request("/generate", build_generate_request(prompts, params, seeds), doing, self.timeout)
        return parse_generate_response(body, len(prompts), params.n, self.weight_version,
                                       where=f"{self.name} engine at {self.url}/generate")

    # ------------------------------------------------------------------ weights

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  backend: str = "nccl") -> None:
        """Ask the server's ranks to join the weight-update group (blocks until the trainer joins too)."""
        body = build_init_weights_update_group_request(master_address, master_port, rank_offset, world_size,
                                                       self.group_name, backend)
        doing = f"joining weight-update group {self.group_name} at {master_address}:{master_port}"
        self._check_success(self._request("/init_weights_update_group", body, doing, self.weight_sync_timeout), doing)
        self._group_initialised = True

    def destroy_weights_update_group(self) -> None:
        doing = f"destroying weight-update group {self.group_name}"
        self._group_initialised = False  # whatever the answer: never destroyed twice
        reply = self._request("/destroy_weights_update_group", build_destroy_weights_update_group_request(self.group_name),
                              doing, self.control_timeout)
        self._check_success(reply, doing)

    def begin_weight_update(self) -> None:
        doing = "opening a weight-update session"
        self._check_success(self._request("/begin_weight_update", build_begin_weight_update_request(), doing,
                                          self.control_timeout), doing)

    def end_weight_update(self) -> None:
        doing = "closing the weight-update session"
        self._check_success(self._request("/end_weight_update", build_end_weight_update_request(), doing,
                                          self.weight_sync_timeout), doing)

    def pause_generation(self) -> None:
        self._request("/pause_generation", build_pause_generation_request(self.pause_mode),
                      "pausing generation", self.control_timeout)

    def continue_generation(self) -> None:
        self._request("/continue_generation", build_continue_generation_request(),
                      "continuing generation", self.control_timeout)

    def flush_cache(self) -> None:
        self._request(f"/flush_cache?timeout={self.control_timeout:g}", None, "flushing the cache",
                      self.control_timeout + 5, method="POST")

    def open_weight_update(self) -> None:
        """weights back (if released) -> pause -> begin: the server takes weight updates. A failed
        begin continues generation before it raises."""
        if "weights" in self._released:
            self.wake(["weights"])
        self.pause_generation()
        try:
            self.begin_weight_update()
        except BaseException:
            with suppress(EngineError):  # the begin's error is the one to report
                self.continue_generation()
            raise

    def close_weight_update(self, version: int, complete: bool = True) -> None:
        """end -> flush -> continue; the server then serves ``version``. ``complete`` False (the
        update failed part-way): the session is ended quietly (the first error is the one to
        report) and generation continued; the weights are partly updated, a new sync is needed."""
        try:
            if complete:
                self.end_weight_update()
                self.flush_cache()
            else:
                try:
                    self.end_weight_update()
                except EngineError as e:
                    log.warning("%s engine at %s: after a failed sync v%d: %s", self.name, self.url, version, e)
        finally:
            self.continue_generation()
        if complete:
            self.weight_version = version

    @contextmanager
    def _weight_update_session(self, version: int) -> Iterator[None]:
        """:meth:`open_weight_update` -> [body] -> :meth:`close_weight_update`."""
        self.open_weight_update()
        try:
            yield
        except BaseException:
            self.close_weight_update(version, complete=False)
            raise
        self.close_weight_update(version)

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Per bucket: POST update_weights_from_distributed while the trainer broadcasts the tensors
        (inside a weight-update session, see the module docstring)."""
        self._check_group(version)
        with self._weight_update_session(version):
            self.send_buckets(buckets, version)

    def send_buckets(self, buckets: Iterable[Bucket], version: int) -> None:
        """The buckets of :meth:`update_weights` without its session: for a sender that is one of
        several into a session someone else holds open (``weight_sync/stage_groups.py``)."""
        self._check_group(version)
        for i, bucket in enumerate(buckets):
            self._sync_bucket(bucket, version, i)

    def _check_group(self, version: int) -> None:
        if self.broadcast is None:
            raise EngineError(f"{self.name} engine at {self.url}: syncing weights v{version}: no weight-update group "
                              "(call NCCLBroadcastTransport.connect first, or push with CudaIPCTransport or "
                              "DiskTransport)")

    def update_weights_from_tensor(self, payloads: Iterable[Sequence[str]], version: int) -> None:
        """One ``/update_weights_from_tensor`` per bucket; ``payloads`` yields, per bucket, the
        serialized flattened bucket for each server TP rank (see ``weight_sync/cuda_ipc.py``). The
        iterator is advanced only after the server answered, so it may free the previous bucket then."""
        with self._weight_update_session(version):
            for i, serialized in enumerate(payloads):
                self.send_tensor_bucket(serialized, version, i)

    def send_tensor_bucket(self, serialized: Sequence[str], version: int, index: int) -> None:
        """One bucket of :meth:`update_weights_from_tensor` (one payload per server TP rank),
        without its session: for a sync whose session someone holds open (``weight_sync/same_gpu_ipc.py``)."""
        doing = f"syncing weights v{version} (bucket {index}, CUDA IPC to {len(serialized)} TP ranks)"
        body = build_update_weights_from_tensor_request(serialized, version, flush_cache=False)
        self._check_success(self._request("/update_weights_from_tensor", body, doing, self.weight_sync_timeout), doing)

    def update_weights_from_disk(self, model_path: str, version: int, load_format: Optional[str] = None) -> None:
        """Load a safetensors folder the server can read (same machine or shared filesystem)."""
        if "weights" in self._released:
            self.wake(["weights"])
        doing = f"syncing weights v{version} from disk ({model_path})"
        body = build_update_weights_from_disk_request(model_path, version, load_format)
        self._check_success(self._request("/update_weights_from_disk", body, doing, self.weight_sync_timeout), doing)
        self.weight_version = version

    def _sync_bucket(self, bucket: Bucket, version: int, index: int) -> None:
        doing = f"syncing weights v{version} (bucket {index}, {len(bucket)} tensors)"
        body = build_update_weights_from_distributed_request(bucket, version, self.group_name, flush_cache=False)
        box: dict[str, Any] = {}

        def post():
            try:
                box["reply"] = self._request("/update_weights_from_distributed", body, doing, self.weight_sync_timeout)
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                box["error"] = e

        thread = threading.Thread(target=post, name="sglang-weight-sync", daemon=True)
        thread.start()
        try:
            self.broadcast(bucket)
        except Exception as e:
            thread.join(timeout=1.0)
            if "error" in box:
                raise box["error"]
            raise EngineError(f"{self.name} engine at {self.url}: {doing}: broadcast failed ({e})") from None
        thread.join(timeout=self.weight_sync_timeout + 5)
        if thread.is_alive():
            raise EngineError(f"{self.name} engine at {self.url}: {doing}: no reply within {self.weight_sync_timeout:g}s")
        if "error" in box:
            raise box["error"]
        self._check_success(box.get("reply"), doing)

    # ------------------------------------------------------------------ memory / health

    def sleep(self, tags: Optional[Sequence[str]] = None) -> None:
        """Release GPU memory (all of ``MEMORY_TAGS`` by default) while the trainer uses the GPU."""
        todo = [t for t in (_check_tags(tags) or MEMORY_TAGS) if t not in self._released]
        if not todo:
            return
        self._request("/release_memory_occupation", build_release_memory_request(todo),
                      f"releasing memory {todo}", self.control_timeout)
        self._released.update(todo)

    def wake(self, tags: Optional[Sequence[str]] = None) -> None:
        """Take back what ``sleep`` released (only ``tags`` when given)."""
        todo = [t for t in (_check_tags(tags) or MEMORY_TAGS) if t in self._released]
        if not todo:
            return
        self._request("/resume_memory_occupation", build_resume_memory_request(todo),
                      f"resuming memory {todo}", self.control_timeout)
        self._released.difference_update(todo)

    def health(self) -> bool:
        """True when ``/health_generate`` answers 200; raises ``EngineError`` when unreachable."""
        try:
            self._request("/health_generate", None, "health check", self.control_timeout, method="GET")
        except EngineError as e:
            if " HTTP 503" in str(e):
                return False
            raise
        return True

    def close(self) -> None:
        """Leave the weight-update group the server joined (its ranks keep the communicator
        otherwise); a failure is logged, not raised, so closing always completes."""
        self.broadcast = None
        if self._group_initialised:
            try:
                self.destroy_weights_update_group()
            except EngineError as e:
                log.warning("%s", e)
