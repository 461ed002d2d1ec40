"""Partial rollouts: answers that do not finish in their step continue in the next, under newer weights.

With ``rollout.partial_tokens: T`` a step generates in rounds. Each round gives every unfinished
answer of the groups in flight at most T more tokens (one request per answer: its prompt and its
tokens so far, so any engine continues it, with a seed of its own per round). A group whose n
answers have all finished is done. The step trains on the ``data.prompts_per_step`` done groups
drawn earliest; the others stay here: done groups are trained by the next step, unfinished ones
continue in its rounds, sampled by the weights the engines hold then. So a step waits for enough
groups, not for the longest answer in flight. Every token keeps the version
of the weights that sampled it, and the loss corrects with the engine's logprobs token by token
(``algorithm.rollout_correction``, required).

Rounds: while a step lacks done groups, each round first draws a new batch of
``data.prompts_per_step`` prompts, as long as fewer than ``(S + 1) x prompts_per_step`` groups
are in flight (S = ``rollout.partial_max_syncs``): the engines always have new answers to start
beside the ones they continue, and the over-sampling is bounded. An answer may span at most S
syncs (newest minus oldest version of its tokens): one that would span more if carried over is
finished in the current step, whose rounds go on (drawing nothing) until it is; groups done
beyond the step's need wait for the next step. With answers of the full length, each takes
``max_new_tokens / T`` rounds, so ``T >= max_new_tokens / (S + 1)`` lets them flow without being
forced to finish.

With asynchronous rollouts (``rollout.max_staleness`` >= 1) a step's first round is launched
while the previous step trains (:meth:`PartialRollouts.first_round`), from the weights the engines
hold then; the step waits for it and runs any further rounds itself.

Why token budgets and not aborts at the sync's wall-clock time (SGLang's and vLLM's abort
requests): a budget makes the split of every answer, and so the whole run, reproducible and
resumable bit for bit; the mechanism (continue an answer from its tokens so far under new
weights) is the same. What is here is kept in checkpoints (``state_dict``): JSON, every token,
logprob and version of the groups held, about 20 bytes a token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from rlmt_megatron.data.prompts import Prompt
from rlmt_megatron.rollout.types import Generation


@dataclass
class Answer:
    """One answer so far: its tokens, their engine logprobs and the weights that sampled each."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: Optional[str] = None  # "stop" or "length" once finished

    def add(self, g: Generation, max_new_tokens: int, cut: Optional["StopCut"] = None) -> None:
        """Append one round's tokens: finished on a stop token or at ``max_new_tokens``. ``cut``:
        where a stop string completed by this round's tokens ends (one begun in an earlier round
        is invisible to the engine, which only searches what it generated)."""
        keep = cut(self.tokens, g.token_ids) if cut is not None else None
        tokens, logprobs = (g.token_ids, g.logprobs) if keep is None else (g.token_ids[:keep], g.logprobs[:keep])
        self.tokens += tokens
        self.logprobs += logprobs
        self.versions += [g.weight_version] * len(tokens)
        if g.finish_reason == "stop" or keep is not None:
            self.finish = "stop"
        elif len(self.tokens) >= max_new_tokens:
            self.finish = "length"

    def syncs_spanned(self, at: int) -> int:
        """Syncs between its first token's weights and version ``at`` (0 without tokens)."""
        return at - self.versions[0] if self.versions else 0


@dataclass
class Group:
    """One prompt's answers; ``serial`` counts the groups drawn over the run (their order)."""

    serial: int
    prompt: Prompt
    prompt_ids: list[int]
    truncated: bool
    answers: list[Answer]

    @property
    def done(self) -> bool:
        return all(a.finish is not None for a in self.answers)


@dataclass
class Round:
    """A round started ahead (asynchronous rollouts): the answers it continues, in request order,
    and whether a batch was drawn for it."""

    pending: list[tuple["Group", "Answer"]]
    drew: bool

    @property
    def requests(self) -> list[list[int]]:
        return [g.prompt_ids + a.tokens for g, a in self.pending]


# What a step's rounds need from outside: the next batch of prompts (sampler record, templated
# ids, truncated flag each), and one round's generation (one request per answer, with the
# round's seed) returning one Generation per request.
Draw = Callable[[], Sequence[tuple[Prompt, list[int], bool]]]
GenerateRound = Callable[[list[list[int]], int], list[Generation]]
# (an answer's tokens so far, a round's new tokens) -> how many of the new ones to keep when a stop
# string ends in them, else None
StopCut = Callable[[list[int], list[int]], Optional[int]]


