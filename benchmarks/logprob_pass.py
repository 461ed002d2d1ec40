"""Old-policy / reference logprob pass (forward only): fused vs full logits vs chunked head.

  python benchmarks/logprob_pass.py [--layers 4] [--vocab 128256] [--sequences 4 --seq-len 4096]
                                    [--tokens-list 4x2048,4x4096,8x4096] [--chunk-tokens 1024]
                                    [--variants fused,full-logits,fused-chunked-head] [--repeats 3]
                                    [--attention-backend auto|te|sdpa] [--write docs/benchmarks.md]

How to run: on one GPU (H100) with no arguments it measures 4 Llama-3.1-8B-shaped layers
(hidden 4096, FFN 14336, 32 heads / 8 KV heads of 128) with the 128256-token head, bf16, TP=1,
on 4 sequences of 4096 random tokens; add ``--tokens-list 4x2048,4x4096,8x4096`` for the sweep
and ``--write docs/benchmarks.md`` to append the table. On CPU the defaults shrink (2 layers of a
quarter-width shape, vocab 32768, 2 x 512 tokens) so that it finishes in minutes; ``--shape
hidden_size=64,...`` overrides the layer shape anywhere.

Each (variant, batch) runs in a fresh process that loads the same random HF folder into the
Megatron policy and calls the trainer's forward-only engine (``ModelRunner.forward``, the whole
batch as one micro-batch):

- fused: ``forward_only.sequence_logprobs_from_logits``: GPTModel's [b, s, V/tp] logits, then the chunked
  vocab-parallel logprobs (runner/logprobs.py);
- full-logits: the same forward, then ``logits.float().log_softmax(-1)`` and a gather (what a
  trainer without fusion does);
- fused-chunked-head: ``chunked_logprobs.sequence_logprobs_chunked``: the decoder to the final
  hidden states, then the output layer and the logprobs ``--chunk-tokens`` tokens at a time,
  so the [tokens, V] logits never exist.

Reported: tokens/s (input tokens over the median of ``--repeats`` passes after one warm-up),
peak memory over all passes (GPU: allocated bytes, the weights included; CPU: peak RSS), the peak
above the memory in use once the weights are loaded, its ratio to full-logits, the issue's goal
(logprob pass peak <= 1/4 of full-logits: "met" or "missed"), and the largest difference of the
logprobs from full-logits' (same weights, same tokens). With ``--attention-backend te`` and no
Transformer Engine installed, every row says so instead of being measured.
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

import torch

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import REPO

VARIANTS = ("fused", "full-logits", "fused-chunked-head")
GOAL = 0.25  # the goal: the logprob pass's peak is at most 1/4 of the full-logits pass's
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
CPU_SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2, head_dim=128)
DEFAULTS = {"cpu": dict(layers=2, vocab=32768, sequences=2, seq_len=512, shape=CPU_SHAPE),
            "cuda": dict(layers=4, vocab=common.LLAMA31_8B_VOCAB, sequences=4, seq_len=4096, shape={})}


# --------------------------------------------------------------------------- arguments


def parse_tokens_list(text: str) -> list[tuple[int, int]]:
    """'4x2048,8x4096' -> [(4, 2048), (8, 4096)] (sequences x tokens per sequence)."""
    out = []
    for item in text.split(","):
        try:
            b, s = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{item}' is not SEQUENCESxSEQ_LEN (e.g. 4x4096)") from None
        if b < 1 or s < 2:
            raise argparse.ArgumentTypeError(f"'{item}': at least 1 sequence of at least 2 tokens is needed")
        out.append((b, s))
    return out




def parse_shape(text: str) -> dict[str, int]:
    """'hidden_size=64,head_dim=16' -> layer-shape overrides of the 8B shape."""
    shape = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in SHAPE_KEYS:
            raise argparse.ArgumentTypeError(f"'{item}' is not KEY=VALUE with KEY one of {', '.join(SHAPE_KEYS)}")
        shape[key] = common.positive_int(value)
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=common.positive_int, default=None, help="decoder layers (default 4 on GPU, 2 on CPU)")
    p.add_argument("--vocab", type=common.positive_int, default=None, help="vocabulary (default 128256 on GPU, 32768 on CPU)")
    p.add_argument("--sequences", type=common.positive_int, default=None, help="sequences per pass (default 4 on GPU, 2 on CPU)")
    p.add_argument("--seq-len", type=common.positive_int, default=None, help="tokens per sequence (default 4096 on GPU, 512 on CPU)")
    p.add_argument("--tokens-list", type=parse_tokens_list, default=None,
                   help="sweep of SEQUENCESxSEQ_LEN batches, e.g. 4x2048,4x4096,8x4096 (replaces --sequences/--seq-len)")
    p.add_argument("--variants", type=common.name_list(VARIANTS), default=list(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--chunk-tokens", type=common.positive_int, default=1024, help="tokens per output-layer chunk (chunked head)")
    p.add_argument("--shape", type=parse_shape, default=None,
                   help="layer shape overrides, KEY=VALUE,... with KEY in " + ", ".join(SHAPE_KEYS)
                   + " (default: the 8B shape on GPU, a quarter-width one on CPU)")
    p.add_argument("--params-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="Megatron weights and logits dtype")
    p.add_argument("--attention-backend", choices=["auto", "te", "sdpa"], default="auto",
                   help="auto: Transformer Engine spec when it is installed, else local spec + SDPA")
    p.add_argument("--repeats", type=common.positive_int, default=3, help="timed passes per variant (median reported)")
    p.add_argument("--seed", type=int, default=0, help="weights and token ids")
    p.add_argument("--workdir", type=Path, default=None, help="where the model goes (default: a temp dir, removed)")
    p.add_argument("--write", type=Path, default=None, help="append the results to this markdown file")
    return p


def parse_args(argv=None, cuda: bool | None = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    a.device = "cuda" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"
    if a.tokens_list is not None and (a.sequences is not None or a.seq_len is not None):
        p.error("give either --tokens-list or --sequences/--seq-len, not both")
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.seq_len < 2:
        p.error("--seq-len must be at least 2 (a logprob needs a previous token)")
    a.batches = a.tokens_list or [(a.sequences, a.seq_len)]
    shape = {**common.LLAMA31_8B, **a.shape}
    if shape["num_attention_heads"] % shape["num_key_value_heads"]:
        p.error(f"--shape: {shape['num_key_value_heads']} KV heads do not divide {shape['num_attention_heads']} heads")
    return a


# --------------------------------------------------------------------------- one measurement (child process)

def measure(spec: dict) -> dict:
    """Load the model, run ``spec['variant']`` ``repeats`` times after a warm-up; the numbers and
    the logprobs of the last pass (saved to ``spec['out']``)."""
    import gc

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig, PrecisionConfig
    from rlmt_megatron.config.optim import BatchingConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.runner.chunked_logprobs import sequence_logprobs_chunked
    from rlmt_megatron.runner.model_runner import ModelRunner
    from rlmt_megatron.runner.batching import samples_from_sequences as _samples
    from rlmt_megatron.runner.forward_only import sequence_logprobs_from_logits

    device = spec["device"]
    build = ModelBuildConfig(attention_backend=spec["attention_backend"],
                             precision=PrecisionConfig(params_dtype=spec["params_dtype"]))
    bootstrap.initialize(ParallelConfig())
    built = load_model(spec["model"], "policy", build)
    b, s = spec["sequences"], spec["seq_len"]
    engine = ModelRunner(built, None, BatchingConfig(logprob_tokens_per_microbatch=b * s))  # one micro-batch
    vocab = built.spec.vocab_size
    gen = torch.Generator().manual_seed(spec["seed"])
    seqs = torch.randint(0, vocab, (b, s), generator=gen).tolist()

    def full_logits_reduce(logits, mb):
        lp = logits[:, :-1, :vocab].float().log_softmax(-1).gather(-1, mb.targets[..., None])[..., 0]
        return [lp[row, : int(n) - 1].cpu() for row, n in enumerate(mb.lengths[: len(mb.indices)])]

    passes = {
        "fused": lambda: sequence_logprobs_from_logits(engine, seqs),
        "full-logits": lambda: engine.forward(_samples(seqs), full_logits_reduce),
        "fused-chunked-head": lambda: sequence_logprobs_chunked(engine, seqs, chunk_tokens=spec["chunk_tokens"]),
    }
    run = passes[spec["variant"]]
    result: dict = {}

    def call():
        result["lp"] = run()

    weights = sum(p.numel() * p.element_size() for c in built.chunks for p in c.parameters())
    gc.collect()
    base = common.reset_peak_memory(device)
    seconds = common.time_calls(call, spec["repeats"], 1, device)
    peak = common.peak_memory(device)
    torch.save(torch.cat(result["lp"]), spec["out"])
    bootstrap.shutdown()
    median = sorted(seconds)[len(seconds) // 2]
    return {"median_s": median, "tokens_per_s": b * s / median, "weights_gib": weights / 2**30,
            "peak_total_gib": peak / 2**30, "peak_above_gib": (peak - base) / 2**30,
            "logits_gib": b * s * built.padded_vocab_size * torch.finfo(getattr(torch, spec["params_dtype"])).bits / 8 / 2**30}


def child() -> None:
    """Entry point of the measuring process: a JSON spec in argv[1], a JSON row on the last stdout line."""
    print(json.dumps(measure(json.loads(sys.argv[1]))), flush=True)


def run_isolated(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = "from benchmarks.logprob_pass import child; child()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [f"exit {proc.returncode} (killed: out of memory?)"]
        return {"error": lines[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- table

def backend_or_skip(attention_backend: str) -> tuple[str, str | None]:
    """The layer spec the model gets, and why nothing can be measured (or None)."""
    from rlmt_megatron.config.model_build import ModelBuildConfig
    from rlmt_megatron.errors import RLMTError
    from rlmt_megatron.models.layer_specs import uses_te_spec

    try:
        te = uses_te_spec(ModelBuildConfig(attention_backend=attention_backend))
    except RLMTError:
        return "TE spec", "skipped: transformer_engine is not installed (--attention-backend te)"
    return ("TE spec" if te else "local spec + SDPA"), None


def add_comparisons(rows: list[dict]) -> list[dict]:
    """Per batch: each row's peak above the weights over full-logits', the goal verdict, and the
    largest logprob difference from full-logits' (loaded from the saved files)."""
    for r in rows:
        full = next((f for f in rows if f["batch"] == r["batch"] and f["variant"] == "full-logits"
                     and "error" not in f and "skipped" not in f), None)
        if full is None or "error" in r or "skipped" in r or r is full:
            continue
        r["ratio"] = r["peak_above_gib"] / full["peak_above_gib"]
        r["goal"] = "met" if r["ratio"] <= GOAL else f"missed by {r['ratio'] / GOAL:.1f}×"
        if r.get("out") and full.get("out"):
            mine, ref = torch.load(r["out"]), torch.load(full["out"])
            r["max_diff"] = (mine.double() - ref.double()).abs().max().item()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| batch | variant | tokens/s | median s | weights GiB | logits GiB | peak total GiB "
             "| peak above weights GiB | ÷ full-logits | goal ≤ ¼ | max abs Δ logprob vs full |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = f"| {r['batch']} | {r['variant']} "
        if "skipped" in r or "error" in r:
            lines.append(head + f"| {r.get('skipped') or 'failed: ' + r['error']} | | | | | | | | |")
            continue
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        diff = f"{r['max_diff']:.2e}" if "max_diff" in r else ""
        lines.append(head + f"| {r['tokens_per_s']:,.0f} | {r['median_s']:.3f} | {r['weights_gib']:.2f} | {r['logits_gib']:.2f} "
                     f"| {r['peak_total_gib']:.2f} | {r['peak_above_gib']:.2f} | {ratio} | {r.get('goal', '')} | {diff} |")
    return "\n".join(lines)


