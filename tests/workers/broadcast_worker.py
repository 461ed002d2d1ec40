"""The trainer side of the SGLang broadcast-protocol test (the emulated server is
``rlmt_megatron/testing/sglang_emulator.py``).

``--role trainer`` (under torchrun, TP2 x PP2): load the tiny model, deliver every stage's buckets
to global rank 0 with ``buckets_at``, and push them from rank 0 with the real ``SGLangHTTPEngine``
and ``NCCLBroadcastTransport`` over gloo.
"""

import argparse
import time


def train(a):
    import torch.distributed as dist

    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
    from rlmt_megatron.distributed import bootstrap
    from rlmt_megatron.rollout.sglang_engine import SGLangHTTPEngine
    from rlmt_megatron.checkpoint.hf_export import buckets_at
    from rlmt_megatron.rollout.weight_sync.nccl_broadcast import NCCLBroadcastTransport

    build = ModelBuildConfig(parallel=ParallelConfig(tp=2, pp=2))
    bootstrap.initialize(build.parallel)
    built = load_model(a.model, "policy", build)
    buckets = buckets_at(built, dst=0, bucket_bytes=a.bucket_bytes)
    if dist.get_rank() == 0:
        engine = SGLangHTTPEngine(a.url, timeout=30, control_timeout=30, weight_sync_timeout=60)
        transport = NCCLBroadcastTransport(engine, "127.0.0.1", a.master_port, engine_world_size=1,
                                           backend="gloo", timeout_s=60)
        transport.connect()
        transport.push(buckets, version=1)
        assert engine.weight_version == 1
        transport.close()
    else:
        for _ in buckets:
            pass
    bootstrap.shutdown()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["trainer"], required=True)
    p.add_argument("--model")
    p.add_argument("--url")
    p.add_argument("--port", type=int)
    p.add_argument("--master-port", type=int)
    p.add_argument("--bucket-bytes", type=int, default=256 * 1024)
    p.add_argument("--out")
    p.add_argument("--timeout", type=float, default=240)
    a = p.parse_args()
    start = time.time()
    train(a)
    print(f"trainer done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