class PartialRollouts:
    """The groups held between steps: ``in_flight`` (some answer unfinished) and ``done`` (not
    yet trained), each in the order drawn."""

    def __init__(self, samples_per_prompt: int, max_new_tokens: int, max_syncs: int, cut: Optional[StopCut] = None):
        # (the round's token budget is the caller's sampling setting, rollout.partial_tokens)
        self.n = samples_per_prompt
        self.cut = cut
        self.max_new_tokens = max_new_tokens
        self.max_syncs = max_syncs
        self.in_flight: list[Group] = []
        self.done: list[Group] = []
        self.drawn = 0  # groups drawn over the run

    def must_finish(self, version: int) -> list[Answer]:
        """Unfinished answers that would span more than ``max_syncs`` syncs if carried over
        (continued at ``version`` + 1 or later)."""
        return [a for g in self.in_flight for a in g.answers
                if a.finish is None and a.syncs_spanned(version + 1) > self.max_syncs]

    def first_round(self, want: int, draw: Draw) -> Optional["Round"]:
        """The next step's first round, to launch while this step trains (asynchronous
        rollouts): its new batch drawn now, if the rules draw one; None when there is nothing to
        generate before the step could train."""
        if len(self.done) >= want:
            return None  # the step may need no round at all (its must-finish rounds are decided then)
        return self._next_round(want, draw)

    def collect(self, want: int, version: int, draw: Draw, generate: GenerateRound,
                launched: Optional[tuple["Round", list[Generation]]] = None) -> tuple[list[Group], dict]:
        """The ``want`` groups a step trains on, generating rounds at engine weights ``version``
        as needed; returns them and the step's ``partial/...`` metrics. ``launched``: the step's
        first round (from :meth:`first_round`) and its generations, generated while the previous
        step trained."""
        rounds = draws = 0
        if launched is not None:
            first, got = launched
            self._apply(first.pending, got)
            rounds, draws = 1, int(first.drew)
        while len(self.done) < want or self.must_finish(version):
            round_ = self._next_round(want, draw)
            draws += round_.drew
            self._apply(round_.pending, generate(round_.requests, rounds))
            rounds += 1
        self.done.sort(key=lambda g: g.serial)  # the oldest first: the least stale batch
        taken, self.done = self.done[:want], self.done[want:]
        answers = [a for g in taken for a in g.answers]
        return taken, {
            "partial/rounds": float(rounds),
            "partial/drawn_batches": float(draws),
            "partial/continued_samples": float(sum(len(set(a.versions)) > 1 for a in answers)),
            "partial/max_syncs_spanned": float(max((a.versions[-1] - a.versions[0] for a in answers if a.versions),
                                                   default=0)),
            "partial/in_flight_groups": float(len(self.in_flight)),
            "partial/waiting_groups": float(len(self.done)),
        }

    def _next_round(self, want: int, draw: Draw) -> Round:
        """The next round: first a new batch while the step lacks done groups and fewer than
        (S + 1) x want are in flight, then every unfinished answer in flight."""
        drew = len(self.done) < want and len(self.in_flight) < (self.max_syncs + 1) * want
        if drew:
            for prompt, ids, truncated in draw():
                self.in_flight.append(Group(self.drawn, prompt, list(ids), truncated,
                                            [Answer() for _ in range(self.n)]))
                self.drawn += 1
        return Round([(g, a) for g in self.in_flight for a in g.answers if a.finish is None], drew)

    def _apply(self, pending: list[tuple[Group, Answer]], got: list[Generation]) -> None:
        """One round's generations, in request order; groups now done move to ``done``."""
        if len(got) != len(pending):
            raise RuntimeError(f"a partial-rollout round got {len(got)} answers for {len(pending)} requests")
        for (_, answer), g in zip(pending, got):
            answer.add(g, self.max_new_tokens, self.cut)
        self.done += [g for g in self.in_flight if g.done]
        self.in_flight = [g for g in self.in_flight if not g.done]

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """Everything held, as JSON (a copy: later rounds do not change it)."""
        return {"drawn": self.drawn,
                "in_flight": [_group_json(g) for g in self.in_flight],
                "done": [_group_json(g) for g in self.done]}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])
        self.in_flight = [_group_from_json(g) for g in state["in_flight"]]
        self.done = [_group_from_json(g) for g in state["done"]]


def _group_json(g: Group) -> dict:
    return {"serial": g.serial, "prompt": dataclasses.asdict(g.prompt), "prompt_ids": list(g.prompt_ids),
            "truncated": g.truncated, "answers": [dataclasses.asdict(a) for a in g.answers]}


def _group_from_json(d: dict) -> Group:
    return Group(d["serial"], Prompt(**d["prompt"]), list(d["prompt_ids"]), bool(d["truncated"]),
                 [Answer(list(a["tokens"]), list(a["logprobs"]), list(a["versions"]), a["finish"])
                  for a in d["answers"]])
