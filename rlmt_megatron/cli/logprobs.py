"""rlmt-logprobs: per-token log-probabilities of given responses under the Megatron model.

Input rows (jsonl) hold the context as ``messages`` (rendered with the model's chat template and
a generation prompt) or ``prompt_ids``, and the response as ``response`` text (tokenised without
special tokens being added) or ``response_ids``. The model folder's tokenizer is loaded only
when some row has text (``messages`` or ``response``): a folder without tokenizer files serves
rows given as ids. Each output row is the input row plus
``prompt_ids``, ``prompt_len``, ``response_ids``, ``logprobs`` (one per response token) and ``sum_logprob``.
Comparing these with the rollout engine's logprobs is how train/rollout mismatch is debugged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlmt_megatron.cli.common import add_layout_args, build_config_from_args, cli_session, is_rank0, run_main
from rlmt_megatron.cli.rows import gather_to_rank0, my_share
from rlmt_megatron.data.jsonl import field, messages_field, read_jsonl, token_ids_field, write_jsonl
from rlmt_megatron.errors import InputFileError


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    from rlmt_megatron.errors import CheckpointError

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from None


class TokenizerOnDemand:
    """The model folder's tokenizer, loaded by the first row that has text: rows given entirely
    as ``prompt_ids``/``response_ids`` never load it, so a folder without tokenizer files serves
    them. A text row and no tokenizer: ``load_tokenizer``'s CheckpointError, naming the folder."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = model_dir
        self._tokenizer = None

    def get(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def apply_chat_template(self, *args, **kwargs):
        return self.get().apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)


def encode_rows(path: str, tokenizer, vocab_size: int) -> list[dict]:
    """Validate rows and attach ``prompt_ids`` / ``response_ids`` (and their concatenation)."""
    rows = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt_ids" in row:
            prompt = token_ids_field(row, "prompt_ids", vocab_size, where)
        elif "messages" in row:
            prompt = tokenizer.apply_chat_template(messages_field(row, where), add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            raise InputFileError(f"{where}: needs 'messages' or 'prompt_ids'")
        if "response_ids" in row:
            response = token_ids_field(row, "response_ids", vocab_size, where)
        else:
            response = tokenizer(field(row, "response", str, where), add_special_tokens=False)["input_ids"]
        if not prompt or not response:
            raise InputFileError(f"{where}: prompt and response must each have at least one token")
        rows.append({**row, "prompt_ids": prompt, "prompt_len": len(prompt), "response_ids": response, "_ids": prompt + response})
    if not rows:
        raise InputFileError(f"{path}: no rows")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-logprobs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder or rlmt Megatron checkpoint (policy)")
    p.add_argument("--input", required=True, help="jsonl rows with messages|prompt_ids and response|response_ids")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--temperature", type=float, default=1.0, help="divide logits by this first (as the sampler did)")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192, help="padded tokens per micro-batch")
    add_layout_args(p)
    args = p.parse_args(argv)
    build = build_config_from_args(args)

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.optim import BatchingConfig
    from rlmt_megatron.runner.forward_only import sequence_logprobs
    from rlmt_megatron.runner.model_runner import ModelRunner

    tokenizer = TokenizerOnDemand(args.model)
    with cli_session(build.parallel):
        runner = ModelRunner(load_model(args.model, "policy", build), None,
                             BatchingConfig(logprob_tokens_per_microbatch=args.max_tokens_per_batch))
        rows = encode_rows(args.input, tokenizer, runner.built.spec.vocab_size)
        mine = my_share(rows)
        lps = sequence_logprobs(runner, [r["_ids"] for _, r in mine], args.temperature)
        results = []
        for (i, row), lp in zip(mine, lps):
            resp = lp[row["prompt_len"] - 1:].tolist()
            out = {k: v for k, v in row.items() if k != "_ids"}
            results.append((i, {**out, "logprobs": resp, "sum_logprob": float(sum(resp))}))
        ordered = gather_to_rank0(results)
        if is_rank0():
            write_jsonl(args.out, ordered)
            print(f"wrote {len(ordered)} rows to {args.out}")


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
