"""Under torchrun with 2 ranks: chunked-head logprobs of the tiny policies at TP=2, TP=2 with
sequence parallelism, and PP=2; rank 0 writes {layout: {model: {chunk: [per-sequence lists]}}}."""

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.config.optim import BatchingConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner.chunked_logprobs import sequence_logprobs_chunked
from rlmt_megatron.runner.model_runner import ModelRunner

LAYOUTS = {"tp2": ParallelConfig(tp=2), "tp2sp": ParallelConfig(tp=2, sequence_parallel=True), "pp2": ParallelConfig(pp=2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--sequences", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    seqs = json.loads(Path(a.sequences).read_text())
    result = {}
    for name, parallel in LAYOUTS.items():
        build = ModelBuildConfig(parallel=parallel)
        bootstrap.initialize(build.parallel)
        result[name] = {}
        for model in ("llama-policy", "qwen2-policy"):
            built = load_model(Path(a.models) / model, "policy", build)
            # 48-token budget: several micro-batches; chunk 5 splits them unevenly.
            runner = ModelRunner(built, None, BatchingConfig(logprob_tokens_per_microbatch=48))
            result[name][model] = {chunk: [lp.tolist() for lp in sequence_logprobs_chunked(runner, seqs, chunk_tokens=chunk)]
                                   for chunk in (5, 1024)}
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
