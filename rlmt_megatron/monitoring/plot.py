"""PNG curves of metrics.jsonl: one file per key plus a summary grid (matplotlib, Agg, no display)."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from rlmt_megatron.errors import InputFileError, RLMTError
from rlmt_megatron.monitoring.metrics import METRICS_FILE, RESERVED_KEYS, read_metrics

# Plotted by default, in this order, when the file has them. Shell patterns: the losses of any
# stage (RL policy/critic/DPO, rlmt-sft's loss/sft, rlmt-train-rm's loss/rm) are whichever
# loss/* keys the file holds, the policy's first.
DEFAULT_PLOT_KEYS = (
    "reward/mean", "format/ok_rate", "kl", "entropy", "response/len_mean",
    "loss/policy", "loss/*", "rm/accuracy", "grad_norm", "rollout/logprob_diff_mean",
)
SUMMARY_FILE = "summary.png"


def metrics_file(source: str | Path) -> Path:
    """``source`` itself if it is a file, else ``source/metrics.jsonl``."""
    path = Path(source)
    if path.is_dir():
        path = path / METRICS_FILE
        if not path.is_file():
            raise InputFileError(f"{source}: a run directory needs a {METRICS_FILE} (none found)")
    elif not path.exists():
        raise InputFileError(f"{source}: no such file or directory")
    return path


def available_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({k for rec in records for k in rec} - set(RESERVED_KEYS))


def _expand(pattern: str, have: list[str]) -> list[str]:
    return fnmatch.filter(have, pattern) if any(c in pattern for c in "*?[") else ([pattern] if pattern in have else [])


def default_keys(have: Sequence[str]) -> list[str]:
    """The keys of :data:`DEFAULT_PLOT_KEYS` (patterns expanded) among ``have``, in that order."""
    chosen: list[str] = []
    for pattern in DEFAULT_PLOT_KEYS:
        chosen += [k for k in _expand(pattern, sorted(have)) if k not in chosen]
    return chosen


def select_keys(records: Sequence[dict[str, Any]], keys: Optional[Sequence[str]], where: Path) -> list[str]:
    """The keys to plot: ``keys`` (shell patterns like ``timing/*`` allowed) or the defaults present."""
    have = available_keys(records)
    if not have:
        raise InputFileError(f"{where}: no metrics to plot (the file has no records)")
    if keys is None:
        chosen = default_keys(have)
        if not chosen:
            raise InputFileError(f"{where}: none of the default keys ({', '.join(DEFAULT_PLOT_KEYS)}) is present; "
                                 f"choose with --keys from: {', '.join(have)}")
        return chosen
    chosen: list[str] = []
    for key in keys:
        matches = _expand(key, have)
        if not matches:
            raise InputFileError(f"{where}: no such key '{key}'; available: {', '.join(have)}")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``; a null (non-finite when logged) becomes NaN, a gap in the line.

    A step logged twice (an older run's line before a resume) keeps its last value.
    """
    by_step: dict[int, float] = {}
    for rec in records:
        if key in rec:
            value = rec[key]
            by_step[rec["step"]] = math.nan if value is None else float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RLMTError("plotting needs matplotlib: pip install matplotlib") from None
    return Figure


def _draw(ax, steps: list[int], values: list[float], key: str) -> None:
    ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)


def key_filename(key: str) -> str:
    """``reward/mean`` -> ``reward_mean.png``; keeps names filesystem-safe."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return f"{safe}.png"


def plot_metrics(source: str | Path, keys: Optional[Sequence[str]] = None, out_dir: Optional[str | Path] = None) -> list[Path]:
    """Write one PNG per key and ``summary.png`` (all keys in a grid); returns the paths written.

    ``source`` is a run directory or a metrics.jsonl file; ``out_dir`` defaults to ``plots/``
    next to the metrics file.
    """
    path = metrics_file(source)
    records = read_metrics(path)
    chosen = select_keys(records, keys, path)
    Figure = _figure_class()  # after the input checks: a bad path is reported fast
    out = Path(out_dir) if out_dir is not None else path.parent / "plots"
    out.mkdir(parents=True, exist_ok=True)
    data = {key: series(records, key) for key in chosen}
    written = []
    used = {SUMMARY_FILE}
    for key, (steps, values) in data.items():
        # Figure without pyplot: no global state, no display, Agg canvas when saved as PNG.
        fig = Figure(figsize=(6, 4), layout="constrained")
        _draw(fig.add_subplot(), steps, values, key)
        name = key_filename(key)
        n = 1
        while name in used:  # 'reward/mean' and 'reward_mean' would share a name
            n += 1
            name = key_filename(key)[:-4] + f"_{n}.png"
        used.add(name)
        target = out / name
        fig.savefig(target, dpi=100)
        written.append(target)
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    for i, (key, (steps, values)) in enumerate(data.items()):
        _draw(fig.add_subplot(rows, cols, i + 1), steps, values, key)
    fig.suptitle(str(path))
    summary = out / SUMMARY_FILE
    fig.savefig(summary, dpi=100)
    written.append(summary)
    return written
