"""A step's scored rollouts: prompts from the sampler, generated, parsed, rewarded and shaped,
with DAPO's dynamic sampling when ``algorithm.dynamic_sampling`` is on.

Dynamic sampling (Yu et al. 2025, "DAPO"; verl's ``filter_groups``): a prompt whose samples all
got the same reward has GRPO advantage 0 for every sample, so it only dilutes the batch. Such
groups are dropped and the next prompts are generated, round after round, until
``data.prompts_per_step`` informative groups are collected (the first ones, in sampling order);
after ``max_extra_rounds`` extra rounds the batch is filled with dropped groups instead, so every
step trains on the same number of prompts (their advantages are 0: they add only the KL and
entropy terms). Each round has its own sampling seed, so a resumed run repeats it exactly.

Asynchronous rollouts (``rollout.max_staleness`` >= 1): :func:`launch_step_rollouts` draws a
step's prompts and starts their generation on the engines, and :func:`finish_step_rollouts`
waits for it and scores the answers, a step later, after the trainer has trained in between.

Partial rollouts (``rollout.partial_tokens`` > 0): :func:`collect_partial_rollouts` generates in
rounds of a few tokens per answer and trains on the groups done first; the others carry over
(``trainer/partial_rollouts.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from rlmt_megatron.rollout.types import Generation, stop_string_end
from rlmt_megatron.trainer.experience import Rollout
from rlmt_megatron.trainer.one_round import OneRoundStore
from rlmt_megatron.trainer.partial_rollouts import PartialRollouts, Round
from rlmt_megatron.thinking import stop_settings
from rlmt_megatron.trainer.rollout_phase import parse_and_score, prompt_token_ids, sampling_params, shape_rewards
from rlmt_megatron.trainer.watchdog import activity


@dataclass
class StepRollouts:
    """What a step trains on: the prompts (sampler records), their conversations, whether each
    was truncated, and the rollouts (``prompt_index`` = position in ``prompts``)."""

    prompts: list
    conversations: list[list[dict]]
    truncated: list[bool]
    rollouts: list[Rollout]
    metrics: dict[str, float] = field(default_factory=dict)


def informative(group: list[Rollout]) -> bool:
    """Whether GRPO learns anything from this prompt: two different finite rewards."""
    finite = [r.reward for r in group if math.isfinite(r.reward)]
    return len(finite) >= 2 and max(finite) != min(finite)


def _groups(batch: list, conversations: list, truncated: list[bool], rollouts: list[Rollout]) -> list[tuple]:
    by_prompt: list[list[Rollout]] = [[] for _ in batch]
    for r in rollouts:
        by_prompt[r.prompt_index].append(r)
    return list(zip(batch, conversations, truncated, by_prompt))


def _assemble(groups: list[tuple], metrics: dict[str, float]) -> StepRollouts:
    rollouts = []
    for index, (_, _, _, members) in enumerate(groups):
        for r in members:
            r.prompt_index = index
            rollouts.append(r)
    return StepRollouts([g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups], rollouts, metrics)


@dataclass
class DrawnPrompts:
    """A batch of prompts from the sampler, templated, with the sampling settings to generate them."""

    prompts: list  # sampler records
    conversations: list[list[dict]]
    prompt_ids: list[list[int]]
    truncated: list[bool]
    params: object


def _draw(cfg, roles, sampler, step: int, round_: int = 0) -> DrawnPrompts:
    batch = sampler.next_batch()
    conversations = [p.messages for p in batch]
    prompt_ids, truncated = prompt_token_ids(cfg.format, cfg.data.max_prompt_tokens, roles.tokenizer, conversations)
    params = sampling_params(cfg.rollout, cfg.format, roles.tokenizer, cfg.run.seed, step, round_)
    return DrawnPrompts(batch, conversations, prompt_ids, truncated, params)


def _score(cfg, roles, rollouts: list[Rollout], conversations: list[list[dict]], timer) -> None:
    """Parse and reward the answers (``conversations[r.prompt_index]`` is each one's prompt)."""
    with activity("reward"), timer.phase("reward"):
        parse_and_score(cfg.format, roles.tokenizer, roles.scorer, rollouts, conversations)
        shape_rewards(cfg.reward, cfg.rollout.max_new_tokens, rollouts)


def collect_step_rollouts(cfg, roles, supervisor, sampler, step: int, timer,
                          pair_set: Optional[OneRoundStore] = None) -> StepRollouts:
    """Generate and score this step's rollouts (every rank; the engine calls are collective).
    ``pair_set``: one_round DPO's fixed pair set, which recalls the groups of prompts sampled in
    an earlier epoch instead of generating them again (``trainer/one_round.py``)."""
    dynamic = cfg.algorithm.dynamic_sampling
    want = cfg.data.prompts_per_step
    kept: list[tuple] = []
    dropped: list[tuple] = []
    rounds = 0
    while True:
        drawn = _draw(cfg, roles, sampler, step, rounds)

        def sample(positions: list[int]) -> list[Rollout]:
            """Generate and score the prompts at these batch positions (``prompt_index`` = position)."""
            with activity("rollout"), timer.phase("rollout"):
                got = supervisor.generate([drawn.prompt_ids[i] for i in positions], drawn.params)
            if not cfg.rollout.max_staleness:  # asynchronous: the engines generate the next step meanwhile
                supervisor.sleep()  # colocated engines free their GPU memory for the reward model and training
            _score(cfg, roles, got, [drawn.conversations[i] for i in positions], timer)
            for r in got:
                r.prompt_index = positions[r.prompt_index]
            return got

        if pair_set is None:
            rollouts, metrics = sample(list(range(len(drawn.prompts)))), {}
        else:
            rollouts, recalled = pair_set.rollouts(step, drawn.prompts, drawn.prompt_ids, sample)
            metrics = {"rollout/recalled_prompts": float(recalled)}
        groups = _groups(drawn.prompts, drawn.conversations, drawn.truncated, rollouts)
        rounds += 1
        if not dynamic.enabled:
            return _assemble(groups, metrics)
        for g in groups:
            (kept if informative(g[3]) else dropped).append(g)
        if len(kept) >= want or rounds > dynamic.max_extra_rounds:
            break
    filled = max(0, want - len(kept))
    metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/dropped_groups": float(len(dropped)),
               "dynamic_sampling/filled_groups": float(filled)}
    return _assemble(kept[:want] + dropped[:filled], metrics)


