"""The rollout engine, kept alive: started, re-synced and restarted with every rank agreeing.

The engine lives on global rank 0. Each call here is collective and ends with rank 0 telling
every rank what happened, so all ranks take the same decision and none waits forever in a
collective the others left:

* a failed generation or weight sync (``EngineError``: the engine process died, or did not
  answer within ``rollout.timeout_s``) marks the engine broken on every rank; rank 0 finishes
  reading the export stream first, so the other ranks' gathers complete;
* before the next generation the engine is restarted (rank 0 kills what is left of it and
  builds a new one with ``make_rollout_engine`` and a new transport), the current weights are
  pushed again, and the generation is retried (same prompts, same seed);
* after ``rollout.max_restarts`` restarts in a row without a successful generation it gives up
  with :class:`EngineGaveUp` (the loop then checkpoints and exits).

Bounded detection needs an engine in its own process (``SubprocessEngine``: vLLM, or the hf
engine with ``rollout.engine_process: subprocess``) or a server (SGLang). The inline hf engine
shares the trainer's process: its errors are retried the same way, but a hang is only reported
by the watchdog. An SGLang "restart" connects a new client (and weight-update group) to the same
``rollout.sglang_url``: whoever runs the server restarts the server itself. ``rollout/restarts``
counts restarts over the whole run (kept in checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from rlmt_megatron.checkpoint.hf_export import buckets_at
from rlmt_megatron.config.rlmt import RolloutConfig
from rlmt_megatron.distributed.collectives import is_rank0, rank0_decides
from rlmt_megatron.rollout.engine import EngineError, RolloutEngine
from rlmt_megatron.rollout.factory import make_rollout_engine
from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline, drain, make_sync_pipeline
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig
from rlmt_megatron.trainer import rollout_phase
from rlmt_megatron.trainer.stop import StepAbandoned, StopSignals
from rlmt_megatron.trainer.watchdog import activity


class EngineGaveUp(EngineError):
    """The engine failed more than ``rollout.max_restarts`` times in a row (every rank)."""


class RolloutSupervisor:
    """The run's rollout engine on rank 0, from the ``rollout`` and ``weight_sync`` sections.

    ``follows_policy``: the engine is synced after every update (False for one_round DPO, which
    samples from the initial model for the whole run: never synced, nor re-synced after a
    restart). ``engine_dtype``, ``max_model_len``, ``seed``: what the engine is built with
    (``rollout/factory.py``)."""

    def __init__(self, rollout: RolloutConfig, weight_sync: WeightSyncConfig, policy, model_dir: str, out_dir: Path,
                 stop: Optional[StopSignals], restarts: int, *, follows_policy: bool, engine_dtype: str,
                 max_model_len: int, seed: int):
        self.rollout = rollout
        self.weight_sync = weight_sync
        self.policy = policy
        self.model_dir = model_dir
        self.out_dir = Path(out_dir)
        self.stop = stop
        self.restarts = restarts  # over the whole run, checkpointed
        self.in_a_row = 0  # restarts since the last successful generation
        self.follows_policy = follows_policy
        self._engine_args = dict(dtype=engine_dtype, max_model_len=max_model_len, seed=seed)
        self.version = 0
        self.engine: Optional[RolloutEngine] = None  # rank 0 only
        self._bucket_bytes = weight_sync.bucket_mb * 2**20
        self._sync: Optional[SyncPipeline] = None  # rank 0: the engine's sync pipeline (its transport holds groups, files)
        self._broken: Optional[str] = None  # agreed on every rank: why the engine must be restarted
        self._local_error: Optional[str] = None  # rank 0: a failure the others learn at the next collective

    # ---------------------------------------------------------------- agreement

    def _agree(self, doing: str, fn: Callable[[], None]) -> Optional[str]:
        """Run ``fn`` on rank 0; every rank returns rank 0's EngineError message (or None), or
        raises StepAbandoned when rank 0 saw a stop request (``rank0_decides``)."""
        try:
            rank0_decides(fn, doing, shared=(EngineError, StepAbandoned))
        except EngineError as e:
            return str(e)
        return None

    # ---------------------------------------------------------------- life cycle

    def _build(self) -> None:
        """Rank 0: a new engine and its sync pipeline."""
        r = self.rollout
        engine = make_rollout_engine(r, self.model_dir, **self._engine_args)
        try:
            sync = make_sync_pipeline(self.weight_sync, engine, r.engine, r.placement, engine_tp_size=r.engine_tp_size,
                                      base_dir=self.model_dir, disk_dir=str(self.out_dir / "weight_sync"))
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                engine.close()
            raise
        self.engine, self._sync, self._local_error = engine, sync, None

    def start(self, version: int, push: bool) -> None:
        """Start the engine (and push ``version`` of the policy). Collective. A first start that
        fails is a setup problem: raised on every rank, not retried."""
        with activity("starting the rollout engine"):
            error = self._agree("starting the rollout engine", self._build)
        if error is not None:
            raise EngineError(error)
        self.version = version
        if push:
            self.push(version)
            if self._broken is not None:
                raise EngineError(f"the first weight sync failed: {self._broken}")

    def _dispose(self) -> None:
        """Rank 0: end the engine whatever its state (a process is killed, then closed)."""
        engine, self.engine = self.engine, None
        sync, self._sync = self._sync, None
        if sync is not None:
            with contextlib.suppress(Exception):
                sync.close()
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

    def _mark_broken(self, reason: str) -> None:
        self._broken = reason
        if is_rank0():
            print(f"rollout engine failed: {reason}", file=sys.stderr, flush=True)

    def _restart(self) -> None:
        max_restarts = self.rollout.max_restarts
        if self.in_a_row >= max_restarts:
            raise EngineGaveUp(f"the rollout engine failed {self.in_a_row + 1} times in a row "
                               f"(rollout.max_restarts={max_restarts}); last error: {self._broken}")
        self.restarts += 1
        self.in_a_row += 1
        if is_rank0():
            print(f"restarting the rollout engine ({self.in_a_row}/{max_restarts} in a row, {self.restarts} in this run)",
                  file=sys.stderr, flush=True)

        def rebuild():
            if self.stop is not None and self.stop.requested:
                raise StepAbandoned()
            self._dispose()
            self._build()

        with activity("restarting the rollout engine"):
            error = self._agree("restarting the rollout engine", rebuild)
        if error is not None:
            self._broken = error
            return
        self._broken = None
        if self.follows_policy:
            self.push(self.version)

    # ---------------------------------------------------------------- the loop's calls

    def _release_cached_memory(self) -> None:
        """Colocated on a GPU: hand the trainer's cached-but-free blocks (the activation and
        logits peaks of the update) back to the driver, so that the engine, a separate
        allocator, can take them when it wakes for the sync and the rollout."""
        if self.rollout.placement == "colocated" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def push(self, version: int) -> None:
        """Sync the policy's weights as ``version``. Collective. A failure marks the engine broken
        (restarted before the next generation); it does not raise."""
        self._release_cached_memory()
        with activity(f"weight sync v{version}"):
            stream = buckets_at(self.policy.built, dst=0, bucket_bytes=self._bucket_bytes)
            if is_rank0() and self.engine is not None and self._broken is None and self._local_error is None:
                error = self._agree(f"syncing weights v{version}", lambda: self._sync.push(stream, version))
            else:
                drain(stream)  # every rank takes part in the gathers
                error = self._agree(f"syncing weights v{version}", self._raise_local_error)
        if error is not None:
            self._mark_broken(error)
        else:
            self.version = version

    def _raise_local_error(self) -> None:
        if self._broken is None and (self._local_error is not None or self.engine is None):
            raise EngineError(self._local_error or "the rollout engine is not running")

    def generate(self, prompt_ids: list[list[int]], params) -> list:
        """Rollouts for ``prompt_ids`` (same list on every rank), restarting the engine as needed.
        Raises StepAbandoned (stop request) or EngineGaveUp on every rank alike."""
        self._release_cached_memory()
        while True:
            if self._broken is not None:
                self._restart()
                continue
            if is_rank0() and self._local_error is not None:
                engine = _FailedEngine(self._local_error)
            else:
                engine = self.engine
            try:
                rollouts = rollout_phase.generate(engine, prompt_ids, params, stop=self.stop)
            except EngineGaveUp:
                raise
            except EngineError as e:  # broadcast by rank 0: the same on every rank
                self._mark_broken(str(e))
                continue
            self.in_a_row = 0
            return rollouts

    def sleep(self) -> None:
        """Colocated engines free their memory for training (rank 0; no collective: a failure is
        agreed on at the next sync or generation)."""
        if self.engine is None or self.rollout.placement != "colocated":
            return
        try:
            self.engine.sleep()
        except EngineError as e:
            self._local_error = str(e)

    def close(self) -> None:
        """Rank 0: close the engine (killed if it is broken or was interrupted)."""
        if self.engine is None:
            return
        if self._broken is not None or self._local_error is not None or (self.stop is not None and self.stop.requested):
            self._dispose()
            return
        try:
            self.engine.close()
            if self._sync is not None:
                self._sync.close()
        except Exception:  # closing must not hide why the run ends
            self._dispose()
        self.engine = self._sync = None


class _FailedEngine(RolloutEngine):
    """Rank 0's stand-in for an engine that failed outside a collective (e.g. in sleep())."""

    name = "failed"

    def __init__(self, reason: str):
        self.reason = reason

    def generate(self, prompts, params):
        raise EngineError(self.reason)

    def update_weights(self, buckets, version):
        raise EngineError(self.reason)
