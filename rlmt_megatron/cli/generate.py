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
from rlmt_megatron.errors import RLMTError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_position_limit(longest: int, where: str, max_new_tokens: int, max_positions: int, config: str) -> None:
    """The model cannot attend past ``max_position_embeddings``: refuse before loading it rather
    than generate garbage (or crash) past the limit."""
    total = longest + max_new_tokens
    if total <= max_positions:
        return
    room = max_positions - longest
    fix = (f"lower --max-new-tokens to {room} or less, or --max-prompt-tokens" if room > 0
           else "lower --max-prompt-tokens")
    raise RLMTError(f"the longest prompt ({longest} tokens, {where}) + --max-new-tokens {max_new_tokens} = {total} "
                    f"exceeds max_position_embeddings {max_positions} in {config}; {fix}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder of the policy (config.json, safetensors, tokenizer)")
    p.add_argument("--input", required=True, help="jsonl with 'messages' (a chat ending with a user turn)")
    p.add_argument("--out", required=True, help="output jsonl: the input rows plus the generation fields")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                   help="hf: embedded transformers engine (default); vllm: a vLLM engine")
    p.add_argument("--format", dest="kind", choices=["warm_start", "zero", "no_think"], default="warm_start",
                   help="thinking template, as in training (default warm_start)")
    p.add_argument("--strict", action="store_true", help="answer = [NULL] when the thinking delimiter is missing")
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=1024,
                   help="longer prompts are left-truncated (default 1024)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=4096,
                   help="tokens generated per prompt at most (default 4096); refused, before the model is loaded, "
                        "when the longest prompt plus this exceeds the model's max_position_embeddings")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="prompts per engine call (default 32)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="engine weights: auto = bfloat16 on GPU, float32 on CPU")
    args = p.parse_args(argv)

    from rlmt_megatron.data.jsonl import messages_field, read_jsonl, write_jsonl
    from rlmt_megatron.errors import InputFileError
    from rlmt_megatron.checkpoint.safetensors_io import SafetensorsReader
    from rlmt_megatron.models.hf_config import load_hf_config
    from rlmt_megatron.rollout.types import SamplingParams
    from rlmt_megatron.thinking import ThinkingFormatConfig, build_prompt_ids, parse_response, stop_settings
    from rlmt_megatron.trainer.preflight import load_tokenizer

    # everything cheap first (config.json, tokenizer, prompts, weight headers), so that a bad
    # input is one line before the model is loaded
    spec = load_hf_config(args.model)
    fmt = ThinkingFormatConfig(kind=args.kind, strict=args.strict)
    tokenizer = load_tokenizer(args.model, "model")
    rows = []
    for lineno, row in read_jsonl(args.input):
        where = f"{args.input}:{lineno}"
        messages = messages_field(row, where)
        rows.append((row, build_prompt_ids(messages, tokenizer, fmt, args.max_prompt_tokens)[0], where))
    if not rows:
        raise InputFileError(f"{args.input}: no rows")
    _, longest_ids, longest_where = max(rows, key=lambda r: len(r[1]))
    check_position_limit(len(longest_ids), longest_where, args.max_new_tokens, spec.max_position_embeddings,
                         spec.source)
    SafetensorsReader(args.model).check_files()
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

        # capped at the model's limit: the check above guarantees every actual prompt fits
        max_model_len = min(args.max_prompt_tokens + args.max_new_tokens, spec.max_position_embeddings)
        engine = VLLMEngine(args.model, dtype=dtype, max_model_len=max_model_len, seed=args.seed)
    out = []
    try:
        for lo in range(0, len(rows), args.batch_size):
            chunk = rows[lo:lo + args.batch_size]
            for (row, _, _), gens in zip(chunk, engine.generate([ids for _, ids, _ in chunk], params)):
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