@dataclass
class LaunchedRollouts:
    """A step's prompts whose generation is under way (asynchronous rollouts)."""

    drawn: DrawnPrompts
    pending: object  # the supervisor's handle on the generation


def launch_step_rollouts(cfg, roles, supervisor, sampler, step: int) -> LaunchedRollouts:
    """Draw step ``step``'s prompts and start generating them from the weights the engines hold
    (every rank; returns at once)."""
    drawn = _draw(cfg, roles, sampler, step)
    with activity("launching the next step's rollout"):
        return LaunchedRollouts(drawn, supervisor.launch(drawn.prompt_ids, drawn.params))


def finish_step_rollouts(cfg, roles, supervisor, launched: LaunchedRollouts, timer) -> StepRollouts:
    """Wait for a launched generation (``timing/rollout`` is the wait the training did not hide)
    and score it."""
    drawn = launched.drawn
    with activity("rollout"), timer.phase("rollout"):
        got = supervisor.generate(drawn.prompt_ids, drawn.params, pending=launched.pending)
    _score(cfg, roles, got, drawn.conversations, timer)
    return _assemble(_groups(drawn.prompts, drawn.conversations, drawn.truncated, got), {})


def collect_partial_rollouts(cfg, roles, supervisor, sampler, partial: PartialRollouts, step: int, timer,
                             launched: Optional["LaunchedRound"] = None) -> StepRollouts:
    """This step's groups from the partial rollouts (every rank; the engine calls are collective):
    rounds of ``rollout.partial_tokens`` tokens per unfinished answer, one request per answer;
    ``launched``: the step's first round, launched while the previous step trained."""

    def generate(prompt_ids: list[list[int]], round_: int):
        params = _partial_params(cfg, roles, step, round_)
        with activity("rollout"), timer.phase("rollout"):
            return _generations(supervisor.generate(prompt_ids, params))

    first = None
    if launched is not None:
        with activity("rollout"), timer.phase("rollout"):
            got = supervisor.generate(launched.round.requests, launched.params, pending=launched.pending)
        first = (launched.round, _generations(got))
    groups, metrics = partial.collect(cfg.data.prompts_per_step, supervisor.version, _partial_draw(cfg, roles, sampler, step),
                                      generate, first)
    if not cfg.rollout.max_staleness:
        supervisor.sleep()  # colocated engines free their GPU memory for the reward model and training
    rollouts = [Rollout(index, list(g.prompt_ids), list(a.tokens), list(a.logprobs), a.finish,
                        min(a.versions, default=supervisor.version), token_versions=list(a.versions))
                for index, g in enumerate(groups) for a in g.answers]
    conversations = [g.prompt.messages for g in groups]
    _score(cfg, roles, rollouts, conversations, timer)
    return StepRollouts([g.prompt for g in groups], conversations, [g.truncated for g in groups], rollouts, metrics)


@dataclass
class LaunchedRound:
    """A step's first partial-rollout round, under way on the engines (asynchronous rollouts)."""

    round: Round
    params: object
    pending: object  # the supervisor's handle on the generation


def launch_partial_round(cfg, roles, supervisor, sampler, partial: PartialRollouts, step: int
                         ) -> Optional[LaunchedRound]:
    """Start step ``step``'s first partial-rollout round from the weights the engines hold (every
    rank; returns at once); None when the step needs no round to begin with."""
    first = partial.first_round(cfg.data.prompts_per_step, _partial_draw(cfg, roles, sampler, step))
    if first is None:
        return None
    params = _partial_params(cfg, roles, step, 0)
    with activity("launching the next step's rollout"):
        return LaunchedRound(first, params, supervisor.launch(first.requests, params))


def stop_string_cut(fmt, tokenizer):
    """The format's stop strings (the zero format's ``response_end``) found across rounds: a stop
    string begun in one round and ended in the next is where the answer ends (the engine searched
    the second round's text alone). None when the format stops on tokens only."""
    stop, _ = stop_settings(fmt, tokenizer)
    if not stop:
        return None
    longest = max(len(s) for s in stop)  # tokens: every token is at least one character

    def cut(before: list[int], new: list[int]):
        return stop_string_end(lambda ids: tokenizer.decode(ids, skip_special_tokens=False), new, stop,
                               before[-longest:])

    return cut


def _partial_draw(cfg, roles, sampler, step: int):
    def draw():
        d = _draw(cfg, roles, sampler, step)
        return list(zip(d.prompts, d.prompt_ids, d.truncated))

    return draw


def _partial_params(cfg, roles, step: int, round_: int):
    """A partial-rollout round's sampling: one answer per request, ``partial_tokens`` at most."""
    params = sampling_params(cfg.rollout, cfg.format, roles.tokenizer, cfg.run.seed, step, round_)
    return params.model_copy(update={"n": 1, "max_new_tokens": cfg.rollout.partial_tokens})


def _generations(rollouts: list[Rollout]) -> list[Generation]:
    return [Generation(r.prompt_index, 0, r.response_ids, r.engine_logprobs, r.finish_reason, r.weight_version)
            for r in rollouts]
