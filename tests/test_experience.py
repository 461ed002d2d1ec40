"""From rollouts to samples: token layout, the non-finite reward rule, advantages, DPO pairs.

References are written from the definitions in float64 (statistics module / explicit loops).
"""

import math
import statistics

import pytest
import torch

from rlmt_megatron.algorithms import bradley_terry
from rlmt_megatron.trainer.experience import (
    ExperienceError,
    Rollout,
    check_trainable,
    dpo_pairs,
    group_advantages,
    policy_sample,
    response_mask,
)


def _r(p, reward, n_resp=3, prompt=(5, 6)):
    return Rollout(prompt_index=p, prompt_ids=list(prompt), response_ids=list(range(10, 10 + n_resp)),
                   engine_logprobs=[-1.0] * n_resp, finish_reason="stop", weight_version=1, reward=reward)


def test_response_mask_marks_exactly_the_actions_that_emit_response_tokens():
    prompt, response = [1, 2, 3], [7, 8]
    seq = prompt + response
    mask = response_mask(len(prompt), len(response))
    # action t predicts seq[t + 1]; response tokens are seq[3], seq[4] -> actions 2 and 3
    expected = [1.0 if t + 1 >= len(prompt) else 0.0 for t in range(len(seq) - 1)]
    assert mask.tolist() == expected


def test_grpo_advantages_drop_nonfinite_rewards_and_use_remaining_group_stats():
    rewards = {0: [1.0, 2.0, float("nan"), 4.0], 1: [0.5, float("inf"), 0.5, 0.5], 2: [3.0, float("nan"), float("nan"), float("nan")]}
    rollouts = [_r(p, x) for p in rewards for x in rewards[p]]
    adv = group_advantages(rollouts, "grpo")
    expected = []
    for p, xs in rewards.items():
        finite = [x for x in xs if math.isfinite(x)]
        for x in xs:
            if not math.isfinite(x) or len(finite) < 2 or max(finite) == min(finite):
                expected.append(0.0)
            else:
                expected.append((x - statistics.mean(finite)) / (statistics.stdev(finite) + 1e-6))
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)


def test_rloo_and_dr_grpo_against_definitions():
    xs = [1.0, 4.0, 2.5, -1.0]
    rollouts = [_r(0, x) for x in xs] + [_r(1, 7.0)]  # a lone sample: no baseline -> 0
    rloo = group_advantages(rollouts, "rloo").tolist()
    dr = group_advantages(rollouts, "dr_grpo").tolist()
    for i, x in enumerate(xs):
        others = [y for j, y in enumerate(xs) if j != i]
        assert rloo[i] == pytest.approx(x - sum(others) / len(others), abs=1e-12)
        assert dr[i] == pytest.approx(x - sum(xs) / len(xs), abs=1e-12)
    assert rloo[4] == dr[4] == 0.0
    with pytest.raises(ValueError, match="outcome estimator"):
        group_advantages(rollouts, "gae")


def test_empty_responses_are_not_trained_and_get_no_advantage():
    rollouts = [_r(0, 1.0), _r(0, 3.0, n_resp=0), _r(0, 2.0)]
    adv = group_advantages(rollouts, "dr_grpo").tolist()
    assert adv == pytest.approx([-0.5, 0.0, 0.5])
    s = policy_sample(rollouts[1], 0.0, torch.zeros(1), None)
    assert s.fields["loss_mask"].sum() == 0


def test_policy_sample_fields_align_with_actions():
    r = _r(0, 1.0, n_resp=2, prompt=(1, 2, 3))
    old = torch.arange(4, dtype=torch.float32)
    s = policy_sample(r, 0.75, old, old * 2)
    assert s.input_ids.tolist() == [1, 2, 3, 10, 11]
    assert s.fields["advantages"].tolist() == [0.0, 0.0, 0.75, 0.75]
    assert torch.equal(s.fields["ref_logp"], old * 2)


@pytest.mark.parametrize("case, message", [
    ([], "no rollouts"),
    ([_r(0, 1.0, n_resp=0), _r(0, 2.0, n_resp=0)], "empty responses"),
    ([_r(0, float("nan")), _r(0, float("-inf"))], "NaN/inf"),
    ([_r(0, float("nan")), _r(0, 1.0, n_resp=0)], "no rollout has both"),
])
def test_untrainable_steps_are_refused_with_the_reason(case, message):
    with pytest.raises(ExperienceError, match=message):
        check_trainable(case)


def test_dpo_pairs_best_vs_worst_and_skip_ties():
    rollouts = [_r(0, 1.0), _r(0, 5.0), _r(0, float("nan")), _r(0, -2.0),
                _r(1, 3.0), _r(1, 3.0),  # tie: no pair
                _r(2, 0.0), _r(2, 9.0, n_resp=0), _r(2, 1.0)]  # the empty one cannot be chosen
    pairs = dpo_pairs(rollouts)
    assert [(c.reward, r.reward) for c, r in pairs] == [(5.0, -2.0), (1.0, 0.0)]


def test_bradley_terry_against_float64_definition():
    c = torch.tensor([0.3, -2.0, 40.0], dtype=torch.float64)
    r = torch.tensor([0.1, 1.0, -40.0], dtype=torch.float64)
    expected = [math.log1p(math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())]
    assert bradley_terry(c, r).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-30)
