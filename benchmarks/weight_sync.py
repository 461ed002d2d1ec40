"""Throughput of the trainer -> rollout weight export and sync, against a plain memory copy.

  python benchmarks/weight_sync.py [--layers N] [--vocab V] [--bucket-mib 512] [--layouts 1x1,2x1,1x2]
                                   [--repeats 3] [--write docs/benchmarks.md]

Model: Llama-3.1-8B-shaped layers (hidden 4096, FFN 14336, 32 heads and 8 KV heads of 128,
llama3 RoPE) with random weights, written as an HF folder (config.json, bf16 safetensors, a
small tokenizer) to a temporary directory; the Megatron model is loaded from it at each layout.

- export: drain ``buckets_at`` (HF names, bf16, buckets of ``--bucket-mib``) onto global rank 0,
  at every TP x PP layout asked for (torchrun, one process per model-parallel rank);
- at 1x1 also: the export without the dtype cast, the export streamed into the embedded HF
  engine (``InProcessTransport`` -> ``HFEngine.update_weights``), the engine's copy alone, and
  the production colocated path: the export streamed through ``CudaIPCTransport`` (flattened
  buckets, IPC handles, ``/update_weights_from_tensor`` inside a weight-update session) into the
  SGLang emulator (``rlmt_megatron/testing/sglang_emulator.py``; SGLang itself pins another
  torch) spawned on the same device with the model's weights there, timed until the server has
  copied the last bucket (see ``weight_sync_worker.py``); on CPU the same transport sends
  shared-memory handles;
- the floor, in the same process: copying the same number of bytes with ``copy_`` into
  preallocated memory, and with ``clone`` into fresh memory.
GB/s is the bytes of the exported tensors over the time; "of copy floor" divides by the copy_ GB/s.

Device bandwidth and the goal (export + sync at >= 50% of device bandwidth): the copy_
floor reads and writes every byte, so the device's measured copy bandwidth is 2 x bytes / seconds
(bytes read + written, comparable with the memory bandwidth on a data sheet). A sync moves each
weight byte at least once from the trainer's memory into the engine's, reading and writing it,
so its share of the device bandwidth is 2 x bytes / seconds over that (the same number as "of copy
floor"); the goal is met at >= 50%, a sync no slower than two plain copies. Below the table, one
line per export + sync row says "met" or by how much it missed.

On CPU (gloo) the defaults are 2 layers and vocab 32768 (~0.7 B parameters, 1.4 GB in bf16) so
every layout fits a 24 GB machine. With CUDA the same script measures the colocated path on
one GPU (Megatron model, HF engine and emulated SGLang server on the GPU, bf16, 1x1 only) with
the full 8B shape (32 layers, vocab 128256) by default, against a device-to-device copy.

How to run on one H100: ``python benchmarks/weight_sync.py`` (add ``--write docs/benchmarks.md``
to record it). GPU memory: the Megatron model (16 GB) with the HF engine (16 GB, freed after its
rows), then with the emulated server's weights (16 GB, another process on the same GPU), plus a
bucket or two of 512 MiB; writing the random 8B folder needs ~16 GB of disk in the temp dir
(``--workdir`` to put it elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import LLAMA31_8B, REPO, write_random_model

WORKER = Path(__file__).resolve().parent / "weight_sync_worker.py"

DEFAULTS = {"cpu": dict(layers=2, vocab=32768, layouts=[(1, 1), (2, 1), (1, 2)], params_dtype="float32"),
            "cuda": dict(layers=32, vocab=128256, layouts=[(1, 1)], params_dtype="bfloat16")}


# --------------------------------------------------------------------------- arguments


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'1x1,2x1' -> [(1, 1), (2, 1)] (TP x PP)."""
    layouts = []
    for item in text.split(","):
        try:
            tp, pp = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"layout '{item}' is not TPxPP (e.g. 2x1)") from None
        if tp < 1 or pp < 1:
            raise argparse.ArgumentTypeError(f"layout '{item}': TP and PP must be at least 1")
        layouts.append((tp, pp))
    return layouts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=common.positive_int, default=None,
                   help="decoder layers (default 2 on CPU to fit a 24 GB machine, 32 on GPU)")
    p.add_argument("--vocab", type=common.positive_int, default=None,
                   help="vocabulary size (default 32768 on CPU to fit a 24 GB machine, 128256 on GPU)")
    p.add_argument("--bucket-mib", type=common.positive_int, default=512, help="export bucket size in MiB")
    p.add_argument("--layouts", type=parse_layouts, default=None,
                   help="TPxPP layouts to export at (default 1x1,2x1,1x2 on CPU; 1x1 on GPU, the only one there)")
    p.add_argument("--repeats", type=common.positive_int, default=3, help="timed passes per measurement (best and median reported)")
    p.add_argument("--params-dtype", choices=["float32", "bfloat16"], default=None,
                   help="Megatron parameter dtype (default float32 on CPU, the dtype tested there; bfloat16 on GPU)")
    p.add_argument("--engine-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="dtype of the rollout engines' weights (HF engine, emulated SGLang server)")
    p.add_argument("--threads", type=common.positive_int, default=None,
                   help="CPU threads per process (default: cores / processes)")
    p.add_argument("--workdir", type=Path, default=None, help="where to write the model (default: a temp dir, removed)")
    p.add_argument("--write", type=Path, default=None, help="append the results to this markdown file")
    return p


def parse_args(argv=None, cuda: bool | None = None) -> argparse.Namespace:
    """Parse and fill the device-dependent defaults; reject layouts the model or device cannot take."""
    p = build_parser()
    a = p.parse_args(argv)
    common.device_defaults(a, DEFAULTS, cuda)
    for tp, pp in a.layouts:
        if LLAMA31_8B["num_key_value_heads"] % tp:
            p.error(f"layout {tp}x{pp}: TP must divide the {LLAMA31_8B['num_key_value_heads']} KV heads")
        if a.layers % pp:
            p.error(f"layout {tp}x{pp}: PP must divide --layers {a.layers}")
        if a.device == "cuda" and tp * pp != 1:
            p.error(f"layout {tp}x{pp}: on GPU only the colocated 1x1 path (one GPU) is measured")
    if (1, 1) not in a.layouts:
        p.error("--layouts must include 1x1 (the sync into the engine and the reference export run there)")
    return a


# --------------------------------------------------------------------------- model folder

# --------------------------------------------------------------------------- runs

def run_layout(model_dir: Path, tp: int, pp: int, a: argparse.Namespace, out: Path) -> list[dict]:
    """One torchrun job at TP x PP; its rows, or one row saying why it failed."""
    import socket

    procs = tp * pp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = a.threads or max(1, (os.cpu_count() or 1) // procs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(WORKER),
           "--model", str(model_dir), "--tp", str(tp), "--pp", str(pp), "--bucket-mib", str(a.bucket_mib),
           "--repeats", str(a.repeats), "--params-dtype", a.params_dtype, "--engine-dtype", a.engine_dtype,
           "--out", str(out)] + (["--sync"] if (tp, pp) == (1, 1) else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["no output (killed: out of memory?)"]
        sys.stderr.write(proc.stderr[-4000:])
        return [{"tp": tp, "pp": pp, "procs": procs, "threads": threads, "what": "failed", "error": lines[-1][:160]}]
    return json.loads(out.read_text())


def add_rates(rows: list[dict]) -> list[dict]:
    """GB/s of every row and its ratio to the copy_ floor measured in the same run (same layout)."""
    floors = {(r["tp"], r["pp"]): r for r in rows if r["what"].startswith("floor: copy_")}
    for r in rows:
        if "error" in r:
            continue
        r["gbps"] = r["bytes"] / r["best_s"] / 1e9
        floor = floors.get((r["tp"], r["pp"]))
        r["of_floor"] = r["gbps"] / (floor["bytes"] / floor["best_s"] / 1e9) if floor else None
    return rows


GOAL = 0.5  # the goal: export + sync at >= 50% of the device's memory bandwidth


def device_bandwidth(rows: list[dict]) -> dict | None:
    """The 1x1 copy_ floor as the device's copy bandwidth: bytes read + written per second."""
    for r in rows:
        if (r["tp"], r["pp"]) == (1, 1) and r["what"].startswith("floor: copy_") and "error" not in r:
            return {"bytes": r["bytes"], "seconds": r["best_s"], "gbps": 2 * r["bytes"] / r["best_s"] / 1e9}
    return None


def goal_lines(rows: list[dict]) -> list[str]:
    """The device bandwidth, then per export + sync row: the goal met, or missed by how much."""
    bw = device_bandwidth(rows)
    if bw is None:
        return ["Device copy bandwidth: not measured (the 1x1 run failed), so the goal cannot be judged."]
    lines = [f"Device copy bandwidth: {bw['gbps']:.1f} GB/s (copy_ of {bw['bytes'] / 1e9:.2f} GB into preallocated "
             f"memory in {bw['seconds']:.3f} s, bytes read + written)."]
    for r in rows:
        if "error" in r or not r["what"].startswith("export + sync"):
            continue
        share = 2 * r["bytes"] / r["best_s"] / 1e9 / bw["gbps"]  # its read + write traffic over the device's
        verdict = "met" if share >= GOAL else (
            f"missed by {100 * (GOAL - share):.0f} points (needs <= {2 * r['bytes'] / (GOAL * bw['gbps'] * 1e9):.3f} s)")
        lines.append(f"- {r['what']}: {100 * share:.0f}% of device bandwidth ({r['best_s']:.3f} s); "
                     f">= {100 * GOAL:.0f}% of device bandwidth: {verdict}")
    return lines


def table(rows: list[dict]) -> str:
    lines = ["| TP×PP | procs × threads | measured | GB | buckets | best s | median s | GB/s (best) | of copy floor |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        who = f"{r['procs']} × {r['threads']}" if r.get("threads") else f"{r['procs']} GPU"
        if "error" in r:
            lines.append(f"| {r['tp']}×{r['pp']} | {who} | failed: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['of_floor']:.2f}" if r.get("of_floor") is not None else ""
        lines.append(f"| {r['tp']}×{r['pp']} | {who} | {r['what']} | {r['bytes'] / 1e9:.2f} | {r['buckets']} "
                     f"| {r['best_s']:.2f} | {r['median_s']:.2f} | {r['gbps']:.2f} | {ratio} |")
    return "\n".join(lines)


def section(a: argparse.Namespace, rows: list[dict], weight_bytes: int, argv) -> str:
    where = "colocated on one GPU" if a.device == "cuda" else "CPU, gloo"
    return (
        common.section_header(f"Weight export + sync, {where}", "benchmarks/weight_sync.py", argv)
        + f"Model: Llama-3.1-8B-shaped layers (hidden 4096, FFN 14336, 32 heads / 8 KV heads of 128, llama3 "
        f"RoPE), {a.layers} layers, vocab {a.vocab}, random weights: {weight_bytes / 1e9:.2f} GB in bf16. "
        f"Megatron params {a.params_dtype}, export bf16, engines {a.engine_dtype}, buckets {a.bucket_mib} MiB; "
        f"best of {a.repeats} passes (median beside).\n\n" + table(rows) + "\n\n" + "\n".join(goal_lines(rows)) + "\n"
    )


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rlmt-weight-sync-"))
    try:
        model_dir = work / "model"
        print(f"writing a {a.layers}-layer, vocab {a.vocab} model to {model_dir} ...", flush=True)
        weight_bytes = write_random_model(model_dir, a.layers, a.vocab, a.device)
        rows = []
        for tp, pp in a.layouts:
            got = add_rates(run_layout(model_dir, tp, pp, a, work / f"rows-{tp}x{pp}.json"))
            print("\n".join(table(got).splitlines()[2:]), flush=True)
            rows += got
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    print("\n".join(goal_lines(rows)))
    if a.write:
        with a.write.open("a") as f:
            f.write(section(a, rows, weight_bytes, argv))


if __name__ == "__main__":
    main()
