"""Weight sync wall time against the number of rollout engines: one stream fanned out to every
engine at once (``SyncPipeline`` + ``fan_out``), against pushing to the engines one after another.

  python benchmarks/fleet_sync.py [--engines 1,2,4] [--layers 2] [--vocab 32768] [--hidden 1024]
                                  [--bucket-mib 64] [--repeats 3] [--write docs/benchmarks.md]

Model: a Llama-shaped model with random bf16 weights (``--hidden`` wide, FFN 4x, head dim 64, a
quarter of the heads for K/V), written as an HF folder. Engines: the hf engine, each in its own
process (``SubprocessEngine``: the buckets are pickled into its pipe, which for CPU tensors means
torch moves their storage to shared memory once and passes descriptors), in bf16. The stream: the folder's tensors in buckets of
``--bucket-mib``, read once per sync. Each row is the median of ``--repeats`` syncs after one
warm-up, with the engine checksums checked once at the end (every engine holds what was sent).

"Flat" means the sync takes about as long with N engines as with one. On a CPU machine the
transports compete for the same cores (each engine's process unpickles and copies its share), so
the fan-out can only stay flat up to the number of free cores; the table reports what it does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--layers", type=common.positive_int, default=2)
    p.add_argument("--vocab", type=common.positive_int, default=32768)
    p.add_argument("--hidden", type=common.positive_int, default=1024)
    p.add_argument("--bucket-mib", type=common.positive_int, default=64)
    p.add_argument("--repeats", type=common.positive_int, default=3)
    p.add_argument("--write", type=Path, help="append the results to this markdown file")
    a = p.parse_args(argv)

    from safetensors.torch import load_file

    from rlmt_megatron.checkpoint.safetensors_io import pack_buckets
    from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine
    from rlmt_megatron.rollout.weight_sync.checksum import tensors_checksum
    from rlmt_megatron.rollout.weight_sync.interfaces import InProcessTransport
    from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline, SyncTarget

    heads = a.hidden // 64
    shape = dict(hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_attention_heads=heads,
                 num_key_value_heads=max(1, heads // 4), head_dim=64, max_position_embeddings=4096)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        nbytes = common.write_random_model(folder, a.layers, a.vocab, **shape)
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        sent = tensors_checksum(state.items())
        engines = [SubprocessEngine("rlmt_megatron.rollout.hf_engine.HFEngine",
                                    {"model_dir": str(folder), "dtype": "bfloat16"}, timeout_s=1800)
                   for _ in range(max(a.engines))]
        try:
            version = 0

            def sync(members) -> float:
                nonlocal version
                version += 1
                start = time.perf_counter()
                SyncPipeline().push(pack_buckets(state.items(), a.bucket_mib * 2**20), version,
                                    {i: SyncTarget(InProcessTransport(engines[i]), engines[i]) for i in members})
                return time.perf_counter() - start

            for n in a.engines:
                members = list(range(n))
                sync(members)  # warm-up
                together = statistics.median(sync(members) for _ in range(a.repeats))
                apart = statistics.median(sum(sync([i]) for i in members) for _ in range(a.repeats))
                rows.append((n, together, apart))
                print(f"{n} engine(s): {together:.2f} s at once, {apart:.2f} s one after another", flush=True)
            held = {e.checksum() for e in engines}
            assert held == {sent}, f"an engine holds other weights than were sent: {held} vs {sent}"
        finally:
            for e in engines:
                e.close()

    base = rows[0][1]
    table = ["| engines | sync, all at once (s) | vs one engine | one after another (s) | GB/s per engine, at once |",
             "| --- | --- | --- | --- | --- |"]
    for n, together, apart in rows:
        table.append(f"| {n} | {together:.2f} | {together / base:.2f}x | {apart:.2f} | {nbytes / together / 1e9:.2f} |")
    text = (common.section_header("Weight sync to a fleet of engines, CPU", "benchmarks/fleet_sync.py", argv)
            + f"Model: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}: {nbytes / 1e9:.2f} GB of bf16 weights, "
            f"buckets of {a.bucket_mib} MiB; hf engines in their own processes (pipe + shared memory); median of "
            f"{a.repeats} syncs. Every engine's checksum equalled the sent weights'.\n\n" + "\n".join(table) + "\n")
    print(text)
    common.append_section(a.write, text)


if __name__ == "__main__":
    main()
