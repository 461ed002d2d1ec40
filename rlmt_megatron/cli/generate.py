"""rlmt-generate: answers for an evaluation set, with the thinking and the answer separated.

    rlmt-generate --model runs/x/final_hf --input alpaca_eval.jsonl --out answers.jsonl \\
        --format warm_start --temperature 0.7 --max-new-tokens 4096

Input rows need ``messages`` (a chat ending with a user turn; other keys are kept). Each output
row is the input row plus ``output`` (the full generation), ``thinking``, ``answer`` (what a judge
should read: the text after the thinking delimiter, ``[NULL]`` in strict mode when it is
missing), ``format_ok``, ``finish_reason`` and ``num_tokens``. Feed ``answer`` to the
AlpacaEval / WildBench / Arena-Hard judges. Generation uses the same templates, stop rules and
parser as training, on the embedded HF engine (default) or vLLM.
"""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import run_main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder of the policy")
    p.add_argument("--input", required=True, help="jsonl with 'messages'")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--format", dest="kind", choices=["warm_start", "zero", "no_think"], default="warm_start")
    p.add_argument("--strict", action="store_true", help="answer = [NULL] when the thinking delimiter is missing")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per engine call")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="engine weights: auto = bfloat16 on GPU, float32 on CPU")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from rlmt_megatron.data.jsonl import messages_field, read_jsonl, write_jsonl
    from rlmt_megatron.errors import InputFileError
    from rlmt_megatron.rollout.types import SamplingParams
    from rlmt_megatron.thinking import ThinkingFormatConfig, build_prompt_ids, parse_response, stop_settings

    fmt = ThinkingFormatConfig(kind=args.kind, strict=args.strict)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [(row, messages_field(row, f"{args.input}:{lineno}")) for lineno, row in read_jsonl(args.input)]
    if not rows:
        raise InputFileError(f"{args.input}: no rows")
    stop, stop_ids = stop_settings(fmt, tokenizer)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            stop=stop, stop_token_ids=stop_ids, n=1, seed=args.seed)
    import torch

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.cuda.is_available() else "float32")
    if args.engine == "hf":
        from rlmt_megatron.rollout.hf_engine import HFEngine

        engine = HFEngine(args.model, dtype=dtype)
    else:
        from rlmt_megatron.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(args.model, dtype=dtype, max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                            seed=args.seed)
    out = []
    try:
        for lo in range(0, len(rows), args.batch_size):
            chunk = rows[lo:lo + args.batch_size]
            prompts = [build_prompt_ids(m, tokenizer, fmt, args.max_prompt_tokens)[0] for _, m in chunk]
            for (row, _), gens in zip(chunk, engine.generate(prompts, params)):
                g = gens[0]
                text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
                parsed = parse_response(text, fmt, eos_token=tokenizer.eos_token)
                out.append({**row, "output": text, "thinking": parsed.thinking, "answer": parsed.answer,
                            "format_ok": parsed.format_ok, "finish_reason": g.finish_reason,
                            "num_tokens": len(g.token_ids)})
            print(f"generated {len(out)}/{len(rows)}", flush=True)
    finally:
        engine.close()
    write_jsonl(args.out, out)
    print(f"wrote {len(out)} rows to {args.out}")


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
