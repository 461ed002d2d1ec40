"""Under torchrun (a world of 4): for each TP x PP layout in turn, train one step, sync the weights
into the rollout engines on rank 0 (started once, so vLLM's start-up is paid once), sample from
them, and score the samples with the trainer. Rank 0 saves checksums and logprobs per layout.

Layouts smaller than the world run with data parallelism (1x1: DP 4; 2x1, 1x2: DP 2), so the
export is also exercised with several DP replicas (only DP rank 0's stages send).

``--engines N`` (N > 1): a fleet of N engine processes. Each sync goes to all of them at once
(``SyncPipeline`` with checksums, each engine's checked), each generation is spread over them
(``generate_across``), and each sample's logprobs are compared with the trainer's. Then, with the
last layout's weights pushed again as one more version, engine N-1 kills its own process as that
version's generation starts (``faulty_engines.FaultyVLLMEngine``, die@V): its prompts must finish
on the others."""

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_export import buckets_at, buckets_for, gather_hf_state_dict
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.rollout.fleet import generate_across
from rlmt_megatron.rollout.hf_engine import HFEngine
from rlmt_megatron.rollout.subprocess_engine import SubprocessEngine
from rlmt_megatron.rollout.types import SamplingParams
from rlmt_megatron.rollout.weight_sync.checksum import tensors_checksum
from rlmt_megatron.rollout.weight_sync.interfaces import InProcessTransport
from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline, SyncTarget
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
    p.add_argument("--engines", type=int, default=1, help="vllm: engine processes (a fleet)")
    p.add_argument("--fault-dir", help="--engines > 1: the last engine's fault markers (default: --out's folder)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    bootstrap.init_process_group()
    rank = dist.get_rank()
    rollout = None
    layouts = a.layouts.split(",")
    if rank == 0:  # vLLM lives in its own process: this one is part of the trainer's world
        # vLLM-CPU reserves this share of the host's RAM per engine (mostly KV cache): a few GiB
        # each is plenty for the tiny model, and leaves room for two engines on a 24 GB machine
        vllm_args = {"model_dir": a.model, "gpu_memory_utilization": 0.1}
        if a.engines == 1:
            rollout = HFEngine(a.model) if a.engine == "hf" else SubprocessEngine(
                "rlmt_megatron.rollout.vllm_engine.VLLMEngine", vllm_args, timeout_s=300)
        else:  # the engines start at once (a vLLM start takes seconds)
            fault = {"RLMT_FAULT": f"die@{len(layouts) + 1}", "RLMT_FAULT_DIR": a.fault_dir or str(Path(a.out).parent)}
            specs = [("rlmt_megatron.rollout.vllm_engine.VLLMEngine", {})] + \
                [("faulty_engines.FaultyVLLMEngine", fault)] * (a.engines - 1)
            with ThreadPoolExecutor(len(specs)) as pool:
                rollout = list(pool.map(lambda spec: SubprocessEngine(spec[0], vllm_args, timeout_s=300, env=spec[1]),
                                        specs))
    results = {}
    for version, layout in enumerate(layouts, start=1):
        tp, pp = map(int, layout.split("x"))
        last = version == len(layouts) and a.engines > 1
        results[layout] = run_layout(a, rollout, version, ModelBuildConfig(parallel=ParallelConfig(tp=tp, pp=pp)),
                                     then_kill=last)
    if rank == 0:
        torch.save(results, a.out)
        for engine in rollout if isinstance(rollout, list) else [rollout]:
            engine.close()
    bootstrap.shutdown()


def _sync(rollout, buckets, version: int) -> None:
    if isinstance(rollout, list):  # the fleet: every engine at once, each engine's checksum checked
        SyncPipeline(verify=True).push(buckets, version, {i: SyncTarget(InProcessTransport(e), e)
                                                           for i, e in enumerate(rollout)})
    else:
        InProcessTransport(rollout).push(buckets, version=version)


def _generate(rollout, prompts, params):
    """Generations (and, for a fleet, which engine served each prompt and the per-engine reports)."""
    if not isinstance(rollout, list):
        return rollout.generate(prompts, params), None
    alive = {i: e for i, e in enumerate(rollout) if e.health()}
    gens, reports = generate_across(alive, prompts, params)
    return gens, reports


def run_layout(a, rollout, version: int, build: ModelBuildConfig, then_kill: bool = False):
    bootstrap.initialize(build.parallel)
    rank = dist.get_rank()
    engine = ModelRunner(load_model(a.model, "policy", build), OptimConfig(lr=0.05, adam_eps=1.0))
    engine.train_step(global_batch(1024), nll_token_mean)

    buckets = buckets_at(engine.built, dst=0, bucket_bytes=256 * 1024)  # several buckets per stage
    if rank == 0:
        _sync(rollout, buckets, version)
    else:
        for _ in buckets:
            pass
    trainer_state = gather_hf_state_dict(engine.built)
    fed = _fed_by_own_replica(engine.built)

    prompts = [[1018, 1020, 304, 1021, 198, 198, 71, 72, 1022, 1020, 303, 1021, 198, 198], [1018, 40, 41, 42, 43]]
    if a.engines > 1:  # enough prompts, of several lengths, for every engine to get some
        prompts = prompts + [[1018] + list(range(40, 40 + k)) for k in (2, 7, 3, 9)]
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12, n=2, seed=3, stop_token_ids=[1022])
    result = _generate_and_score(rollout, engine, prompts, params, rank)
    if rank == 0:  # what each engine holds, before one of them is killed
        result["engine_checksums"] = [e.checksum() for e in rollout] if isinstance(rollout, list) else None
    if then_kill:  # the same weights again as one more version; the last engine dies generating it
        again = buckets_at(engine.built, dst=0, bucket_bytes=256 * 1024)
        if rank == 0:
            _sync(rollout, again, version + 1)
        else:
            for _ in again:
                pass
        killed = _generate_and_score(rollout, engine, prompts, params, rank)
    if rank != 0:
        return None
    result.update({
        "version": version, "fed": fed,
        "engine_checksum": rollout.checksum() if not isinstance(rollout, list) else None,
        "trainer_checksum": tensors_checksum(trainer_state.items()),
        "engine_state": {k: v.detach().clone() for k, v in rollout.model.named_parameters()} if a.engine == "hf" else None,
        "trainer_state": trainer_state,
        "num_prompts": len(prompts), "prompt_lengths": [len(p) for p in prompts],
    })
    if then_kill:
        result["after_kill"] = killed
        result["alive_after_kill"] = [e.health() for e in rollout]
    return result


