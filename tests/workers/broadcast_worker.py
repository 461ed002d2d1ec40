"""The trainer side of the SGLang fleet test (the emulated servers are
``rlmt_megatron/testing/sglang_emulator.py``, one process each).

``--role trainer`` (under torchrun, TP2 x PP2): load the tiny model and run the fleet as a run
does, through ``trainer/rollout_supervisor.RolloutSupervisor`` (disaggregated SGLang, one engine
per ``--url``, the nccl transport over gloo): its start pushes version 1 to every server, each
pipeline stage's owner broadcasting its own layers through a group of its own
(``weight_sync/stage_groups.py``); then one generation spread over the servers. Rank 0 saves the
rollouts, each engine's share and what each stage owner sent to ``--out``. Then the last server is
stopped (its state saved to ``--last-dump`` first) and version 2 pushed: the others get it, and
every rank marks that engine broken.
"""

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3, 4, 5], [9] * 12, [2, 7]]


def train(a):
    import torch
    import torch.distributed as dist

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
    from rlmt_megatron.config.rlmt import RolloutConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.rollout.types import SamplingParams
    from rlmt_megatron.testing import sglang_emulator
    from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig
    from rlmt_megatron.trainer.rollout_supervisor import RolloutSupervisor

    build = ModelBuildConfig(parallel=ParallelConfig(tp=2, pp=2))
    bootstrap.initialize(build.parallel)
    policy = SimpleNamespace(built=load_model(a.model, "policy", build))
    rollout = RolloutConfig(engine="sglang", placement="disaggregated", engines=len(a.url), sglang_url=a.url,
                            timeout_s=30)
    sync = WeightSyncConfig(transport="nccl", nccl_backend="gloo", master_address="127.0.0.1",
                            master_port=a.master_port, timeout_s=60, bucket_mb=1)
    supervisor = RolloutSupervisor(rollout, sync, policy, a.model, Path(a.out).parent, None, 0, follows_policy=True,
                                   engine_dtype="float32", max_model_len=64, seed=0)
    supervisor.start(version=1, push=True)
    # what this rank sent, per engine: the names of its stage's buckets, in its group
    senders = supervisor._stage_senders
    sent = {m: t.engine.group_name for m, t in senders.targets.items()}
    rollouts = supervisor.generate(PROMPTS, SamplingParams(max_new_tokens=4, n=2, seed=5))
    shares = {m: r.positions for m, r in supervisor._reports.items()}
    versions = {m: e.weight_version for m, e in supervisor.engines.items()}
    # The last server goes away (its requests so far saved first); the next sync reaches the
    # others, and every rank agrees that engine is broken.
    if dist.get_rank() == 0:
        sglang_emulator.dump_state(a.url[-1], a.last_dump)
        sglang_emulator._post(a.url[-1], "/_emulator/stop")
    dist.barrier()
    supervisor.push(2)
    after_loss = {"broken": sorted(supervisor._broken), "versions": {m: e.weight_version for m, e in supervisor.engines.items()}}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"rank": dist.get_rank(), "stage": senders.stage, "groups": sent,
                                      "after_loss": after_loss})
    supervisor.close()
    if dist.get_rank() == 0:
        torch.save({"prompts": PROMPTS,
                    "rollouts": [(r.prompt_index, r.response_ids, r.engine_logprobs, r.weight_version) for r in rollouts],
                    "shares": shares, "versions": versions, "senders": everyone}, a.out)
    bootstrap.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["trainer"], required=True)
    p.add_argument("--model")
    p.add_argument("--url", nargs="+", help="one SGLang server per fleet member")
    p.add_argument("--master-port", type=int, help="rendezvous port of engine 0's stage-0 group (engine i, stage s: + 2i + s)")
    p.add_argument("--out")
    p.add_argument("--last-dump", help="where the last server saves what it received before it is stopped")
    a = p.parse_args()
    start = time.time()
    train(a)
    print(f"trainer done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
