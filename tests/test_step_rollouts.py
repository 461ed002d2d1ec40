"""A step's rollouts (trainer/step_rollouts.py): DAPO's dynamic sampling and the overlong penalty.

The engine and the reward model are stand-ins here (the unit under test is which groups a step
keeps, in which order, with which seeds): the engine answers each prompt with responses whose
lengths say how the scripted reward model scores them, and records the seed of every round.
Everything else (templates, parsing, the sampler, the reward shaping) is the real code.
"""

import math
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from rlmt_megatron.config.rlmt import load_rlmt_config
from rlmt_megatron.data.prompts import Prompt, PromptSampler
from rlmt_megatron.trainer.experience import Rollout
from rlmt_megatron.trainer.step_rollouts import collect_step_rollouts, informative
from rlmt_megatron.monitoring.progress import PhaseTimer

# prompt number -> the rewards its 3 samples get (equal rewards: nothing for GRPO to learn)
REWARDS = {0: [1, 1, 1], 1: [0, 1, 2], 2: [3, 3, 3], 3: [2, 0, 2], 4: [5, 5, 5], 5: [5, 5, 5], 6: [1, 2, 3],
           7: [4, 4, 4], 8: [0, 0, 1], 9: [7, 7, 7], 10: [2, 2, 2], 11: [6, 6, 6]}


class Engine:
    """Answers prompt k (found by its text) with response lengths 1, 2, 3; the scorer below maps
    (k, sample) to REWARDS. Records each round's seed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seeds = tokenizer, []

    def generate(self, prompt_ids, params):
        self.seeds.append(params.seed)
        out = []
        for p, ids in enumerate(prompt_ids):
            k = int(self.tokenizer.decode(ids).split("prompt ")[1].split()[0])
            for j in range(params.n):
                out.append(Rollout(p, list(ids), [5] * (j + 1), [0.0] * (j + 1), "stop", 0, extras={"k": k, "j": j}))
        return out

    def sleep(self):
        pass


class Scorer:
    def score(self, conversations, answers):
        raise AssertionError("parse_and_score is replaced below")


def setup(tiny_models, monkeypatch, *overrides, prompts_per_step=3):
    from rlmt_megatron.trainer import step_rollouts

    def score(fmt, tokenizer, scorer, rollouts, conversations):  # the stand-in reward model
        for r in rollouts:
            r.reward = float(REWARDS[r.extras["k"]][r.extras["j"]])

    monkeypatch.setattr(step_rollouts, "parse_and_score", score)
    cfg = load_rlmt_config(None, ["models.policy=a", "models.reward=b", "data.prompts=[p]", "format.kind=no_think",
                                  f"data.prompts_per_step={prompts_per_step}", "rollout.samples_per_prompt=3",
                                  "rollout.max_new_tokens=4", *overrides])
    tok = AutoTokenizer.from_pretrained(tiny_models / "llama-policy")
    prompts = [Prompt([{"role": "user", "content": f"prompt {k} please"}], None, "mem", k) for k in range(12)]
    sampler = PromptSampler(prompts, prompts_per_step, seed=0, shuffle=False)
    engine = Engine(tok)
    roles = SimpleNamespace(tokenizer=tok, scorer=Scorer())
    return cfg, roles, engine, sampler


def numbers(got):
    return [int(p.messages[0]["content"].split()[1]) for p in got.prompts]


def test_dynamic_sampling_keeps_informative_groups_in_order_with_a_seed_per_round(tiny_models, monkeypatch):
    cfg, roles, engine, sampler = setup(tiny_models, monkeypatch, "algorithm.dynamic_sampling.enabled=true")
    got = collect_step_rollouts(cfg, roles, engine, sampler, 7, PhaseTimer(cuda_sync=False))
    # rounds of 3 prompts: 0 1 2 | 3 4 5 | 6 7 8 -> informative 1, 3, 6 (8 is surplus)
    assert numbers(got) == [1, 3, 6]
    assert [r.prompt_index for r in got.rollouts] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [r.extras["k"] for r in got.rollouts] == [1, 1, 1, 3, 3, 3, 6, 6, 6]
    assert got.metrics == {"dynamic_sampling/rounds": 3.0, "dynamic_sampling/dropped_groups": 5.0,
                           "dynamic_sampling/filled_groups": 0.0}
    base = cfg.run.seed * 100003 + 7  # round 0: the seed a step had before dynamic sampling existed
    assert engine.seeds == [base, base + 2**32, base + 2 * 2**32]
    assert sampler.position == 9


def test_after_the_extra_rounds_the_batch_is_filled_with_dropped_groups(tiny_models, monkeypatch):
    cfg, roles, engine, sampler = setup(tiny_models, monkeypatch, "algorithm.dynamic_sampling.enabled=true",
                                        "algorithm.dynamic_sampling.max_extra_rounds=1", prompts_per_step=4)
    got = collect_step_rollouts(cfg, roles, engine, sampler, 1, PhaseTimer(cuda_sync=False))
    # 0 1 2 3 | 4 5 6 7 -> informative 1, 3, 6; one slot filled with the first dropped group, 0
    assert numbers(got) == [1, 3, 6, 0]
    assert got.metrics["dynamic_sampling/filled_groups"] == 1.0 and got.metrics["dynamic_sampling/rounds"] == 2.0
    assert not informative([r for r in got.rollouts if r.prompt_index == 3])


def test_without_dynamic_sampling_the_batch_is_the_samplers(tiny_models, monkeypatch):
    cfg, roles, engine, sampler = setup(tiny_models, monkeypatch)
    got = collect_step_rollouts(cfg, roles, engine, sampler, 1, PhaseTimer(cuda_sync=False))
    assert numbers(got) == [0, 1, 2] and got.metrics == {} and len(engine.seeds) == 1


def test_the_overlong_penalty_is_added_to_the_reward(tiny_models, monkeypatch):
    cfg, roles, engine, sampler = setup(tiny_models, monkeypatch, "reward.overlong_buffer_tokens=2",
                                        "reward.overlong_penalty_factor=0.5")
    got = collect_step_rollouts(cfg, roles, engine, sampler, 1, PhaseTimer(cuda_sync=False))
    # max_new_tokens 4, buffer 2: lengths 1, 2 -> 0; 3 -> 0.5 * (2 - 3) / 2 = -0.25
    for r in got.rollouts:
        expected = 0.0 if len(r.response_ids) <= 2 else 0.5 * (2 - len(r.response_ids)) / 2
        assert r.extras["overlong_penalty"] == pytest.approx(expected)
        assert r.reward == pytest.approx(REWARDS[r.extras["k"]][r.extras["j"]] + expected)


def test_informative_needs_two_different_finite_rewards():
    def group(*rewards):
        return [Rollout(0, [1], [2], [0.0], "stop", 0, reward=x) for x in rewards]

    assert informative(group(1.0, 2.0)) and not informative(group(1.0, 1.0))
    assert not informative(group(1.0, math.nan, math.nan)) and informative(group(1.0, math.nan, 0.0))
