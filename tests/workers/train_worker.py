"""Under torchrun: a few training steps of the tiny Llama policy at one layout / split.

A fixed global batch of 8 variable-length samples with loss masks is split over DP ranks
(round robin) and into micro-batches (at most --mbs samples each); the loss is the masked NLL
averaged over the loss tokens of the whole global batch (token mean). After --steps steps the
updated weights are gathered as an HF state dict and saved by rank 0.
"""

import argparse

import torch

from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner.batching import Sample
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.runner.model_runner import ModelRunner
from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs


def global_batch(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(11)
    samples = []
    for n in (9, 14, 5, 21, 12, 7, 17, 10):
        ids = torch.randint(0, vocab, (n,), generator=g)
        mask = torch.zeros(n - 1)
        mask[n // 3:] = 1.0  # "response" tokens only
        samples.append(Sample(ids, {"loss_mask": mask}))
    return samples


def nll_token_mean(output, mb, counts):
    lp = vocab_parallel_logprobs(output[:, :-1], mb.targets, 1024)
    mask = mb.fields["loss_mask"]
    loss = -(lp * mask).sum() / counts.num_tokens
    return loss, {"nll_sum": -(lp.detach() * mask).sum()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--mbs", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=0.05)
    # eps of 1 makes Adam's update a smooth function of the gradient (~ lr * g / (|g| + 1)), so
    # float32 reduction-order differences stay tiny instead of flipping lr * sign(g) near g = 0.
    p.add_argument("--adam-eps", type=float, default=1.0)
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--clip", type=float, default=0.0)
    # several runs in one job (each from the same initial weights): NAME:MBS:CLIP,...; the output
    # is then {NAME: result}. One job instead of one per variant: the start-up is most of the cost.
    p.add_argument("--variants", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    build = ModelBuildConfig(parallel=ParallelConfig(tp=a.tp, pp=a.pp, vpp=a.vpp))
    dp = bootstrap.initialize(build.parallel)
    from megatron.core import parallel_state

    def train(mbs: int, clip: float) -> dict:
        engine = ModelRunner(
            load_model(a.model, "policy", build),
            OptimConfig(optimizer=a.optimizer, lr=a.lr, weight_decay=0.0, clip_grad=clip, adam_eps=a.adam_eps,
                        use_distributed_optimizer=not a.no_distributed_optimizer),
            BatchingConfig(max_samples_per_microbatch=mbs, train_tokens_per_microbatch=1 << 20),
        )
        rank = parallel_state.get_data_parallel_rank()
        mine = global_batch(1024)[rank::dp]
        history = [engine.train_step(mine, nll_token_mean) for _ in range(a.steps)]
        return {"state": gather_hf_state_dict(engine.built), "history": history}

    if a.variants is None:
        result = train(a.mbs, a.clip)
    else:
        result = {}
        for variant in a.variants.split(","):
            name, mbs, clip = variant.split(":")
            result[name] = train(int(mbs), float(clip))
    if torch.distributed.get_rank() == 0:
        torch.save(result, a.out)
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
