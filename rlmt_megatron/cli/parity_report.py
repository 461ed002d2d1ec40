"""Compare Megatron outputs with transformers: the check a user runs after converting a model.

  python -m rlmt_megatron.cli.parity_report --hf ORIGINAL_DIR [--exported DIR] [--logprobs OUT.jsonl]

- ``--exported``: every tensor of the exported HF folder must equal the original bit for bit.
- ``--logprobs``: rows written by ``rlmt-logprobs`` are re-scored with transformers'
  ``AutoModelForCausalLM`` (float32) and the largest absolute difference is reported.
Exits 1 when a check fails (tolerance ``--tol``, default 1e-4).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def compare_folders(original: Path, exported: Path) -> list[str]:
    from rlmt_megatron.checkpoint.safetensors_io import SafetensorsReader

    a, b = SafetensorsReader(original), SafetensorsReader(exported)
    problems = [f"missing in export: {n}" for n in sorted(a.names() - b.names())]
    problems += [f"extra in export: {n}" for n in sorted(b.names() - a.names())]
    for name in sorted(a.names() & b.names()):
        x, y = a.read(name), b.read(name)
        if x.dtype != y.dtype or not torch.equal(x, y):
            problems.append(f"differs: {name}")
    return problems


def hf_logprobs(model_dir: Path, rows: list[dict]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(logp[row["prompt_len"] - 1:])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, type=Path, help="original HF folder")
    p.add_argument("--exported", type=Path, help="HF folder exported from Megatron")
    p.add_argument("--logprobs", type=Path, help="rlmt-logprobs output jsonl")
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args(argv)
    ok = True
    if args.exported:
        problems = compare_folders(args.hf, args.exported)
        print(f"round trip {args.hf} -> Megatron -> {args.exported}: "
              + ("bit-exact" if not problems else f"{len(problems)} problem(s): {problems[:5]}"))
        ok &= not problems
    if args.logprobs:
        rows = [json.loads(line) for line in args.logprobs.read_text().splitlines() if line.strip()]
        refs = hf_logprobs(args.hf, rows)
        worst = max((torch.tensor(r["logprobs"]) - ref).abs().max().item() for r, ref in zip(rows, refs))
        tokens = sum(len(r["logprobs"]) for r in rows)
        print(f"logprobs vs transformers over {len(rows)} rows / {tokens} tokens: max |diff| = {worst:.3g} (tol {args.tol:g})")
        ok &= worst <= args.tol
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
