"""Under torchrun: time the weight export (and, at 1x1, the syncs into rollout engines) at one layout.

Started by ``benchmarks/weight_sync.py``; rank 0 writes its measurements as JSON to ``--out``.
Every timed pass starts from a barrier and ends when global rank 0 has consumed the last
bucket (on GPU after a device synchronise), so it is the time the rollout side waits for a
complete set of weights. Each measurement is repeated; the script reports the best and median.

At 1x1 (``--sync``) two engines take the export:

* the embedded HF engine (``InProcessTransport`` -> ``HFEngine.update_weights``), in this process;
* the SGLang protocol over CUDA IPC (``CudaIPCTransport`` -> ``SGLangHTTPEngine`` ->
  ``/update_weights_from_tensor``), into the SGLang emulator (``rlmt_megatron.testing.sglang_emulator``)
  spawned on the same device and holding the model's weights there: each bucket is flattened,
  its handle serialised and POSTed, the server maps it and copies every tensor into its weight
  and synchronises before answering, so a pass ends when the last bucket is in the server's
  weights (plus the session's end/flush/continue requests, part of every real sync). On CPU the
  same serializer sends shared-memory handles, which the spawned server can open. The server's
  own count of bytes taken in is checked against what was sent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Optional[tuple[int, int]]], repeats: int, device: torch.device,
           barrier: bool = True) -> dict:
    """Run ``fn`` ``repeats`` times (each after a barrier unless told otherwise); (bytes, buckets) from fn."""
    seconds, counted = [], (0, 0)
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        _sync(device)
        start = time.perf_counter()
        counted = fn() or counted
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return {"best_s": min(seconds), "median_s": statistics.median(seconds), "seconds": seconds,
            "bytes": counted[0], "buckets": counted[1]}


def _drain(buckets) -> tuple[int, int]:
    """Consume a bucket stream as a streaming engine does (no bucket kept once consumed); (bytes, buckets)."""
    nbytes = count = 0
    for bucket in buckets:
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        count += 1
    return nbytes, count


def _counting(buckets, counted: list[int]):
    """Pass the buckets on, appending each one's bytes to ``counted`` (none is held on to)."""
    for bucket in buckets:
        counted.append(sum(t.numel() * t.element_size() for _, t in bucket))
        yield bucket


