"""Several rollout engines serving one generation: prompts spread by outstanding work, and a member
that fails hands its prompts to the others.

A *request* is one prompt with its ``params.n`` samples. Its work is estimated as
``len(prompt) + n * max_new_tokens`` tokens, the KV cache it may fill (the answers' real lengths
are unknown until they are sampled). Requests are assigned longest first, each to the member
with the least outstanding work (Graham's LPT rule: within 4/3 of the best makespan when the
estimates are right), not round-robin by prompt, so one member does not get all the long prompts.
Each member serves its share in one ``generate`` call and the members run at once (one thread
each: the calls wait on other processes or servers, which batch the requests themselves).

A member whose call fails takes no further part in this generation: its requests are assigned
again, by the same rule, over the members still serving, until every request is served or no
member is left (:class:`MembersFailed`). Every request's samples come from exactly one successful
call, so nothing is lost and nothing is counted twice; the caller restarts the failed members.

Seeds: each prompt gets a sampler seed of its own, derived from ``params.seed`` and its position
in the whole request (:func:`request_seeds`), whichever member serves it. vLLM seeds each request
with it, and hf engines in a fleet each prompt (``HFEngine(seed_per_prompt=True)``), so a prompt's
samples do not depend on the member that served it (a fleet that lost a member mid-rollout samples
what it would have sampled without the fault), and two prompts never share random numbers (with
one seed for all, prompts at the same position of their answers drew the same noise).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from rlmt_megatron.rollout.engine import EngineError, RolloutEngine, failure_text
from rlmt_megatron.rollout.types import Generation, SamplingParams


class MembersFailed(EngineError):
    """Some members of a fleet failed; ``failed`` maps each one's index to why. Raised when no
    member is left to finish the work (a generation), or after a sync some members missed."""

    def __init__(self, failed: Mapping[int, str], fleet_size: int):
        self.failed = dict(sorted(failed.items()))
        self.fleet_size = fleet_size
        super().__init__(describe_failures(self.failed, fleet_size))

    def __reduce__(self):  # rebuilt from its fields when broadcast to the other ranks
        return MembersFailed, (self.failed, self.fleet_size)


def describe_failures(failed: Mapping[int, str], fleet_size: int) -> str:
    """Each failed engine's reason, named by its index; a fleet of one is "the rollout engine", so
    its error reads as it always did."""
    return "; ".join(why if fleet_size == 1 else f"engine {i}: {why}" for i, why in sorted(failed.items()))


@dataclass
class Outcome:
    """What one job of :func:`run_each` came to: its value, or the text of its failure."""

    value: Any = None
    error: Optional[str] = None
    seconds: float = 0.0


def run_each(jobs: Mapping[int, Callable[[], Any]]) -> dict[int, Outcome]:
    """Run every job (engine index -> callable) at once; one failing never stops the others. The
    first runs in the caller's thread (an inline engine is built and used where it lives), the
    others in threads of their own (their calls wait on other processes or servers); the caller
    waits in short joins, so a stop signal can interrupt the wait."""
    outcomes = {index: Outcome() for index in jobs}

    def run(index: int) -> None:
        start = time.monotonic()
        try:
            outcomes[index].value = jobs[index]()
        except Exception as e:  # noqa: BLE001 - reported per engine
            outcomes[index].error = failure_text(e)
        outcomes[index].seconds = time.monotonic() - start

    first, *rest = jobs
    threads = [threading.Thread(target=run, args=(index,), daemon=True, name=f"engine-{index}") for index in rest]
    for t in threads:
        t.start()
    run(first)
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    return outcomes


@dataclass
class MemberReport:
    """What one member did in one generation (the fleet's per-engine metrics)."""

    positions: list[int] = field(default_factory=list)  # the prompts it served (positions in the request)
    samples: int = 0
    tokens: int = 0  # response tokens it generated (successfully)
    seconds: float = 0.0  # wall time of its calls
    queued_work: int = 0  # estimated tokens assigned to it in the first round (its queue at dispatch)
    error: Optional[str] = None  # why it failed in this generation

    @property
    def prompts(self) -> int:
        return len(self.positions)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


_MASK = 2**64 - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele et al. 2014): nearby inputs give unrelated outputs, so
    seeds derived from derived seeds do not cancel out (as XOR with a constant would)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def request_seeds(base: Optional[int], count: int) -> Optional[list[int]]:
    """One seed per position 0..count-1, from ``base``, in [0, 2**63) (what vLLM and SGLang
    accept); None when the call has no seed."""
    if base is None:
        return None
    return [_splitmix64((base & _MASK) * 0x100000001B3 + index + 1 & _MASK) % 2**63 for index in range(count)]


def request_work(prompt: Sequence[int], params: SamplingParams) -> int:
    return len(prompt) + params.n * params.max_new_tokens