def section(a: argparse.Namespace, spec_name: str, rows: list[dict], argv: list[str]) -> str:
    shape = {**common.LLAMA31_8B, **a.shape}
    return (common.section_header("Logprob pass (forward only): fused vs full logits vs chunked head",
                                  "benchmarks/logprob_pass.py", argv)
            + f"Model: {a.layers} layers, hidden {shape['hidden_size']}, FFN {shape['intermediate_size']}, "
              f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads of {shape['head_dim']}, "
              f"vocab {a.vocab}, random {a.params_dtype} weights, TP=1, {spec_name}; chunked head "
              f"{a.chunk_tokens} tokens per chunk; median of {a.repeats} passes after one warm-up. \"peak above "
              f"weights\": peak minus the memory in use once the model is loaded; goal: at most ¼ of "
              f"full-logits'.\n\n" + table(rows) + "\n")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    spec_name, skip = backend_or_skip(a.attention_backend)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="rlmt-logprob-pass-"))
    rows: list[dict] = []
    try:
        model_dir = work / "model"
        if skip is None:
            print(f"writing a {a.layers}-layer, vocab {a.vocab} model to {model_dir} ...", flush=True)
            common.write_random_model(model_dir, a.layers, a.vocab, a.device, a.seed, **a.shape)
        for b, s in a.batches:
            for variant in a.variants:
                row = {"batch": f"{b}×{s}", "variant": variant}
                if skip:
                    row["skipped"] = skip
                else:
                    out = work / f"logprobs-{variant}-{b}x{s}.pt"
                    row.update(run_isolated(dict(
                        variant=variant, model=str(model_dir), device=a.device, sequences=b, seq_len=s,
                        chunk_tokens=a.chunk_tokens, params_dtype=a.params_dtype,
                        attention_backend=a.attention_backend, repeats=a.repeats, seed=a.seed, out=str(out))))
                    row["out"] = str(out) if "error" not in row else None
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        add_comparisons(rows)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{spec_name}; {common.machine()}\n" + table(rows))
    if a.write:
        common.append_section(a.write, section(a, spec_name, rows, argv))


if __name__ == "__main__":
    main()
