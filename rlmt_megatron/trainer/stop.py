"""Stopping a run early and cleanly (SLURM preemption or time limit), and the requeue contract.

Contract with the launch scripts
--------------------------------
* **Signal.** Every rank handles the signals in ``run.stop_signals`` (default: SIGTERM). SLURM
  sends SIGTERM to every process of the job on preemption and at the time limit (``KillWait``
  seconds, default 30, before SIGKILL; ``#SBATCH --signal=TERM@SECONDS`` sends it earlier);
  torchrun's agent forwards SIGTERM to its workers and SIGKILLs them after
  ``--shutdown-timeout`` / ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (default 30): set it to the
  time a checkpoint takes plus one training phase. The signal may reach the ranks only, torchrun
  only or every process of the job: the checkpoint writer's helper processes ignore it
  (``checkpoint/dist_ckpt.writer_survives_stop_signals``), so the stop checkpoint gets written.
* **What the loop does.** The handler only sets a flag, except while rank 0 waits for the
  rollout engine: the rollout is the long phase and changes nothing that is saved, so it is
  *abandoned* at once (the step's sampler position and RNG states are rewound to the step's
  start and the checkpoint is the previous step's). A signal that arrives after the rollout lets
  the step finish (reward, update, weight sync; an update cannot be half-undone). At the end of
  every step all ranks all-reduce the flag, so they stop after the same step (a signal during
  the last step changes nothing: the run finishes). Then: a training checkpoint
  (``save_train_state``, skipped when that step is already saved), the engine is closed and
  rank 0 writes ``<out_dir>/exit_status.json``.
* **Exit.** Every rank exits with ``run.stop_exit_code`` (default 75, EX_TEMPFAIL). torchrun
  does **not** pass its workers' exit codes on (it exits 1, or dies by the signal), so the
  launch script decides from the status file, never from torchrun's exit code::

      {"status": "stopped", "requeue": true, "step": 12, "checkpoint": ".../step_00000012",
       "signal": "SIGTERM", "exit_code": 75, "message": "..."}

  ``status`` is ``finished`` (requeue false), ``stopped`` (requeue true), ``engine_failed``
  (the rollout engine failed more than ``rollout.max_restarts`` times in a row; a checkpoint is
  written, requeue false, exit status 2) or ``failed`` (an error of the run's own once training
  began, e.g. a checkpoint write on a full disk; requeue false, exit status 2 for errors of
  input or setup, 1 otherwise; ``checkpoint`` is the newest saved one). A run killed outright
  (SIGKILL, a dead node) leaves no file (the file of an earlier attempt is deleted at start), so
  "no file" also means "do not requeue" unless the launcher itself saw the stop signal.
* **Requeue.** The batch script traps SIGTERM (so it survives to the end), waits for torchrun,
  and runs ``scontrol requeue "$SLURM_JOB_ID"`` when the file says ``"requeue": true`` (the job
  needs ``--requeue`` or ``JobRequeue=1``). The next start, with ``run.resume: auto`` (the
  default), resumes from the newest complete checkpoint in ``out_dir``; step, sampler position,
  RNG states and engine restart count continue exactly, so the metrics and weights equal an
  uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from rlmt_megatron.distributed.collectives import any_rank
from rlmt_megatron.trainer.watchdog import activity

EXIT_STATUS_NAME = "exit_status.json"


class Interrupted(BaseException):
    """Raised by the stop handler inside :meth:`StopSignals.interruptible`. A BaseException (like
    KeyboardInterrupt) so that engine code catching ``Exception`` does not swallow it."""


class StepAbandoned(Exception):
    """Rank 0 abandoned this step's rollout for a stop request; raised on every rank alike."""


class RunStopped(SystemExit):
    """The run stopped early after its checkpoint; the process exits with ``code``."""


class StopSignals:
    """Turns the stop signals into a flag (and, inside :meth:`interruptible`, into an
    :class:`Interrupted`). Install it in the main thread; it restores the previous handlers."""

    def __init__(self, names: Sequence[str] = ("SIGTERM",)):
        self.signals = [signal.Signals[n] for n in names]
        self.received: Optional[signal.Signals] = None
        self._interruptible = False
        self._raised = False
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            print("warning: stop signals are not handled (the loop does not run in the main thread)", file=sys.stderr)
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
            # os.write, not print: the handler may interrupt a print to stderr (progress bar), and
            # a reentrant write on the same buffered stream raises
            os.write(2, (f"rank {rank}: received {self.received.name}; the run stops after a checkpoint at the "
                         "next step boundary (a rollout in progress is abandoned)\n").encode())
        if self._interruptible and not self._raised:
            self._raised = True  # once: a second signal must not interrupt the clean-up
            raise Interrupted()

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> Optional[str]:
        return None if self.received is None else self.received.name

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stop signal raises :class:`Interrupted` in this block (at once if one already came)."""
        if self.requested:
            raise Interrupted()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def agreed(self) -> bool:
        """True on every rank when any rank received a stop signal. Collective."""
        with activity("all-reduce of the stop flag"):
            return any_rank(self.requested)


def write_exit_status(out_dir: str | Path, status: str, *, requeue: bool, exit_code: int, step: int,
                      checkpoint: Optional[Path], message: str, signal_name: Optional[str] = None) -> Path:
    """Rank 0: write ``exit_status.json`` atomically (a reader never sees half a file)."""
    path = Path(out_dir) / EXIT_STATUS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({
        "status": status, "requeue": requeue, "exit_code": exit_code, "step": step,
        "checkpoint": None if checkpoint is None else str(checkpoint), "signal": signal_name, "message": message,
    }, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def exit_status_written(out_dir: str | Path) -> bool:
    """Whether this attempt wrote its status already (an earlier attempt's is cleared at start)."""
    return (Path(out_dir) / EXIT_STATUS_NAME).is_file()


def clear_exit_status(out_dir: str | Path) -> None:
    """Rank 0, at start: an earlier attempt's status must not describe this one."""
    (Path(out_dir) / EXIT_STATUS_NAME).unlink(missing_ok=True)
