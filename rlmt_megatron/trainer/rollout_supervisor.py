"""The rollout engines, kept alive: started, re-synced and restarted with every rank agreeing.

The run has ``rollout.engines`` engines (one by default), spread over the nodes and each driven by
its node's host rank (``trainer/engine_hosts.py``): each generation's prompts are spread over them
by outstanding work (``rollout/fleet.py``), each host running its engines' share, and each weight
sync reaches all of them at once, every host fed by its own replica's stage owners
(``hf_export.buckets_for``) and fanning out to its engines (``rollout/weight_sync/pipeline.py``);
with disaggregated SGLang at PP > 1 each stage's owner sends its own layers to the engines and
the host only opens and closes their sessions (``rollout/weight_sync/stage_groups.py``).
Each call here is collective and ends with every rank learning what happened on every host
(``each_rank_reports``), so all ranks take the same decision and none waits forever in a
collective the others left:

* an engine that fails (``EngineError``: its process died, or did not answer within
  ``rollout.timeout_s``) is marked broken on every rank. In a generation its prompts finish on the
  other engines (on any node); in a sync the others still receive the weights, and its host
  finishes reading the export stream first, so the other ranks' gathers and sends complete;
* before the next generation every broken engine is restarted (its host kills what is left of it
  and builds a new one with ``make_rollout_engine`` and a new transport) and the current weights
  are pushed to it alone; when no engine could finish a generation it is retried (same prompts,
  same seed) once they are restarted;
* an engine that failed ``rollout.max_restarts`` + 1 times in a row without a successful
  generation is retired for the rest of the run (the others serve on); when none is left the run
  gives up with :class:`EngineGaveUp` (the loop then checkpoints and exits).

Bounded detection needs engines in their own processes (``SubprocessEngine``: vLLM, or the hf
engine with ``rollout.engine_process: subprocess``) or servers (SGLang). The inline hf engine
shares the trainer's process: its errors are retried the same way, but a hang is only reported
by the watchdog. An SGLang "restart" connects a new client (and weight-update group) to the same
server URL: whoever runs the server restarts the server itself. ``rollout/restarts`` counts
restarts over the whole run (kept in checkpoints); ``engines/<i>/...`` are each engine's metrics.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from rlmt_megatron.checkpoint.hf_export import buckets_for, buckets_on_every_rank, stage_buckets
from rlmt_megatron.config.rlmt import RolloutConfig
from rlmt_megatron.distributed.collectives import each_rank_reports, is_rank0, world_rank
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.engine import EngineError, RolloutEngine
from rlmt_megatron.rollout.factory import make_rollout_engine
from rlmt_megatron.rollout.fleet import (MemberReport, MembersFailed, Outcome, describe_failures, first_shares,
                                         request_seeds, run_each, serve_across, share_job)
from rlmt_megatron.rollout.weight_sync.pipeline import SyncTarget, check_verifiable, drain, make_sync_pipeline
from rlmt_megatron.rollout.weight_sync.same_gpu_ipc import NodeFeeds, node_feeds
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig, fed_from_each_gpu, make_transport, sent_by_stage
from rlmt_megatron.rollout.weight_sync.stage_groups import StageSenders
from rlmt_megatron.trainer.engine_hosts import EngineHosts, find_engine_hosts
from rlmt_megatron.trainer.experience import Rollout
from rlmt_megatron.trainer.stop import Interrupted, StepAbandoned, StopSignals
from rlmt_megatron.trainer.watchdog import activity


class EngineGaveUp(EngineError):
    """Every engine failed more than ``rollout.max_restarts`` times in a row (every rank)."""


class RolloutSupervisor:
    """The run's rollout engines, each on its host rank, from the ``rollout`` and ``weight_sync``
    sections.

    ``follows_policy``: the engines are synced after every update (False for one_round DPO, which
    samples from the initial model for the whole run: never synced, nor re-synced after a
    restart). ``engine_dtype``, ``max_model_len``, ``seed``: what the engines are built with
    (``rollout/factory.py``). ``restarts``: restarts over the run so far (from a checkpoint), in
    total and, when known, per engine."""

    def __init__(self, rollout: RolloutConfig, weight_sync: WeightSyncConfig, policy, model_dir: str, out_dir: Path,
                 stop: Optional[StopSignals], restarts: int, *, follows_policy: bool, engine_dtype: str,
                 max_model_len: int, seed: int, member_restarts: Optional[list[int]] = None):
        self.rollout = rollout
        self.weight_sync = weight_sync
        self.policy = policy
        self.model_dir = model_dir
        self.out_dir = Path(out_dir)
        self.stop = stop
        self.count = rollout.engines
        self.restarts = restarts  # over the whole run, checkpointed
        known = list(member_restarts or [])[: self.count]
        self.member_restarts = known + [0] * (self.count - len(known))  # per engine, over the run
        self.in_a_row = [0] * self.count  # per engine: restarts since its last successful generation
        self.follows_policy = follows_policy
        self._engine_args = dict(dtype=engine_dtype, max_model_len=max_model_len, seed=seed)
        self.version = 0  # the weights the engines hold (or get at their restart)
        # The trainer's weights now (the loop sets it after each update): ahead of ``version``
        # while asynchronous rollouts let the engines lag behind.
        self.trainer_version = 0
        self._pipeline = make_sync_pipeline(weight_sync, rollout.engine)
        self._bucket_bytes = weight_sync.bucket_mb * 2**20
        self.hosts: Optional[EngineHosts] = None  # found at start()
        # agreed on every rank
        self._broken: dict[int, str] = {}  # engine -> why it must be restarted before the next generation
        self._retired: dict[int, str] = {}  # engine -> why it is no longer restarted
        self._reports: dict[int, MemberReport] = {}  # the last generation's, per engine
        # this rank's own engines (those it hosts)
        self.engines: dict[int, RolloutEngine] = {}
        self._targets: dict[int, SyncTarget] = {}
        self._local_errors: dict[int, str] = {}  # failures outside a collective, agreed on at the next one
        self._in_flight: Optional[threading.Thread] = None  # a launched generation's thread
        # Disaggregated SGLang with PP > 1: this rank's senders of its own stage (stage_groups.py),
        # and the engines every stage owner has joined (agreed)
        self._stage_senders: Optional[StageSenders] = None
        self._joined: set[int] = set()
        # Colocated SGLang by CUDA IPC with PP = 1: this node's part of a sync fed from every GPU
        self._node_feeds: Optional[NodeFeeds] = None

    # ---------------------------------------------------------------- agreement

    def _mine(self, members) -> list[int]:
        """Those of ``members`` this rank hosts."""
        rank = world_rank()
        return [m for m in members if self.hosts.host[m] == rank]

    def _agree(self, doing: str, fn: Callable[[], object], among: list[int]) -> tuple[list, dict[int, str]]:
        """Run ``fn`` on every rank (each acting on the engines it hosts); every rank returns the
        ranks' values and the engines of ``among`` any host reported failed (its ``MembersFailed``,
        or any other ``EngineError`` for all its engines among them), or raises StepAbandoned when
        any rank saw a stop request."""
        outcomes = each_rank_reports(fn, doing, shared=(EngineError, StepAbandoned))
        if any(kind == "shared" and isinstance(payload, StepAbandoned) for kind, payload in outcomes):
            raise StepAbandoned()
        values, failed = [], {}
        for rank, (kind, payload) in enumerate(outcomes):
            if kind == "value":
                values.append(payload)
            elif isinstance(payload, MembersFailed):
                failed.update(payload.failed)
            else:
                failed.update({m: str(payload) for m in among if self.hosts.host[m] == rank})
        return values, failed

    def _serving(self) -> list[int]:
        """Engines that are neither broken nor retired (agreed)."""
        return [i for i in range(self.count) if i not in self._broken and i not in self._retired]

    # ---------------------------------------------------------------- life cycle

    def _build(self, member: int) -> None:
        """A new engine ``member`` (hosted here) and its transport."""
        r = self.rollout
        engine = make_rollout_engine(r, self.model_dir, member=member, slot=self.hosts.slot[member],
                                     **self._engine_args)
        try:
            if self.weight_sync.checksum:
                check_verifiable(engine)
            # fed by the stage owners or from every GPU: the engine's own transport would go unused
            transport = None if self._stage_senders is not None or self._node_feeds is not None else make_transport(
                self.weight_sync, engine, r.placement, engine_tp_size=r.engine_tp_size, base_dir=self.model_dir,
                disk_dir=str(self.out_dir / "weight_sync"), member=member if self.count > 1 else None)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                engine.close()
            raise
        self.engines[member] = engine
        self._targets[member] = SyncTarget(transport, engine)
        self._local_errors.pop(member, None)

    def _build_each(self, members: list[int]) -> None:
        """Build those of ``members`` hosted here, at once (an engine start takes seconds to
        minutes); raises MembersFailed naming those that could not start (the others are kept)."""
        mine = self._mine(members)
        if not mine:
            return
        outcomes = run_each({m: functools.partial(self._build, m) for m in mine})
        failed = {m: o.error for m, o in outcomes.items() if o.error is not None}
        if failed:
            raise MembersFailed(failed, self.count)

    def start(self, version: int, push: bool) -> None:
        """Find the engines' hosts, start the engines (and push ``version`` of the policy).
        Collective. A first start that fails is a setup problem: raised on every rank, not retried."""
        self.hosts = find_engine_hosts(self.count)
        if self.hosts.stages > 1 and sent_by_stage(self.weight_sync, self.rollout.engine, self.rollout.placement):
            self._stage_senders = StageSenders(self.rollout, self.weight_sync, self.hosts.layout.stage[world_rank()],
                                               self.hosts.stages)
        r = self.rollout
        if self.hosts.stages == 1 and fed_from_each_gpu(self.weight_sync, r.engine, r.placement):
            self._node_feeds = node_feeds(self.hosts, r.engine_tp_size, self.count)
        senders = set(self.hosts.node.values())
        if self._stage_senders is not None:
            senders |= self.hosts.sender_nodes(range(self.count))
        if self.weight_sync.master_address and len(senders) > 1:
            raise RLMTError(f"weight_sync.master_address={self.weight_sync.master_address} is one address, but the "
                            f"rollout engines are synced from {len(senders)} nodes ({self.hosts.describe()}"
                            f"{'; every pipeline stage sends its own layers' if self._stage_senders else ''}); "
                            "leave it unset: each sender uses its own")
        if self.count > 1 and is_rank0():
            print(f"rollout engines: {self.hosts.describe()}", flush=True)
        everyone = list(range(self.count))
        with activity("starting the rollout engines"):
            _, failed = self._agree("starting the rollout engines", lambda: self._build_each(everyone), everyone)
        if failed:
            for member in list(self.engines):
                self._dispose(member)
            raise EngineError(describe_failures(failed, self.count))
        self.version = self.trainer_version = version
        if push:
            self.push(version)
            if self._broken:
                raise EngineError(f"the first weight sync failed: {describe_failures(self._broken, self.count)}")

    def _dispose(self, member: int) -> None:
        """End engine ``member`` (hosted here) whatever its state (a process is killed, then closed)."""
        engine = self.engines.pop(member, None)
        target = self._targets.pop(member, None)
        if target is not None:
            with contextlib.suppress(Exception):
                target.transport.close()
        if engine is None:
            return
        pid = getattr(engine, "pid", None)  # SubprocessEngine: its child process
        if pid is not None and engine.health():
            with contextlib.suppress(Exception):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while engine.health() and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(Exception):
            engine.close()

    def _name(self, member: int) -> str:
        return "the rollout engine" if self.count == 1 else f"rollout engine {member}"

    def _mark_broken(self, failed: dict[int, str]) -> None:
        for member, reason in sorted(failed.items()):
            if member in self._retired:
                continue
            self._broken[member] = reason
            if is_rank0():
                print(f"{self._name(member)} failed: {reason}", file=sys.stderr, flush=True)

    def _restart_broken(self) -> None:
        """Restart every broken engine and push it the current weights; retire the ones out of
        restarts. Collective (``_broken`` is agreed)."""
        max_restarts = self.rollout.max_restarts
        for member in sorted(self._broken):
            if self.in_a_row[member] >= max_restarts:
                self._retired[member] = self._broken.pop(member)
                if self.count > 1 and is_rank0():
                    print(f"rollout engine {member} failed {self.in_a_row[member] + 1} times in a row "
                          f"(rollout.max_restarts={max_restarts}): retired, {self.count - len(self._retired)} of "
                          f"{self.count} engines serve on", file=sys.stderr, flush=True)
        if len(self._retired) == self.count:
            if self.count == 1:
                raise EngineGaveUp(f"the rollout engine failed {self.in_a_row[0] + 1} times in a row "
                                   f"(rollout.max_restarts={max_restarts}); last error: {self._retired[0]}")
            raise EngineGaveUp(f"every rollout engine failed {max_restarts + 1} times in a row "
                               f"(rollout.max_restarts={max_restarts}); last errors: "
                               f"{describe_failures(self._retired, self.count)}")
        members = sorted(self._broken)
        if not members:
            return
        for member in members:
            self.restarts += 1
            self.member_restarts[member] += 1
            self.in_a_row[member] += 1
            if is_rank0():
                print(f"restarting {self._name(member)} ({self.in_a_row[member]}/{max_restarts} in a row, "
                      f"{self.restarts} in this run)", file=sys.stderr, flush=True)

        def rebuild():
            if self.stop is not None and self.stop.requested:
                raise StepAbandoned()
            if self._stage_senders is not None:  # a restarted engine gets new groups
                self._stage_senders.drop(members)
            for member in self._mine(members):
                self._dispose(member)
            self._build_each(members)

        self._joined.difference_update(members)

        with activity("restarting the rollout engines"):
            _, failed = self._agree("restarting the rollout engines", rebuild, members)
        for member in members:
            if member in failed:
                self._broken[member] = failed[member]
            else:
                del self._broken[member]
        restarted = [m for m in members if m not in failed]
        if self.follows_policy and restarted:
            # The export gives the trainer's weights as they are now. When the other engines hold
            # older ones (asynchronous rollouts), every engine gets the new ones, so that all serve
            # the same weights under one version.
            if self.trainer_version != self.version:
                self.push(self.trainer_version)
            else:
                self.push(self.version, only=restarted)

    # ---------------------------------------------------------------- the loop's calls

    def _release_cached_memory(self) -> None:
        """Colocated on a GPU: hand the trainer's cached-but-free blocks (the activation and
        logits peaks of the update) back to the driver, so that the engines, separate
        allocators, can take them when they wake for the sync and the rollout."""
        if self.rollout.placement == "colocated" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def push(self, version: int, only: Optional[list[int]] = None) -> None:
        """Sync the policy's weights as ``version`` to every serving engine (or to ``only``): each
        host gets them from its own replica and hands them to its engines at once. Collective. An
        engine that fails is marked broken (restarted before the next generation); it does not
        raise."""
        if self.in_flight:
            raise RuntimeError("a weight sync while a launched generation runs: the loop must wait for it first")
        self._release_cached_memory()
        self.version = self.trainer_version = version  # an engine that misses them gets them at its restart
        members = [m for m in (only if only is not None else self._serving()) if m not in self._broken]
        with activity(f"weight sync v{version}"):
            if self._stage_senders is not None:
                failed = self._push_by_stage(version, members)
            elif self._node_feeds is not None:
                failed = self._push_from_each_gpu(version, members)
            else:
                stream = buckets_for(self.policy.built, self.hosts.feeds(members), bucket_bytes=self._bucket_bytes)
                _, failed = self._agree(f"syncing weights v{version}",
                                        lambda: self._push_mine(stream, version, self._mine(members)), members)
        self._mark_broken(failed)

    def _push_by_stage(self, version: int, members: list[int]) -> dict[int, str]:
        """``push`` when each pipeline stage's owner broadcasts its own layers (steps in
        ``rollout/weight_sync/stage_groups.py``); the engines that failed, and why."""
        senders, rank = self._stage_senders, world_rank()
        failed: dict[int, str] = {}
        joining = [m for m in members if m not in self._joined]
        if joining:
            _, failed = self._agree("joining the weight-update groups",
                                    lambda: senders.join(self.hosts.fed_by(rank, joining)), joining)
            self._joined.update(m for m in joining if m not in failed)

        def send(going):
            stream = stage_buckets(self.policy.built, {self.hosts.feeding(m) for m in going}, self._bucket_bytes)
            senders.push(stream, version, self.hosts.fed_by(rank, going), self._pipeline)

        failed.update(self._push_in_sessions(version, [m for m in members if m not in failed], send))
        return failed

    def _push_from_each_gpu(self, version: int, members: list[int]) -> dict[int, str]:
        """``push`` when each server TP rank is fed from the trainer rank on its GPU (steps in
        ``rollout/weight_sync/same_gpu_ipc.py``); the engines that failed, and why."""
        here = self.hosts.rank_node[world_rank()]

        def send(going):
            stream = buckets_on_every_rank(self.policy.built, self._bucket_bytes)
            if self._pipeline.quantize is not None:
                stream = self._pipeline.quantize(stream)
            if not any(self.hosts.node[m] == here for m in going):
                return drain(stream)  # this node's ranks take part in the TP gathers only
            mine = self._mine(going)
            lost = self._node_feeds.push(stream, version, {m: self.engines[m] for m in mine})
            if lost and mine:
                raise MembersFailed(lost, self.count)

        return self._push_in_sessions(version, members, send)

    def _push_in_sessions(self, version: int, members: list[int], send: Callable[[list[int]], object]
                          ) -> dict[int, str]:
        """A sync whose buckets other ranks than the hosts send: each host opens its engines'
        weight-update sessions, every rank runs ``send(going)`` (raising ``MembersFailed`` for the
        engines it lost), and the hosts close the sessions (quietly on the engines lost). Returns
        the engines that failed, and why."""
        _, failed = self._agree(f"opening weight-update sessions v{version}",
                                lambda: self._each_mine(members, lambda engine, member: engine.open_weight_update()),
                                members)
        going = [m for m in members if m not in failed]
        _, lost = self._agree(f"syncing weights v{version}", lambda: send(going), going)
        failed.update(lost)

        def close(engine, member):
            engine.close_weight_update(version, complete=member not in lost)

        _, more = self._agree(f"closing weight-update sessions v{version}", lambda: self._each_mine(going, close), going)
        failed.update({m: why for m, why in more.items() if m not in failed})
        return failed

    def _each_mine(self, members: list[int], act: Callable[[RolloutEngine, int], object]) -> None:
        """``act(engine, member)`` on each of this rank's engines of ``members``; raises
        ``MembersFailed`` naming those that failed or are unavailable."""
        mine = self._mine(members)
        failed = self._unavailable(mine)
        for member in mine:
            if member in failed:
                continue
            try:
                act(self.engines[member], member)
            except EngineError as e:
                failed[member] = str(e)
        if failed:
            raise MembersFailed(failed, self.count)

    def _unavailable(self, mine: list[int]) -> dict[int, str]:
        """Those of this rank's engines ``mine`` that cannot take part, and why: a failure met
        outside a collective (taken: it is reported now), or no engine running."""
        out = {m: self._local_errors.pop(m) for m in mine if m in self._local_errors}
        out.update({m: "the rollout engine is not running" for m in mine if m not in self.engines and m not in out})
        return out

    def _push_mine(self, stream, version: int, mine: list[int]) -> None:
        """This rank's part of a sync: deliver the stream to its engines of ``mine`` (or only walk
        it, taking part in the export, when it hosts none of them)."""
        failed = self._unavailable(mine)
        targets = {m: self._targets[m] for m in mine if m not in failed}
        try:
            self._pipeline.push(stream, version, targets, self.count)  # drains the stream in every case
        except MembersFailed as e:
            failed.update(e.failed)
        if failed:
            raise MembersFailed(failed, self.count)

    def _run_mine(self, shares: Mapping[int, list[int]], prompt_ids, params) -> dict[int, Outcome]:
        """Serve this rank's engines' shares (prompt positions) in this thread; a member that
        failed outside a collective (while asleep) fails its share at once."""
        mine = self._mine(shares)
        seeds = request_seeds(params.seed, len(prompt_ids))
        outcomes = {m: Outcome(error=why) for m, why in self._unavailable(mine).items()}
        jobs = {m: share_job(self.engines[m], shares[m], prompt_ids, params, seeds) for m in mine if m not in outcomes}
        if jobs:
            outcomes.update(run_each(jobs))
        return outcomes

    def _wait_mine(self, shares: Mapping[int, list[int]], serve: Callable[[], dict[int, Outcome]]
                   ) -> dict[int, Outcome]:
        """This rank's share outcomes from ``serve``, under the stop signals when it hosts engines
        with a share: a stop while waiting for them (or an engine failure after one, since SLURM's
        SIGTERM reaches the engines' processes too) abandons the step."""
        if not self._mine(shares):
            return serve()
        try:
            with activity("engine generate"), (self.stop.interruptible() if self.stop is not None
                                               else contextlib.nullcontext()):
                outcomes = serve()
        except Interrupted:
            raise StepAbandoned() from None
        if self.stop is not None and self.stop.requested and any(o.error for o in outcomes.values()):
            raise StepAbandoned()
        return outcomes

    def _gather_outcomes(self, shares: Mapping[int, list[int]], serve: Callable[[], dict[int, Outcome]]
                         ) -> dict[int, Outcome]:
        """Every share's outcome on every rank (each host serves its own with ``serve``)."""
        values, failed = self._agree("generating rollouts", lambda: self._wait_mine(shares, serve), list(shares))
        outcomes = {m: o for per_rank in values for m, o in per_rank.items()}
        outcomes.update({m: Outcome(error=why) for m, why in failed.items()})
        return outcomes

    def launch(self, prompt_ids: list[list[int]], params) -> "_Launched":
        """Start generating ``prompt_ids`` from the weights the engines hold, in the background on
        each host, and return at once (asynchronous rollouts; ``generate(..., pending=)`` waits
        for it). Collective: broken engines are restarted first. No sync may happen until then."""
        while self._broken:
            self._restart_broken()
        serving = self._serving()
        launched = _Launched(serving, first_shares(serving, prompt_ids, params))
        if self._mine(launched.shares):
            launched.start(lambda: self._run_mine(launched.shares, prompt_ids, params))
            self._in_flight = launched.thread
        return launched

    def generate(self, prompt_ids: list[list[int]], params, pending: Optional["_Launched"] = None) -> list[Rollout]:
        """Rollouts for ``prompt_ids`` (same list on every rank), restarting engines as needed;
        ``pending``: the launched generation of these prompts, waited for first (when it failed,
        they are generated again). Raises StepAbandoned (stop request) or EngineGaveUp on every
        rank alike."""
        self._release_cached_memory()
        while True:
            if self._broken:
                self._restart_broken()
                pending = None
                continue
            serving = pending.serving if pending is not None else self._serving()
            launched, pending = pending, None

            def run_shares(shares):
                nonlocal launched
                if launched is not None:  # the first round, started at launch
                    first, launched = launched, None
                    return self._gather_outcomes(shares, first.wait)
                return self._gather_outcomes(shares, lambda: self._run_mine(shares, prompt_ids, params))

            with contextlib.nullcontext() if self._mine(serving) else activity("waiting for the hosts' rollouts"):
                try:
                    generations, self._reports = serve_across(serving, prompt_ids, params, run_shares, self.count)
                except MembersFailed as e:  # every serving engine failed: restarted, and the prompts retried
                    self._mark_broken(e.failed)
                    continue
            failed = {m: r.error for m, r in self._reports.items() if r.error is not None}
            self._mark_broken(failed)  # restarted before the next generation
            for member in serving:
                if member not in failed:
                    self.in_a_row[member] = 0
            return _rollouts(generations, prompt_ids, params.n)

    @property
    def in_flight(self) -> bool:
        """A launched generation is still running on this rank's engines."""
        return self._in_flight is not None and self._in_flight.is_alive()

    def metrics(self) -> dict[str, float]:
        """Each engine's part in the last generation waited for (``docs/metrics.md``; the same on
        every rank)."""
        out = {"engines/serving": float(self.count - len(self._retired) - len(self._broken))}
        for member in range(self.count):
            report = self._reports.get(member, MemberReport())
            out[f"engines/{member}/prompts"] = float(report.prompts)
            out[f"engines/{member}/queued_tokens"] = float(report.queued_work)
            out[f"engines/{member}/tokens_per_s"] = report.tokens_per_s
            out[f"engines/{member}/restarts"] = float(self.member_restarts[member])
        return out

    def sleep(self) -> None:
        """Colocated engines free their memory for training (each host its own; no collective: a
        failure is agreed on at the next sync or generation)."""
        if self.rollout.placement != "colocated":
            return
        for member, engine in self.engines.items():
            try:
                engine.sleep()
            except EngineError as e:
                self._local_errors[member] = str(e)

    def close(self) -> None:
        """Close this rank's engines (killed if broken or interrupted). Every rank calls it."""
        # a generation still running (the run ended between launch and wait) cannot be closed politely
        interrupted = (self.stop is not None and self.stop.requested) or self.in_flight
        if self._stage_senders is not None:
            self._stage_senders.close()
        for member in list(self.engines):
            if interrupted or member in self._broken or member in self._local_errors:
                self._dispose(member)
                continue
            engine, target = self.engines.pop(member), self._targets.pop(member)
            try:
                engine.close()
                if target.transport is not None:
                    target.transport.close()
            except Exception:  # closing must not hide why the run ends
                self.engines[member], self._targets[member] = engine, target
                self._dispose(member)


def _rollouts(generations, prompt_ids: list[list[int]], n: int) -> list[Rollout]:
    """The generations (prompt-major, ``n`` per prompt) as the step's rollouts."""
    samples = [g for per_prompt in generations for g in per_prompt]
    if len(samples) != len(prompt_ids) * n:
        raise EngineError(f"rollout engine returned {len(samples)} samples for {len(prompt_ids)} prompts x n={n}")
    return [Rollout(g.prompt_index, list(prompt_ids[g.prompt_index]), list(g.token_ids), list(g.logprobs),
                    g.finish_reason, g.weight_version) for g in samples]


class _Launched:
    """A generation's first round, launched in the background on each host (asynchronous
    rollouts): ``serving`` and ``shares`` are agreed on every rank; ``wait`` gives this host's
    outcomes (in short joins, so a stop signal can interrupt the wait)."""

    def __init__(self, serving: list[int], shares: dict[int, list[int]]):
        self.serving = serving
        self.shares = shares
        self.thread: Optional[threading.Thread] = None
        self._outcome: list = []

    def start(self, serve: Callable[[], dict[int, Outcome]]) -> None:
        def run():
            try:
                self._outcome.append(("value", serve()))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self._outcome.append(("error", e))

        self.thread = threading.Thread(target=run, daemon=True, name="launched-rollout")
        self.thread.start()

    def wait(self) -> dict[int, Outcome]:
        if self.thread is None:  # this rank hosts none of the serving engines
            return {}
        while self.thread.is_alive():
            self.thread.join(0.5)
        kind, value = self._outcome[0]
        if kind == "error":
            raise value
        return value
