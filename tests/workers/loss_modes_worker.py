"""Under torchrun: one optimizer step per (loss, micro-batch size), each from fresh weights.

Losses: the PPO policy objective (clip-higher, dual clip, k3 KL in the loss, entropy bonus) under
each aggregation mode, the clipped critic value loss, SFT NLL and DPO on (chosen, rejected)
pairs. The global batch is split round robin over DP ranks (pairs stay whole for DPO). Rank 0
saves the updated weights and metrics keyed by "loss/mbs".
"""

import argparse

import torch

from rlmt_megatron.algorithms.policy_loss import PolicyLossConfig
from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner import losses
from rlmt_megatron.runner.batching import Sample
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.runner.model_runner import ModelRunner

POLICY = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip_c=3.0, kl_in_loss=True, kl_coef=0.1,
                          kl_estimator="k3", entropy_coef=0.01)
LOSSES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "value", "sft", "dpo"]


def global_batch() -> list[Sample]:
    """8 samples (4 DPO pairs when taken two by two) with every field any loss needs."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (11, 16, 6, 21, 13, 9, 18, 7):
        ids = torch.randint(0, 1024, (n,), generator=g)
        mask = torch.zeros(n - 1)
        mask[n // 3:] = 1.0
        old = -6.9 + 0.3 * torch.randn(n - 1, generator=g)  # near the tiny model's ~log(1/1024)
        out.append(Sample(ids, {
            "loss_mask": mask,
            "old_logp": old,
            "ref_logp": old + 0.1 * torch.randn(n - 1, generator=g),
            "advantages": torch.full((n - 1,), float(torch.randn(1, generator=g))),
            "returns": torch.randn(n - 1, generator=g),
            "old_values": 0.1 * torch.randn(n - 1, generator=g),
        }))
    return out


def loss_setup(name):
    if name in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        return "policy", losses.policy_loss_fn(POLICY, 1024, aggregation=name, temperature=0.7, norm_constant=20.0), 1
    if name == "value":
        return "critic", losses.value_loss_fn(clip_eps=0.05), 1
    if name == "sft":
        return "policy", losses.sft_loss_fn(1024), 1
    return "policy", losses.dpo_loss_fn(1024, beta=0.5, label_smoothing=0.1), 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--mbs", default="8,4,1")
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    build = ModelBuildConfig(parallel=ParallelConfig(tp=a.tp, pp=a.pp))
    dp = bootstrap.initialize(build.parallel)
    from megatron.core import parallel_state

    rank = parallel_state.get_data_parallel_rank()
    results = {}
    for name in a.losses.split(","):
        role, loss_fn, unit = loss_setup(name)
        batch = global_batch()
        units = [batch[k:k + unit] for k in range(0, len(batch), unit)]
        mine = [s for u in units[rank::dp] for s in u]
        for mbs in map(int, a.mbs.split(",")):
            engine = ModelRunner(load_model(a.model, role, build),
                                 OptimConfig(lr=0.05, adam_eps=1.0, weight_decay=0.0, clip_grad=0.0),
                                 BatchingConfig(max_samples_per_microbatch=max(mbs, unit),
                                                train_tokens_per_microbatch=1 << 20))
            metrics = engine.train_step(mine, loss_fn, unit_size=unit)
            state = gather_hf_state_dict(engine.built)
            if torch.distributed.get_rank() == 0:
                results[f"{name}/{mbs}"] = {"state": state, "metrics": metrics}
    if torch.distributed.get_rank() == 0:
        torch.save(results, a.out)
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
