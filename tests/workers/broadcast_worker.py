"""The trainer side of the SGLang fleet test (the emulated servers are
``rlmt_megatron/testing/sglang_emulator.py``, one process each).

``--role trainer`` (under torchrun, TP2 x PP2): load the tiny model, deliver every stage's buckets
to global rank 0 with ``buckets_at``, and from rank 0 push them to every server at once, built as
a run builds its fleet: engine i from ``rollout/factory.make_rollout_engine(member=i)`` (an
``SGLangHTTPEngine`` for ``rollout.sglang_url[i]``), its transport from
``weight_sync/select.make_transport`` (``NCCLBroadcastTransport`` over gloo), all fed by one
``SyncPipeline.push``. Then one generation spread over the servers with
``rollout.fleet.generate_across``; rank 0 saves the generations and each member's share to ``--out``.
"""

import argparse
import time

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3, 4, 5], [9] * 12, [2, 7]]


def train(a):
    import torch
    import torch.distributed as dist

    from rlmt_megatron.checkpoint.hf_export import buckets_at
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
    from rlmt_megatron.config.rlmt import RolloutConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.rollout.factory import make_rollout_engine
    from rlmt_megatron.rollout.fleet import generate_across
    from rlmt_megatron.rollout.types import SamplingParams
    from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline, SyncTarget
    from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig, make_transport

    build = ModelBuildConfig(parallel=ParallelConfig(tp=2, pp=2))
    bootstrap.initialize(build.parallel)
    built = load_model(a.model, "policy", build)
    buckets = buckets_at(built, dst=0, bucket_bytes=a.bucket_bytes)
    if dist.get_rank() == 0:
        rollout = RolloutConfig(engine="sglang", placement="disaggregated", engines=len(a.url), sglang_url=a.url,
                                timeout_s=30)
        sync = WeightSyncConfig(transport="nccl", nccl_backend="gloo", master_address="127.0.0.1",
                                master_port=a.master_port, timeout_s=60)
        engines, targets = {}, {}
        for i in range(len(a.url)):
            engine = make_rollout_engine(rollout, a.model, dtype="float32", max_model_len=64, seed=0, member=i)
            transport = make_transport(sync, engine, "disaggregated", member=i)
            transport.connect()
            engines[i], targets[i] = engine, SyncTarget(transport, engine)
        SyncPipeline().push(buckets, version=1, targets=targets)
        assert all(e.weight_version == 1 for e in engines.values())
        generations, reports = generate_across(engines, PROMPTS, SamplingParams(max_new_tokens=4, n=2, seed=5))
        torch.save({"prompts": PROMPTS,
                    "generations": [[(g.prompt_index, g.sample_index, g.token_ids, g.logprobs, g.weight_version)
                                     for g in per_prompt] for per_prompt in generations],
                    "shares": {i: r.positions for i, r in reports.items()},
                    "group_names": [e.group_name for e in engines.values()]}, a.out)
        for target in targets.values():
            target.transport.close()
            target.engine.close()
    else:
        for _ in buckets:
            pass
    bootstrap.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["trainer"], required=True)
    p.add_argument("--model")
    p.add_argument("--url", nargs="+", help="one SGLang server per fleet member")
    p.add_argument("--master-port", type=int, help="rendezvous port of engine 0's group (engine i: + i)")
    p.add_argument("--bucket-bytes", type=int, default=256 * 1024)
    p.add_argument("--out")
    a = p.parse_args()
    start = time.time()
    train(a)
    print(f"trainer done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
