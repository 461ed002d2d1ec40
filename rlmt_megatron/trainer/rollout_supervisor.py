"""The rollout engines, kept alive: started, re-synced and restarted with every rank agreeing.

The run has ``rollout.engines`` engines (one by default), all driven from global rank 0: each
generation's prompts are spread over them by outstanding work (``rollout/fleet.py``), and each
weight sync reaches all of them at once (``rollout/weight_sync/pipeline.py``). Each call here is
collective and ends with rank 0 telling every rank what happened, so all ranks take the same
decision and none waits forever in a collective the others left:

* an engine that fails (``EngineError``: its process died, or did not answer within
  ``rollout.timeout_s``) is marked broken on every rank. In a generation its prompts finish on the
  other engines; in a sync the others still receive the weights, and rank 0 finishes reading the
  export stream first, so the other ranks' gathers complete;
* before the next generation every broken engine is restarted (rank 0 kills what is left of it
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
from typing import Callable, Optional, TypeVar

import torch

from rlmt_megatron.checkpoint.hf_export import buckets_at
from rlmt_megatron.config.rlmt import RolloutConfig
from rlmt_megatron.distributed.collectives import is_rank0, rank0_decides
from rlmt_megatron.rollout.engine import EngineError, RolloutEngine
from rlmt_megatron.rollout.factory import make_rollout_engine
from rlmt_megatron.rollout.fleet import MemberReport, MembersFailed, describe_failures, generate_across, run_each
from rlmt_megatron.rollout.weight_sync.pipeline import SyncTarget, check_verifiable, drain, make_sync_pipeline
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig, make_transport
from rlmt_megatron.trainer import rollout_phase
from rlmt_megatron.trainer.stop import StepAbandoned, StopSignals
from rlmt_megatron.trainer.watchdog import activity

T = TypeVar("T")


class EngineGaveUp(EngineError):
    """Every engine failed more than ``rollout.max_restarts`` times in a row (every rank)."""


class RolloutSupervisor:
    """The run's rollout engines on rank 0, from the ``rollout`` and ``weight_sync`` sections.

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
        # agreed on every rank
        self._broken: dict[int, str] = {}  # engine -> why it must be restarted before the next generation
        self._retired: dict[int, str] = {}  # engine -> why it is no longer restarted
        # rank 0 only
        self.engines: dict[int, RolloutEngine] = {}
        self._targets: dict[int, SyncTarget] = {}
        self._local_errors: dict[int, str] = {}  # failures outside a collective, agreed on at the next one
        self._reports: dict[int, MemberReport] = {}  # the last generation's, per engine
        self._in_flight: Optional[threading.Thread] = None  # a launched generation's thread

    # ---------------------------------------------------------------- agreement

    def _agree(self, doing: str, fn: Callable[[], T]) -> tuple[Optional[T], Optional[EngineError]]:
        """Run ``fn`` on rank 0; every rank returns (its value, None) or (None, rank 0's
        EngineError), or raises StepAbandoned when rank 0 saw a stop request (``rank0_decides``)."""
        try:
            return rank0_decides(fn, doing, shared=(EngineError, StepAbandoned)), None
        except EngineError as e:
            return None, e

    def _failures(self, error: Optional[EngineError], among: list[int]) -> dict[int, str]:
        """Which engines an agreed error concerns: those it names, or all of ``among``."""
        if error is None:
            return {}
        if isinstance(error, MembersFailed):
            return error.failed
        return {i: str(error) for i in among}

    def _serving(self) -> list[int]:
        """Engines that are neither broken nor retired (agreed)."""
        return [i for i in range(self.count) if i not in self._broken and i not in self._retired]

    # ---------------------------------------------------------------- life cycle

    def _build(self, member: int) -> None:
        """Rank 0: a new engine ``member`` and its transport."""
        r = self.rollout
        engine = make_rollout_engine(r, self.model_dir, member=member, **self._engine_args)
        try:
            if self.weight_sync.checksum:
                check_verifiable(engine)
            transport = make_transport(self.weight_sync, engine, r.placement, engine_tp_size=r.engine_tp_size,
                                       base_dir=self.model_dir, disk_dir=str(self.out_dir / "weight_sync"),
                                       member=member if self.count > 1 else None)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                engine.close()
            raise
        self.engines[member] = engine
        self._targets[member] = SyncTarget(transport, engine)
        self._local_errors.pop(member, None)

    def _build_each(self, members: list[int]) -> None:
        """Rank 0: build ``members`` at once (an engine start takes seconds to minutes); raises
        MembersFailed naming those that could not start (the others are kept)."""
        outcomes = run_each({m: functools.partial(self._build, m) for m in members})
        failed = {m: o.error for m, o in outcomes.items() if o.error is not None}
        if failed:
            raise MembersFailed(failed, self.count)

    def start(self, version: int, push: bool) -> None:
        """Start the engines (and push ``version`` of the policy). Collective. A first start that
        fails is a setup problem: raised on every rank, not retried."""
        with activity("starting the rollout engines"):
            _, error = self._agree("starting the rollout engines", lambda: self._build_each(list(range(self.count))))
        if error is not None:
            if is_rank0():
                for member in list(self.engines):
                    self._dispose(member)
            raise EngineError(str(error))
        self.version = self.trainer_version = version
        if push:
            self.push(version)
            if self._broken:
                raise EngineError(f"the first weight sync failed: {describe_failures(self._broken, self.count)}")

    def _dispose(self, member: int) -> None:
        """Rank 0: end engine ``member`` whatever its state (a process is killed, then closed)."""
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
            for member in members:
                self._dispose(member)
            self._build_each(members)

        with activity("restarting the rollout engines"):
            _, error = self._agree("restarting the rollout engines", rebuild)
        failed = self._failures(error, members)
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
        """Sync the policy's weights as ``version`` to every serving engine (or to ``only``).
        Collective. An engine that fails is marked broken (restarted before the next
        generation); it does not raise."""
        if is_rank0() and self.in_flight:
            raise RuntimeError("a weight sync while a launched generation runs: the loop must wait for it first")
        self._release_cached_memory()
        self.version = self.trainer_version = version  # an engine that misses them gets them at its restart
        members = [m for m in (only if only is not None else self._serving()) if m not in self._broken]
        with activity(f"weight sync v{version}"):
            stream = buckets_at(self.policy.built, dst=0, bucket_bytes=self._bucket_bytes)
            if is_rank0():
                _, error = self._agree(f"syncing weights v{version}", lambda: self._push_on_rank0(stream, version, members))
            else:
                drain(stream)  # every rank takes part in the gathers
                _, error = self._agree(f"syncing weights v{version}", lambda: None)
        self._mark_broken(self._failures(error, members))

    def _push_on_rank0(self, stream, version: int, members: list[int]) -> None:
        failed = {m: self._local_errors.pop(m) for m in members if m in self._local_errors}
        failed.update({m: "the rollout engine is not running" for m in members if m not in self.engines})
        targets = {m: self._targets[m] for m in members if m not in failed}
        try:
            self._pipeline.push(stream, version, targets, self.count)  # drains the stream in every case
        except MembersFailed as e:
            failed.update(e.failed)
        if failed:
            raise MembersFailed(failed, self.count)

    def launch(self, prompt_ids: list[list[int]], params) -> "_Pending":
        """Start generating ``prompt_ids`` from the weights the engines hold, in the background on
        rank 0, and return at once (asynchronous rollouts; ``generate(..., pending=)`` waits for
        it). Collective: broken engines are restarted first. No sync may happen until then."""
        while self._broken:
            self._restart_broken()
        pending = _Pending(self, self._serving())
        if is_rank0():
            pending.start(prompt_ids, params)
        return pending

    def generate(self, prompt_ids: list[list[int]], params, pending: Optional["_Pending"] = None) -> list:
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
            source, pending = (pending if pending is not None else _Fleet(self, self._serving())), None
            serving = source.serving
            try:
                rollouts = rollout_phase.generate(source, prompt_ids, params, stop=self.stop)
            except EngineGaveUp:
                raise
            except EngineError as e:  # broadcast by rank 0: the same on every rank
                self._mark_broken(self._failures(e, serving))
                continue
            # engines that failed while the others finished their prompts: restarted before the next generation
            failed, _ = self._agree("collecting the engines' failures", lambda: self._take_generation_failures(source))
            self._mark_broken(failed)
            for member in serving:
                if member not in failed:
                    self.in_a_row[member] = 0
            return rollouts

    @property
    def in_flight(self) -> bool:
        """Rank 0: a launched generation is still running."""
        return self._in_flight is not None and self._in_flight.is_alive()

    def _generate_on_rank0(self, serving: list[int], prompt_ids, params) -> tuple[list, dict[int, MemberReport]]:
        failed = {m: self._local_errors.pop(m) for m in serving if m in self._local_errors}
        ready = {m: self.engines[m] for m in serving if m not in failed and m in self.engines}
        if not ready:
            raise MembersFailed(failed or {m: "the rollout engine is not running" for m in serving}, self.count)
        try:
            generations, reports = generate_across(ready, prompt_ids, params, fleet_size=self.count)
        except MembersFailed as e:
            raise MembersFailed({**failed, **e.failed}, self.count) from None
        self._local_errors.update(failed)  # reported with the engines that failed in the generation
        return generations, reports

    def _take_generation_failures(self, source: "_Fleet") -> dict[int, str]:
        """Rank 0, after a generation: its per-engine reports become the step's metrics; the
        engines that failed in it (and any failure met outside a collective) are returned."""
        self._reports = source.reports
        failed = {m: r.error for m, r in self._reports.items() if r.error is not None}
        failed.update({m: self._local_errors.pop(m) for m in list(self._local_errors)})
        return failed

    def metrics(self) -> dict[str, float]:
        """Rank 0: each engine's part in the last generation waited for (``docs/metrics.md``)."""
        out = {"engines/serving": float(self.count - len(self._retired) - len(self._broken))}
        for member in range(self.count):
            report = self._reports.get(member, MemberReport())
            out[f"engines/{member}/prompts"] = float(report.prompts)
            out[f"engines/{member}/queued_tokens"] = float(report.queued_work)
            out[f"engines/{member}/tokens_per_s"] = report.tokens_per_s
            out[f"engines/{member}/restarts"] = float(self.member_restarts[member])
        return out

    def sleep(self) -> None:
        """Colocated engines free their memory for training (rank 0; no collective: a failure is
        agreed on at the next sync or generation)."""
        if self.rollout.placement != "colocated":
            return
        for member, engine in self.engines.items():
            try:
                engine.sleep()
            except EngineError as e:
                self._local_errors[member] = str(e)

    def close(self) -> None:
        """Rank 0: close the engines (killed if broken or interrupted)."""
        # a generation still running (the run ended between launch and wait) cannot be closed politely
        interrupted = (self.stop is not None and self.stop.requested) or self.in_flight
        for member in list(self.engines):
            if interrupted or member in self._broken or member in self._local_errors:
                self._dispose(member)
                continue
            engine, target = self.engines.pop(member), self._targets.pop(member)
            try:
                engine.close()
                target.transport.close()
            except Exception:  # closing must not hide why the run ends
                self.engines[member], self._targets[member] = engine, target
                self._dispose(member)


class _Fleet:
    """What ``rollout_phase.generate`` calls on rank 0: the serving engines as one."""

    def __init__(self, supervisor: RolloutSupervisor, serving: list[int]):
        self.supervisor = supervisor
        self.serving = serving
        self.reports: dict[int, MemberReport] = {}

    def generate(self, prompt_ids, params):
        generations, self.reports = self.supervisor._generate_on_rank0(self.serving, prompt_ids, params)
        return generations


class _Pending(_Fleet):
    """A generation launched in the background on rank 0; its ``generate`` waits for the result
    (in short joins, so a stop signal can interrupt the wait)."""

    def start(self, prompt_ids, params) -> None:
        self._outcome: list = []

        def run():
            try:
                self._outcome.append(("value", super(_Pending, self).generate(prompt_ids, params)))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self._outcome.append(("error", e))

        thread = threading.Thread(target=run, daemon=True, name="launched-rollout")
        self.supervisor._in_flight = thread
        thread.start()

    def generate(self, prompt_ids, params):
        thread = self.supervisor._in_flight
        while thread.is_alive():
            thread.join(0.5)
        kind, value = self._outcome[0]
        if kind == "error":
            raise value
        return value