def _fed_by_own_replica(built):
    """``buckets_for`` with every stage owner (TP rank 0) fed by its own data-parallel replica, as
    engine hosts are: each receiver's checksum of what it got, by rank (on every rank), and the
    error for a receiver that owns no stage (TP rank 1), or None when the layout has none."""
    from megatron.core import parallel_state as ps

    me = (ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank() == 0)
    table = [None] * dist.get_world_size()
    dist.all_gather_object(table, me)
    feeds = {r: d for r, (d, owner) in enumerate(table) if owner}
    rank = dist.get_rank()
    got = buckets_for(built, feeds, bucket_bytes=256 * 1024)
    mine = tensors_checksum((n, t) for bucket in got for n, t in bucket)  # every rank walks the stream
    mine = mine if rank in feeds else None
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, mine)
    refused = None
    outsider = next((r for r, (_, owner) in enumerate(table) if not owner), None)
    if outsider is not None:
        try:
            for _ in buckets_for(built, {outsider: table[outsider][0]}):
                pass
        except ValueError as e:
            refused = str(e)
    return {"checksums": {r: c for r, c in enumerate(sums) if c is not None}, "refused": refused}


def _generate_and_score(rollout, engine, prompts, params, rank: int):
    """Rank 0 generates; every rank scores the samples with the trainer; rank 0 compares."""
    box = [_generate(rollout, prompts, params) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    per_prompt, reports = box[0]
    gens = [g for group in per_prompt for g in group]
    seqs = [prompts[g.prompt_index] + g.token_ids for g in gens]
    trainer_lp = sequence_logprobs(engine, seqs, temperature=TEMPERATURE)
    if rank != 0:
        return None
    diffs = [
        (torch.tensor(g.logprobs) - lp[len(prompts[g.prompt_index]) - 1:]).abs().max().item()
        for g, lp in zip(gens, trainer_lp)
    ]
    return {
        "logprob_diffs": diffs, "versions": [g.weight_version for g in gens],
        "lengths": [len(g.token_ids) for g in gens], "finish": [g.finish_reason for g in gens],
        "tokens": [g.token_ids for g in gens],
        "samples": [(g.prompt_index, g.sample_index) for g in gens],
        "served_by": None if reports is None else {i: r.positions for i, r in reports.items()},
        "queued": None if reports is None else {i: r.queued_work for i, r in reports.items()},
        "errors": None if reports is None else {i: r.error for i, r in reports.items()},
    }


if __name__ == "__main__":
    main()
