"""Run under torchrun: Megatron outputs of the tiny models at one TP x PP (x VPP) layout.

Writes (rank 0) a JSON file with, per model, the per-token logprobs (policies), RM scores and
critic values for the fixed sequences in ``sequences.json``, and optionally exports every model
back to HF folders from this layout. The test compares all of it with transformers.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.config.optim import BatchingConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner.forward_only import sequence_logprobs, sequence_scores, token_values
from rlmt_megatron.runner.model_runner import ModelRunner

BUDGET_48 = BatchingConfig(logprob_tokens_per_microbatch=48)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--sequences", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--export-dir", default=None)
    a = p.parse_args()
    models = Path(a.models)
    seqs = json.loads(Path(a.sequences).read_text())
    build = ModelBuildConfig(parallel=ParallelConfig(tp=a.tp, pp=a.pp, vpp=a.vpp, sequence_parallel=a.sequence_parallel))
    bootstrap.initialize(build.parallel)
    # Small token budget (48): several micro-batches, so the pipeline schedule really interleaves.
    batches = seqs
    result = {}
    for name in ("llama-policy", "qwen2-policy"):
        built = load_model(models / name, "policy", build)
        result[name] = [lp.tolist() for lp in sequence_logprobs(ModelRunner(built, None, BUDGET_48), batches)]
        if a.export_dir:
            save_hf_folder(built, Path(a.export_dir) / name, tokenizer_src=models / name)
    rm = load_model(models / "llama-rm", "reward", build)
    result["llama-rm"] = [float(s) for s in sequence_scores(ModelRunner(rm, None, BUDGET_48), batches)]
    if a.export_dir:
        save_hf_folder(rm, Path(a.export_dir) / "llama-rm", tokenizer_src=models / "llama-rm")
    critic = load_model(models / "llama-rm", "critic", build)
    result["critic-from-rm"] = [v.tolist() for v in token_values(ModelRunner(critic, None, BUDGET_48), batches)]
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(result))
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
