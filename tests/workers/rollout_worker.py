"""Under torchrun (a world of 4): for each TP x PP layout in turn, train one step, sync the weights
into ONE rollout engine on rank 0 (started once, so vLLM's start-up is paid once), sample from it,
and score the samples with the trainer. Rank 0 saves checksums and logprobs per layout.

Layouts smaller than the world run with data parallelism (1x1: DP 4; 2x1, 1x2: DP 2), so the
export is also exercised with several DP replicas (only DP rank 0's stages send)."""

import argparse

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_export import buckets_at, gather_hf_state_dict
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.rollout.hf_engine import HFEngine
from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine
from rlmt_megatron.rollout.types import SamplingParams
from rlmt_megatron.rollout.weight_sync.checksum import tensors_checksum
from rlmt_megatron.rollout.weight_sync.interfaces import InProcessTransport
from rlmt_megatron.config.optim import OptimConfig
from rlmt_megatron.runner.model_runner import ModelRunner
from rlmt_megatron.runner.forward_only import sequence_logprobs
from train_worker import global_batch, nll_token_mean

TEMPERATURE = 0.8


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="TPxPP layouts, in order")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    bootstrap.init_process_group()
    rank = dist.get_rank()
    rollout = None
    if rank == 0:  # vLLM lives in its own process: this one is part of the trainer's world
        rollout = HFEngine(a.model) if a.engine == "hf" else SubprocessEngine(
            "rlmt_megatron.rollout.vllm_engine.VLLMEngine", {"model_dir": a.model}, timeout_s=300)
    results = {}
    for version, layout in enumerate(a.layouts.split(","), start=1):
        tp, pp = map(int, layout.split("x"))
        results[layout] = run_layout(a, rollout, version, ModelBuildConfig(parallel=ParallelConfig(tp=tp, pp=pp)))
    if rank == 0:
        torch.save(results, a.out)
        rollout.close()
    bootstrap.shutdown()


def run_layout(a, rollout, version: int, build: ModelBuildConfig):
    bootstrap.initialize(build.parallel)
    rank = dist.get_rank()
    engine = ModelRunner(load_model(a.model, "policy", build), OptimConfig(lr=0.05, adam_eps=1.0))
    engine.train_step(global_batch(1024), nll_token_mean)

    buckets = buckets_at(engine.built, dst=0, bucket_bytes=256 * 1024)  # several buckets per stage
    if rank == 0:
        InProcessTransport(rollout).push(buckets, version=version)
    else:
        for _ in buckets:
            pass
    trainer_state = gather_hf_state_dict(engine.built)

    prompts = [[1018, 1020, 304, 1021, 198, 198, 71, 72, 1022, 1020, 303, 1021, 198, 198], [1018, 40, 41, 42, 43]]
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12, n=2, seed=3, stop_token_ids=[1022])
    gens = [g for per_prompt in rollout.generate(prompts, params) for g in per_prompt] if rank == 0 else None
    box = [gens]
    dist.broadcast_object_list(box, src=0)
    gens = box[0]
    seqs = [prompts[g.prompt_index] + g.token_ids for g in gens]
    trainer_lp = sequence_logprobs(engine, seqs, temperature=TEMPERATURE)
    if rank != 0:
        return None
    diffs = [
        (torch.tensor(g.logprobs) - lp[len(prompts[g.prompt_index]) - 1:]).abs().max().item()
        for g, lp in zip(gens, trainer_lp)
    ]
    return {
        "version": version,
        "engine_checksum": rollout.checksum(),
        "trainer_checksum": tensors_checksum(trainer_state.items()),
        "logprob_diffs": diffs, "versions": [g.weight_version for g in gens],
        "lengths": [len(g.token_ids) for g in gens], "finish": [g.finish_reason for g in gens],
        "engine_state": {k: v.detach().clone() for k, v in rollout.model.named_parameters()} if a.engine == "hf" else None,
        "trainer_state": trainer_state,
    }


if __name__ == "__main__":
    main()
