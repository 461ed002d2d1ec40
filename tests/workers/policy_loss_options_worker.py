"""Under torchrun (2 ranks, TP=2): one GRPO update (``grpo_update``, as the loop calls it) per
policy-loss / rollout-correction option, each from the initial weights, on the same rollouts.

The rollouts are made here (no engine, no reward model): 2 prompts x 4 random responses with
fixed rewards; their "engine" logprobs are the trainer's plus Gaussian noise, i.e. an engine that
disagrees with the trainer, so the corrections have something to correct. Two mini-batches per
update (``updates_per_rollout=2``): the second one is off-policy, so the ratio-based losses
(GSPO, CISPO) differ from PPO's there. Rank 0 saves, per option, the update's metrics and its
final weights' difference from the baseline's and from the initial ones, plus the inputs (old and
engine logprobs) for the test to recompute the correction metrics by hand.
"""

import argparse
from types import SimpleNamespace

import torch

from rlmt_megatron.checkpoint.hf_export import gather_hf_state_dict
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.rlmt import load_rlmt_config
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner.forward_only import sequence_logprobs
from rlmt_megatron.runner.model_runner import ModelRunner
from rlmt_megatron.trainer.experience import Rollout, sequence_of
from rlmt_megatron.trainer.updates import grpo_update

BASE = ["models.policy=a", "models.reward=b", "data.prompts=[p]", "rollout.samples_per_prompt=4",
        "rollout.temperature=1.0", "rollout.max_new_tokens=8", "algorithm.updates_per_rollout=2",
        "algorithm.kl_coef=0.01", "optim.lr=0.001", "build.parallel.tp=2"]
OPTIONS = {
    "baseline": [],
    "gspo": ["algorithm.policy_loss=gspo", "algorithm.clip_low=0.0003", "algorithm.clip_high=0.0004",
             "algorithm.aggregation=seq_mean_token_mean"],
    "gspo_token": ["algorithm.policy_loss=gspo_token", "algorithm.clip_low=0.0003", "algorithm.clip_high=0.0004"],
    "cispo": ["algorithm.policy_loss=cispo", "algorithm.clip_low=0.001", "algorithm.clip_high=0.001"],
    "tis": ["algorithm.rollout_correction.mode=tis", "algorithm.rollout_correction.tis_cap=1.1"],
    "mis": ["algorithm.rollout_correction.mode=mis", "algorithm.rollout_correction.high=1.1"],
    "icepop": ["algorithm.rollout_correction.mode=icepop", "algorithm.rollout_correction.low=0.8",
               "algorithm.rollout_correction.high=1.25"],
}
NOISE = 0.2


def make_rollouts(vocab: int) -> list[Rollout]:
    """2 prompts (5 and 7 tokens) x 4 responses of 2..8 tokens, rewards spread within each group."""
    g = torch.Generator().manual_seed(11)
    out = []
    for group, p, lengths in [(0, 5, (3, 8, 6, 4)), (1, 7, (7, 2, 5, 8))]:
        prompt = torch.randint(0, vocab, (p,), generator=g).tolist()
        for i, r in enumerate(lengths):
            out.append(Rollout(prompt_index=group, prompt_ids=prompt, response_ids=torch.randint(0, vocab, (r,), generator=g).tolist(),
                               engine_logprobs=[], finish_reason="stop", weight_version=0, reward=i - 1.5 + 0.1 * group))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--options", default=",".join(OPTIONS))
    a = p.parse_args()
    base = load_rlmt_config(None, BASE)
    bootstrap.initialize(base.build.parallel, seed=1234)
    reference = ModelRunner(load_model(a.model, "policy", base.build), None, base.batching)
    vocab = reference.built.spec.vocab_size
    rollouts = make_rollouts(vocab)
    old = sequence_logprobs(reference, [sequence_of(r) for r in rollouts], 1.0)  # = the initial policy's
    g = torch.Generator().manual_seed(12)
    for r, lp in zip(rollouts, old):
        exact = lp[len(r.prompt_ids) - 1:].double()
        r.engine_logprobs = (exact + NOISE * torch.randn(exact.shape, generator=g, dtype=torch.float64)).tolist()
    initial = gather_hf_state_dict(reference.built)
    results, states = {"old_logp": old, "rollouts": [(len(r.prompt_ids), list(r.engine_logprobs)) for r in rollouts]}, {}
    for name in a.options.split(","):
        cfg = load_rlmt_config(None, BASE + OPTIONS[name])  # validated as a recipe would be
        policy = ModelRunner(load_model(a.model, "policy", cfg.build), cfg.optim, cfg.batching)
        roles = SimpleNamespace(policy=policy, reference=reference)
        metrics = grpo_update(cfg.algorithm, roles, [Rollout(**vars(r)) for r in rollouts], temperature=1.0,
                              max_new_tokens=cfg.rollout.max_new_tokens)
        states[name] = gather_hf_state_dict(policy.built)
        results[name] = {"metrics": metrics}
        del policy
    if torch.distributed.get_rank() == 0:
        for name in states:
            results[name]["moved"] = max((states[name][k].double() - initial[k].double()).abs().max().item()
                                         for k in initial)
            if "baseline" in states:
                results[name]["vs_baseline"] = max((states[name][k].double() - states["baseline"][k].double())
                                                   .abs().max().item() for k in initial)
        torch.save(results, a.out)
    bootstrap.shutdown()


if __name__ == "__main__":
    main()
