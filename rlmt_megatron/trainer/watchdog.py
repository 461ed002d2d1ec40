"""A per-rank watchdog: says which rank is stuck where, before a collective timeout kills the job.

The loop names what each rank is doing with nested :func:`activity` blocks ("step 3 > rollout >
waiting for the hosts' rollouts"). A daemon thread per rank watches the innermost one; when a rank
has stayed in the same activity longer than ``run.watchdog_timeout_s``, it appends a report to
``<out_dir>/watchdog/rank_<N>.txt`` and prints it to stderr: the activity, how long, and every
thread's Python stack (``faulthandler.dump_traceback``). Ranks that wait for another rank show
the collective they wait in; the rank they wait for shows where it really is. One report per
activity entry; the watchdog only reports, the collective timeout
(``run.collective_timeout_minutes``) is what ends a real hang.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

_active: Optional["Watchdog"] = None  # the process's running watchdog (activity() is a no-op without one)


@contextlib.contextmanager
def activity(name: str) -> Iterator[None]:
    """Mark what this rank is doing (nests); cheap, and a no-op when no watchdog runs."""
    dog = _active
    if dog is None:
        yield
        return
    with dog.phase(name):
        yield


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


class Watchdog:
    """``with Watchdog(600, out / "watchdog"):`` — off when ``timeout_s`` is falsy."""

    def __init__(self, timeout_s: Optional[float], folder: str | Path, rank: Optional[int] = None):
        self.timeout_s = timeout_s or None
        self.folder = Path(folder)
        self.rank = rank
        self._lock = threading.Lock()
        self._stack: list[str] = []
        self._since = time.monotonic()  # when the innermost activity last changed
        self._token = 0  # bumped on every change; one report per token
        self._reported = -1
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reports = 0

    def __enter__(self) -> "Watchdog":
        global _active
        if self.timeout_s is None:
            return self
        if self.rank is None:
            self.rank = _rank()
        poll = min(max(self.timeout_s / 4, 0.05), 5.0)
        self._thread = threading.Thread(target=self._watch, args=(poll,), daemon=True, name="rlmt-watchdog")
        self._thread.start()
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if _active is self:
            _active = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._lock:
            self._stack.append(name)
            self._changed()
        try:
            yield
        finally:
            with self._lock:
                self._stack.pop()
                self._changed()  # back in the outer activity: its clock starts again

    def _changed(self) -> None:
        self._since = time.monotonic()
        self._token += 1

    def _watch(self, poll: float) -> None:
        while not self._stop.wait(poll):
            with self._lock:
                label = " > ".join(self._stack)
                token, elapsed = self._token, time.monotonic() - self._since
            if label and token != self._reported and elapsed > self.timeout_s:
                self._reported = token
                self._report(label, elapsed)

    def _report(self, label: str, elapsed: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank_{self.rank}.txt"
        now = datetime.datetime.now().isoformat(timespec="seconds")
        header = (f"=== watchdog {now}: rank {self.rank} (pid {os.getpid()}, host {socket.gethostname()}) has been in "
                  f"'{label}' for {elapsed:.1f} s (run.watchdog_timeout_s={self.timeout_s:g}); Python stacks:\n")
        with open(path, "a") as f:
            start = f.tell()
            f.write(header)
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)  # writes to the descriptor directly
        with open(path) as f:
            f.seek(start)
            text = f.read()
        sys.stderr.write(text + f"(also in {path})\n")
        sys.stderr.flush()
        self.reports += 1
