"""Under torchrun: train the tiny policy straight, or in two halves joined by a checkpoint.

--mode first  : (a) 4 steps straight, drawing RNG numbers after step 2; then (b) from a fresh
                engine with the same seeds, 2 steps and save_train_state at step 2.
--mode resume : a NEW job (other seeds) builds the engine from the HF folder, loads the latest
                checkpoint, draws the RNG numbers, trains 2 steps.
Rank 0 saves the exported HF weights, per-step metrics and every rank's draws to --out.
Each rank seeds its RNGs differently, so restoring one rank's state onto another shows up.
"""

import argparse
import random

import numpy as np
import torch
import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.checkpoint.train_state import latest_checkpoint, load_train_state, save_train_state
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.runner.model_runner import ModelRunner
from train_worker import global_batch, nll_token_mean


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draws() -> list:
    """A few numbers from every generator the checkpoint restores, gathered from all ranks."""
    mine = [random.random(), *np.random.rand(2).tolist(), *torch.rand(2).tolist()]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--mode", choices=["first", "resume"], required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--no-distributed-optimizer", action="store_true")
    a = p.parse_args()
    build = ModelBuildConfig(parallel=ParallelConfig(tp=a.tp, pp=a.pp))
    dp = bootstrap.initialize(build.parallel)
    from megatron.core import parallel_state

    # Warmup then cosine decay: the lr changes every step, so a scheduler restored one step off shows.
    optim = OptimConfig(lr=0.02, min_lr=0.001, lr_schedule="cosine", warmup_steps=2, total_steps=6,
                        weight_decay=0.01, use_distributed_optimizer=not a.no_distributed_optimizer)
    batching = BatchingConfig(max_samples_per_microbatch=2, train_tokens_per_microbatch=1 << 20)
    mine = global_batch(1024)[parallel_state.get_data_parallel_rank()::dp]
    rank = dist.get_rank()

    def engine():
        return ModelRunner(load_model(a.model, "policy", build), optim, batching)

    out = {}
    if a.mode == "first":
        seed_all(100 + rank)
        straight = engine()
        hist = [straight.train_step(mine, nll_token_mean) for _ in range(2)]
        out["straight_draws"] = draws()
        hist += [straight.train_step(mine, nll_token_mean) for _ in range(2)]
        out["straight_history"] = hist
        out["straight_state"] = gather_hf_state_dict(straight.built)

        seed_all(100 + rank)
        first = engine()
        out["first_history"] = [first.train_step(mine, nll_token_mean) for _ in range(2)]
        out["first_state"] = gather_hf_state_dict(first.built)
        save_train_state(a.ckpt, 2, {"policy": first}, {"step": 2, "weight_version": 2, "sampler": {"pos": 5}})
    else:
        seed_all(900 + rank)
        resumed = engine()
        out["extra"] = load_train_state(latest_checkpoint(a.ckpt), {"policy": resumed})
        out["step_count_after_load"] = resumed.step_count
        out["resumed_draws"] = draws()
        out["resumed_history"] = [resumed.train_step(mine, nll_token_mean) for _ in range(2)]
        out["resumed_state"] = gather_hf_state_dict(resumed.built)
        out["step_count"] = resumed.step_count
    if rank == 0:
        torch.save(out, a.out)
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
