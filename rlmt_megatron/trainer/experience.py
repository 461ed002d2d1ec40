"""From rollouts to training samples: token layout, reward handling, advantages, DPO pairs.

Pure functions over plain lists and tensors (no Megatron, no distributed), so the loop stays
short and every rule here is tested on its own.

Layout: a rollout is ``prompt_ids + response_ids``. Action ``t`` predicts token ``t + 1`` (see
``runner/batching.py``), so the response tokens are actions ``P - 1 .. P + R - 2`` for a prompt
of ``P`` and a response of ``R`` tokens; only those carry loss.

Non-finite rewards (a reward model that overflows, a NaN from a broken input) are never passed
on. The rule, chosen so no number is invented: the sample is **dropped** from the step — it gets
no advantage and no loss token, and its group's mean/std are computed over the remaining
members. The count is logged as ``reward/nonfinite_count``. If no sample has a finite reward the
step stops with an error. (Replacing NaN with a fixed low reward would teach the policy to avoid
whatever triggered the RM bug, which is not the user's objective.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from rlmt_megatron.algorithms import get_advantage_estimator
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.runner.batching import Sample


class ExperienceError(RLMTError, ValueError):
    """The rollouts of a step cannot be trained on (all empty, all rewards non-finite, ...)."""


@dataclass
class Rollout:
    """One sampled response to one prompt, with everything the step computes about it."""

    prompt_index: int  # position of the prompt in this step's batch (= GRPO group id)
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    finish_reason: str
    weight_version: int  # the (oldest) weights that sampled its tokens
    reward: float = math.nan
    extras: dict = field(default_factory=dict)  # parsed thinking/answer, format flags, ...
    # per response token, the weights that sampled it (partial rollouts continue an answer under
    # newer weights); None: every token is from ``weight_version``
    token_versions: Optional[list[int]] = None

    def versions(self) -> list[int]:
        """The weight version of each response token."""
        return self.token_versions if self.token_versions is not None else [self.weight_version] * len(self.response_ids)

    @property
    def trainable(self) -> bool:
        """Has at least one response token and a finite reward."""
        return len(self.response_ids) > 0 and math.isfinite(self.reward)


def response_mask(prompt_len: int, response_len: int) -> torch.Tensor:
    """Per-action loss mask [P + R - 1]: 1 on the actions that produce response tokens."""
    mask = torch.zeros(prompt_len + response_len - 1, dtype=torch.float32)
    mask[prompt_len - 1:] = 1.0
    return mask


def sequence_of(r: Rollout) -> list[int]:
    return list(r.prompt_ids) + list(r.response_ids)


def finite_reward_count(rollouts: Sequence[Rollout]) -> int:
    return sum(1 for r in rollouts if math.isfinite(r.reward))


def check_trainable(rollouts: Sequence[Rollout]) -> None:
    """Refuse a step with nothing to learn from, saying why."""
    if not rollouts:
        raise ExperienceError("the step has no rollouts")
    if all(len(r.response_ids) == 0 for r in rollouts):
        raise ExperienceError(f"the rollout engine returned {len(rollouts)} empty responses: nothing to train on "
                              "(check the stop tokens and max_new_tokens)")
    if finite_reward_count(rollouts) == 0:
        raise ExperienceError(f"all {len(rollouts)} rewards are NaN/inf: the reward model output is unusable")
    if not any(r.trainable for r in rollouts):
        raise ExperienceError("no rollout has both a response token and a finite reward")


OUTCOME_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def group_advantages(rollouts: Sequence[Rollout], estimator: str = "grpo",
                     scores: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Outcome advantages (one per rollout) from scores grouped by prompt; 0 for dropped rollouts.

    ``estimator``: ``grpo`` ((r - mean) / std per group), ``dr_grpo`` (r - mean) or ``rloo``
    (leave-one-out mean). ``scores``: what is compared, one per rollout; default each rollout's
    reward (with the KL penalty in the reward, the reward minus the sequence's summed penalty).
    Which rollouts are dropped is decided by ``trainable`` either way. A group left with fewer
    than two trainable members gets advantage 0: there is no baseline to compare with.
    """
    if estimator not in OUTCOME_ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} is not an outcome estimator; choose one of {OUTCOME_ESTIMATORS}")
    if scores is not None and len(scores) != len(rollouts):
        raise ValueError(f"{len(scores)} scores for {len(rollouts)} rollouts")
    sizes: dict[int, int] = {}
    for r in rollouts:
        if r.trainable:
            sizes[r.prompt_index] = sizes.get(r.prompt_index, 0) + 1
    keep = [i for i, r in enumerate(rollouts) if r.trainable and sizes[r.prompt_index] >= 2]
    out = torch.zeros(len(rollouts), dtype=torch.float64)
    if keep:
        values = [rollouts[i].reward if scores is None else scores[i] for i in keep]
        groups = [rollouts[i].prompt_index for i in keep]
        out[keep] = get_advantage_estimator(estimator)(torch.tensor(values, dtype=torch.float64), groups)
    return out


def policy_sample(r: Rollout, advantage: float, old_logp: torch.Tensor, ref_logp: Optional[torch.Tensor]) -> Sample:
    """A GRPO/RLOO sample: the outcome advantage on every response action.

    ``old_logp``/``ref_logp`` are per-action over the whole sequence ([P + R - 1]), as
    ``sequence_logprobs`` returns them.
    """
    mask = response_mask(len(r.prompt_ids), len(r.response_ids)) if r.trainable else torch.zeros(len(r.prompt_ids) + len(r.response_ids) - 1)
    fields = {
        "loss_mask": mask,
        "old_logp": old_logp.float(),
        "advantages": mask * float(advantage),
    }
    if ref_logp is not None:
        fields["ref_logp"] = ref_logp.float()
    return Sample(torch.tensor(sequence_of(r), dtype=torch.long), fields)


def dpo_pairs(rollouts: Sequence[Rollout]) -> list[tuple[Rollout, Rollout]]:
    """Best vs worst response per prompt by reward (the paper's on-policy DPO pairing).

    Prompts whose trainable responses all score the same (or have fewer than two) give no pair.
    Ties for best/worst go to the earliest sample, so the choice is deterministic.
    """
    by_prompt: dict[int, list[Rollout]] = {}
    for r in rollouts:
        if r.trainable:
            by_prompt.setdefault(r.prompt_index, []).append(r)
    pairs = []
    for p in sorted(by_prompt):
        group = by_prompt[p]
        best = max(group, key=lambda r: r.reward)  # max/min return the first of equal keys
        worst = min(group, key=lambda r: r.reward)
        if best.reward > worst.reward:
            pairs.append((best, worst))
    return pairs


def dpo_sample(r: Rollout, ref_logp: Optional[torch.Tensor]) -> Sample:
    fields = {"loss_mask": response_mask(len(r.prompt_ids), len(r.response_ids))}
    if ref_logp is not None:
        fields["ref_logp"] = ref_logp.float()
    return Sample(torch.tensor(sequence_of(r), dtype=torch.long), fields)
