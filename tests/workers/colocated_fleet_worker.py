"""The trainer side of the colocated SGLang fleet test: under torchrun, 2 ranks (TP 2, one node),
two emulated servers of TP 1 (``--url``, spawned by the test, so they hold its multiprocessing
authkey, given here as ``RLMT_SENDER_AUTHKEY`` so that each rank's shared-memory handles open
there). The rollout supervisor syncs both with the cuda_ipc transport, each server fed from the
trainer rank on its own GPU (``weight_sync/same_gpu_ipc.py``; CPU tensors stand in for GPU memory:
the same serializer sends shared-memory descriptors). Every rank saves to ``--out``.<rank> how many
of its own handles were never fetched, and the engines' weight versions.
"""

import argparse
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

multiprocessing.current_process().authkey = bytes.fromhex(os.environ["RLMT_SENDER_AUTHKEY"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--url", nargs="+", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch
    import torch.distributed as dist
    from multiprocessing import resource_sharer

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
    from rlmt_megatron.config.rlmt import RolloutConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig
    from rlmt_megatron.trainer.rollout_supervisor import RolloutSupervisor

    build = ModelBuildConfig(parallel=ParallelConfig(tp=2))
    bootstrap.initialize(build.parallel)
    policy = SimpleNamespace(built=load_model(a.model, "policy", build))
    rollout = RolloutConfig(engine="sglang", placement="colocated", engines=len(a.url), sglang_url=a.url, timeout_s=30)
    supervisor = RolloutSupervisor(rollout, WeightSyncConfig(bucket_mb=1), policy, a.model, Path(a.out).parent, None, 0,
                                   follows_policy=True, engine_dtype="float32", max_model_len=64, seed=0)
    supervisor.start(version=1, push=True)
    unfetched = len(getattr(resource_sharer._resource_sharer, "_cache", {}))  # handles no server opened
    torch.save({"rank": dist.get_rank(), "unfetched": unfetched, "gpus": supervisor._node_feeds.gpus,
                "versions": {m: e.weight_version for m, e in supervisor.engines.items()},
                "broken": dict(supervisor._broken)}, f"{a.out}.{dist.get_rank()}")
    supervisor.close()
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
