"""rlmt-score: reward-model scores of (messages, response) rows.

Each row is rendered with the reward model's own chat template: system turns dropped, the
response appended as the assistant turn, exactly one BOS (see ``reward/rm_template.py``). The
score is the scalar head at the last token, as ``LlamaForSequenceClassification`` computes it.
Output rows are the input rows plus ``score``.
"""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import add_layout_args, build_config_from_args, cli_session, is_rank0, run_main
from rlmt_megatron.cli.logprobs import load_tokenizer
from rlmt_megatron.cli.rows import gather_to_rank0, my_share
from rlmt_megatron.data.jsonl import field, messages_field, read_jsonl, write_jsonl
from rlmt_megatron.errors import InputFileError


def encode_rows(path: str, tokenizer) -> list[tuple[dict, list[int]]]:
    from rlmt_megatron.reward.rm_template import rm_input_ids

    rows = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        ids = rm_input_ids(tokenizer, messages_field(row, where), field(row, "response", str, where))
        rows.append((row, ids))
    if not rows:
        raise InputFileError(f"{path}: no rows")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-score", description=__doc__.split("\n\n")[0])
    p.add_argument("--rm", required=True, help="reward model: HF *ForSequenceClassification folder or rlmt checkpoint")
    p.add_argument("--input", required=True, help="jsonl rows with 'messages' and 'response'")
    p.add_argument("--out", required=True, help="output jsonl")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192, help="padded tokens per micro-batch")
    add_layout_args(p)
    args = p.parse_args(argv)
    build = build_config_from_args(args)

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.optim import BatchingConfig
    from rlmt_megatron.runner.forward_only import sequence_scores
    from rlmt_megatron.runner.model_runner import ModelRunner

    tokenizer = load_tokenizer(args.rm)
    rows = encode_rows(args.input, tokenizer)
    with cli_session(build.parallel):
        runner = ModelRunner(load_model(args.rm, "reward", build), None,
                             BatchingConfig(logprob_tokens_per_microbatch=args.max_tokens_per_batch))
        mine = my_share(rows)
        scores = sequence_scores(runner, [ids for _, (_, ids) in mine])
        ordered = gather_to_rank0([(i, {**row, "score": float(s)}) for (i, (row, _)), s in zip(mine, scores)])
        if is_rank0():
            write_jsonl(args.out, ordered)
            print(f"wrote {len(ordered)} rows to {args.out}")


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