def assign(work: Sequence[int], members: Sequence[int],
           outstanding: Optional[Mapping[int, int]] = None) -> dict[int, list[int]]:
    """Request positions per member: longest first, each to the member with the least outstanding
    work (ties: the lower index). ``outstanding``: work the members already hold."""
    if not members:
        raise ValueError("no member to assign requests to")
    load = {m: (outstanding or {}).get(m, 0) for m in members}
    shares: dict[int, list[int]] = {m: [] for m in members}
    for position in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        least = min(members, key=lambda m: (load[m], m))
        shares[least].append(position)
        load[least] += work[position]
    return {m: sorted(s) for m, s in shares.items() if s}


def member_node(member: int, nodes: int) -> int:
    """The node engine ``member`` runs on, among ``nodes`` nodes that host engines: spread in turn
    (engine i on node i mod nodes), so every node generates before any holds two."""
    return member % nodes


def member_slot(member: int, nodes: int) -> int:
    """Engine ``member``'s place among its node's engines (which of the node's GPUs it takes)."""
    return member // nodes


ShareRunner = Callable[[Mapping[int, list[int]]], Mapping[int, Outcome]]


def first_shares(members: Sequence[int], prompts: Sequence[Sequence[int]], params: SamplingParams) -> dict[int, list[int]]:
    """The first round's shares: prompt positions per member (what a launched generation starts)."""
    return assign([request_work(p, params) for p in prompts], sorted(members)) if prompts else {}


def generate_across(engines: Mapping[int, RolloutEngine], prompts: Sequence[Sequence[int]],
                    params: SamplingParams, fleet_size: Optional[int] = None,
                    ) -> tuple[list[list[Generation]], dict[int, MemberReport]]:
    """Generate ``params.n`` samples for each prompt over ``engines`` (index -> engine), all in this
    process. Returns the generations in prompt order (``prompt_index`` = position in ``prompts``)
    and a report per member. Raises :class:`MembersFailed` when every member failed before all
    were served (``fleet_size``: the run's engine count, for the error's wording; default
    ``len(engines)``)."""
    seeds = request_seeds(params.seed, len(prompts))
    return serve_across(sorted(engines), prompts, params, lambda shares: run_each(
        {m: share_job(engines[m], share, prompts, params, seeds) for m, share in shares.items()}),
        fleet_size or len(engines))


def serve_across(members: Sequence[int], prompts: Sequence[Sequence[int]], params: SamplingParams,
                 run_shares: ShareRunner, fleet_size: int) -> tuple[list[list[Generation]], dict[int, MemberReport]]:
    """:func:`generate_across`'s rounds, wherever the members live: ``run_shares`` serves each
    member's share (prompt positions) and returns each one's :class:`Outcome` (its value: the
    share's generations, per prompt), e.g. from engines driven by other ranks. The same shares and
    outcomes give the same result on every rank that calls it."""
    reports = {i: MemberReport() for i in members}
    if not prompts:
        return [], reports
    work = [request_work(p, params) for p in prompts]
    results: list[Optional[list[Generation]]] = [None] * len(prompts)
    serving = sorted(members)
    pending = list(range(len(prompts)))
    shares = first_shares(serving, prompts, params)
    for m, share in shares.items():
        reports[m].queued_work = sum(work[p] for p in share)
    while True:
        done = run_shares(shares)
        pending = []
        for m in shares:
            outcome = done.get(m) or Outcome(error="its share got no answer")
            report = reports[m]
            report.seconds += outcome.seconds
            if outcome.error is not None:
                report.error = outcome.error
                serving.remove(m)
                pending.extend(shares[m])
                continue
            for p, per_prompt in zip(shares[m], outcome.value):
                results[p] = [_renumbered(g, p) for g in per_prompt]
                report.positions.append(p)
                report.samples += len(per_prompt)
                report.tokens += sum(len(g.token_ids) for g in per_prompt)
        if not pending:
            return results, reports  # type: ignore[return-value]
        if not serving:
            raise MembersFailed({i: r.error for i, r in reports.items() if r.error is not None}, fleet_size)
        pending.sort()
        shares = {m: [pending[i] for i in s] for m, s in assign([work[p] for p in pending], serving).items()}


def _renumbered(g: Generation, prompt_index: int) -> Generation:
    g.prompt_index = prompt_index
    return g


def share_job(engine: RolloutEngine, share: list[int], prompts, params: SamplingParams,
              seeds: Optional[list[int]]) -> Callable[[], list[list[Generation]]]:
    """One member's share as a job for :func:`run_each` (an answer of the wrong shape fails it)."""

    def job() -> list[list[Generation]]:
        got = engine.generate([prompts[p] for p in share], params, None if seeds is None else [seeds[p] for p in share])
        if len(got) != len(share) or any(len(s) != params.n for s in got):
            raise EngineError(f"returned {[len(s) for s in got]} samples for {len(share)} prompts x n={params.n}")
        return got

    return job