def _floors(nbytes: int, chunk_bytes: int, repeats: int, device: torch.device) -> list[dict]:
    """Plain copies of ``nbytes`` bf16 bytes in chunks of ``chunk_bytes``: into preallocated memory
    (``copy_``, the bandwidth floor) and into fresh allocations (``clone``, what an export that
    creates new tensors also pays: on CPU the page faults of first touch)."""
    elems = max(1, min(nbytes, chunk_bytes) // 2)
    src = torch.empty(elems, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    pieces = [elems] * (nbytes // 2 // elems) + ([nbytes // 2 % elems] if nbytes // 2 % elems else [])

    def copy():
        for n in pieces:
            dst[:n].copy_(src[:n])

    def clone():
        for n in pieces:
            src[:n].clone()  # freed at once, like a consumed bucket

    # Rank 0 alone: no barrier.
    return [dict(_timed(copy, repeats, device, barrier=False), what="floor: copy_ into preallocated",
                 bytes=nbytes, buckets=len(pieces)),
            dict(_timed(clone, repeats, device, barrier=False), what="floor: clone (fresh memory)",
                 bytes=nbytes, buckets=len(pieces))]


def _cuda_ipc_row(built, bucket_bytes: int, a: argparse.Namespace, device: torch.device) -> dict:
    """Export + sync through CudaIPCTransport into the emulated SGLang server on ``device``."""
    from rlmt_megatron.checkpoint.hf_export import buckets_at
    from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine
    from rlmt_megatron.rollout.weight_sync.cuda_ipc import CudaIPCTransport
    from rlmt_megatron.testing import sglang_emulator

    state = a.out + ".emulator"
    # Its life is bounded; the bound must cover every pass (CPU passes of the defaults take minutes).
    with sglang_emulator.running(state, timeout=3600.0, weights=a.model, device=str(device),
                                 dtype=a.engine_dtype) as url:
        engine = SGLangHTTPEngine(url, control_timeout=120, weight_sync_timeout=600)
        transport = CudaIPCTransport(engine, device=device)
        version = iter(range(1, 10**6))

        def sync():
            counted: list[int] = []
            transport.push(_counting(buckets_at(built, dst=0, bucket_bytes=bucket_bytes), counted), next(version))
            return sum(counted), len(counted)

        row = _timed(sync, a.repeats, device)
        got = sglang_emulator.stats(url)
    # What the server took in: every pass delivered every byte and every weight.
    if got["bytes"][0] != a.repeats * row["bytes"] or got["written"][0] != got["weights"][0]:
        raise RuntimeError(f"the emulated SGLang server took in {got['bytes'][0]} bytes and wrote "
                           f"{got['written'][0]} of its {got['weights'][0]} weights; {a.repeats} passes sent "
                           f"{row['bytes']} bytes each")
    what = "export + sync via CUDA IPC (SGLang protocol, emulated server)"
    if device.type == "cpu":
        what = what[:-1] + "; CPU shared-memory handles)"
    return dict(row, what=what)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--bucket-mib", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--params-dtype", choices=sorted(_DTYPES), required=True)
    p.add_argument("--engine-dtype", choices=sorted(_DTYPES), required=True)
    p.add_argument("--sync", action="store_true", help="also time export + sync into the HF engine")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from rlmt_megatron.checkpoint.hf_export import buckets_at, export_dtype
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig, PrecisionConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.rollout.hf_engine import HFEngine
    from rlmt_megatron.rollout.weight_sync.interfaces import InProcessTransport

    build = ModelBuildConfig(precision=PrecisionConfig(params_dtype=a.params_dtype),
                             parallel=ParallelConfig(tp=a.tp, pp=a.pp))
    bootstrap.initialize(build.parallel)
    rank = dist.get_rank()
    if a.sync and dist.get_world_size() != 1:
        raise SystemExit("--sync measures the embedded engine in a world of one (1x1)")
    built = load_model(a.model, "policy", build)
    device = next(built.chunks[0].parameters()).device
    bucket_bytes = a.bucket_mib * 2**20

    def export(dtype=None):
        return lambda: _drain(buckets_at(built, dst=0, bucket_bytes=bucket_bytes, dtype=dtype))

    out_dtype = export_dtype(built)  # what config.json declares: bf16 for the benchmark's model
    rows = [dict(_timed(export(), a.repeats, device), what=f"export ({_NAMES[out_dtype]})")]
    nbytes = rows[0]["bytes"]
    params_dtype = _DTYPES[a.params_dtype]
    if a.sync and out_dtype != params_dtype:
        # The same export without the dtype cast: the difference is the cast's cost.
        rows.append(dict(_timed(export(params_dtype), a.repeats, device),
                         what=f"export, no cast ({_NAMES[params_dtype]} out)"))
    if a.sync:
        engine = HFEngine(a.model, device=str(device), dtype=_DTYPES[a.engine_dtype])
        transport = InProcessTransport(engine)
        version = iter(range(1, 10**6))

        def sync():
            counted: list[int] = []
            transport.push(_counting(buckets_at(built, dst=0, bucket_bytes=bucket_bytes), counted), next(version))
            return sum(counted), len(counted)

        rows.append(dict(_timed(sync, a.repeats, device), what="export + sync into HF engine"))
        held = list(buckets_at(built, dst=0, bucket_bytes=bucket_bytes))  # the whole model, exported once

        def engine_only():
            engine.update_weights(held, next(version))
            return sum(t.numel() * t.element_size() for b in held for _, t in b), len(held)

        rows.append(dict(_timed(engine_only, a.repeats, device), what="engine update_weights only"))
        del held
        engine.close()
        del engine, transport
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the emulated server allocates its weights on the same GPU
        rows.append(_cuda_ipc_row(built, bucket_bytes, a, device))
    if rank == 0:
        rows += _floors(nbytes, bucket_bytes, a.repeats, device)
        threads = torch.get_num_threads() if device.type == "cpu" else None
        for r in rows:
            r.update(tp=a.tp, pp=a.pp, procs=dist.get_world_size(), threads=threads)
        with open(a.out, "w") as f:
            json.dump(rows, f)
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
