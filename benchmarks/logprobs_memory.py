"""Peak memory and time of per-token logprobs + entropy (forward and backward), fused vs naive.

  python benchmarks/logprobs_memory.py [--vocab 128256] [--tokens 2048,4096,8192] [--dtype bfloat16]
                                       [--write docs/benchmarks.md]

- naive: ``log_softmax`` over the full vocabulary in float32, gather, entropy from the full
  probabilities (what a straightforward trainer does);
- fused: ``rlmt_megatron.runner.logprobs.vocab_parallel_logprobs_and_entropy`` (chunked, hand-
  written backward; TP=1 here, so no communication).
Both start from the same [tokens, vocab] logits (the LM head's output, kept by autograd in any
trainer) and backpropagate ``sum(logp) + 0.01 * sum(entropy)`` into them. "extra peak" is the
memory above that starting point: the logits and their gradient are common to both; every other
byte is the method's own. Each measurement runs in a fresh process (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.common import peak_memory, reset_peak_memory


def measure(method: str, tokens: int, vocab: int, dtype: str, device: str) -> dict:
    from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs_and_entropy

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    logits = torch.empty(tokens, vocab, dtype=dt, device=device)
    for a in range(0, tokens, 256):  # filled in slices so setup leaves no large temporaries
        logits[a:a + 256] = torch.randn(min(256, tokens - a), vocab, device=device) * 2
    logits.requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    logits.grad = torch.empty_like(logits).fill_(0)  # the gradient buffer exists in both methods
    base = reset_peak_memory(device)
    start = time.perf_counter()
    if method == "naive":
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    else:
        logp, entropy = vocab_parallel_logprobs_and_entropy(logits, targets, vocab)
    (logp.sum() + 0.01 * entropy.sum()).backward()
    peak = peak_memory(device) - base
    return {"method": method, "tokens": tokens, "vocab": vocab, "dtype": dtype, "device": device,
            "seconds": time.perf_counter() - start, "extra_peak_gib": peak / 2**30,
            "logits_gib": logits.numel() * logits.element_size() / 2**30}


def run_isolated(method, tokens, vocab, dtype, device) -> dict:
    code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
            f"from benchmarks.logprobs_memory import measure; "
            f"print(json.dumps(measure({method!r}, {tokens}, {vocab}, {dtype!r}, {device!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "tokens": tokens, "vocab": vocab, "dtype": dtype, "device": device,
                "error": (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| tokens | vocab | logits dtype | logits GiB | method | seconds | extra peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['vocab']} | {r['dtype']} | | {r['method']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['tokens']} | {r['vocab']} | {r['dtype']} | {r['logits_gib']:.2f} | {r['method']} "
                         f"| {r['seconds']:.2f} | {r['extra_peak_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", default="2048,4096,8192")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--write", type=Path, default=None, help="append the table to this markdown file")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for tokens in map(int, a.tokens.split(",")):
        for method in ("fused", "naive"):
            rows.append(run_isolated(method, tokens, a.vocab, a.dtype, device))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    common.append_section(a.write, common.section_header("Logprobs + entropy, forward+backward: fused vs naive",
                                                         "benchmarks/logprobs_memory.py", list(sys.argv[1:] if argv is None else argv)) + text)


if __name__ == "__main__":
    main()
