"""Console progress over training steps, and per-phase wall times.

On a terminal a tqdm bar is redrawn in place; when stdout is not a TTY (SLURM logs, pipes) a
redrawn bar is a mess of carriage returns, so one plain line is printed per step instead.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, TextIO

# Shown after the bar when present, in this order.
DEFAULT_PROGRESS_KEYS = ("reward/mean", "format/ok_rate", "kl", "response/len_mean", "loss/policy", "timing/step")


class PhaseTimer:
    """Wall time per named phase, reported as ``timing/<phase>`` seconds.

    Phases may nest (``step`` around ``rollout``); a phase entered twice accumulates. With
    ``cuda_sync`` the device is synchronized at both ends of a phase, because CUDA kernels run
    asynchronously and would otherwise be charged to whichever later phase waits on them.
    ``cuda_sync=None`` turns it on when CUDA is initialized in this process.
    """

    def __init__(self, cuda_sync: Optional[bool] = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if cuda_sync is None:
            import torch

            cuda_sync = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda_sync = cuda_sync
        self._clock = clock
        self._seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty string, got {name!r}")
        self._sync()
        start = self._clock()
        try:
            yield
        finally:
            self._sync()
            self._seconds[name] += self._clock() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{name}": seconds for name, seconds in self._seconds.items()}


def peak_memory_metrics() -> dict[str, float]:
    """``memory/peak_gib``: the largest CUDA allocation peak of any rank since the last call (the
    rank that runs out first is the one that matters), then the peak counters restart. Collective
    over the default group when it exists. Empty without CUDA (CPU runs have no device peak)."""
    import torch
    import torch.distributed as dist

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], dtype=torch.float64, device="cuda")
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    torch.cuda.reset_peak_memory_stats()
    return {"memory/peak_gib": float(peak)}


def format_metrics(metrics: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``key=value`` for the ``keys`` present in ``metrics``, 4 significant digits."""
    parts = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            try:
                value = float(value)
                text = f"{value:.4g}" if math.isfinite(value) else str(value)
            except (TypeError, ValueError):
                text = str(value)
            parts.append(f"{key}={text}")
    return " ".join(parts)


class ProgressReporter:
    """Progress over steps ``start_step+1 .. total_steps`` with ETA and the latest key metrics."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        keys: Sequence[str] = DEFAULT_PROGRESS_KEYS,
        stream: Optional[TextIO] = None,
        tty: Optional[bool] = None,
        is_writer: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = total_steps
        self.start_step = self._last = start_step
        self.keys = tuple(keys)
        self.is_writer = is_writer
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._t0 = clock()
        self._bar = None
        if not is_writer:
            return
        self.tty = tty if tty is not None else bool(getattr(self._stream, "isatty", lambda: False)())
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self._stream, unit="step",
                             dynamic_ncols=True, desc="train")

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_writer:
            return
        shown = format_metrics(metrics, self.keys)
        if self._bar is not None:
            self._bar.set_postfix_str(shown, refresh=False)
            self._bar.update(step - self._last)
        else:
            self._stream.write(self._line(step, shown) + "\n")
            self._stream.flush()
        self._last = step

    def _line(self, step: int, shown: str) -> str:
        from tqdm import tqdm

        elapsed = self._clock() - self._t0
        done = step - self.start_step  # steps of this process: a resumed run's rate starts afresh
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
        eta_text = tqdm.format_interval(eta) if math.isfinite(eta) else "?"
        line = f"step {step}/{self.total_steps} ({pct:.0f}%) | elapsed {tqdm.format_interval(elapsed)} | eta {eta_text}"
        return f"{line} | {shown}" if shown else line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
