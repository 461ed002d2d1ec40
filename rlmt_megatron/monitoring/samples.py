"""Per-step rollout dumps: ``out_dir/samples/step_{step:06d}.jsonl``, one row per rollout.

What the policy actually wrote (thinking, answer), what the reward model said, and whether the
format parsed: the first thing to read when a reward curve looks wrong. A resumed run rewrites
the files of the steps it repeats (atomic replace), so a file always holds one step's rows.
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from rlmt_megatron.monitoring.metrics import atomic_write_text

SAMPLES_DIR = "samples"

# Required keys and the types each accepts (None: the parser/scorer produced nothing).
SAMPLE_KEYS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "thinking": (str, type(None)),
    "answer": (str, type(None)),
    "reward": (Real, type(None)),
    "format_ok": (bool, type(None)),
    "response_tokens": (Integral,),
    "finish_reason": (str, type(None)),
    "weight_version": (Integral,),
}


def samples_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"step_{step:06d}.jsonl"


def write_samples(
    out_dir: str | Path, step: int, rows: Sequence[Mapping[str, Any]], first_k: Optional[int] = None
) -> Optional[Path]:
    """Dump ``rows`` (the first ``first_k`` if given) for ``step``; returns the file, or None if nothing written.

    Every row needs the keys of ``SAMPLE_KEYS``; extra keys (e.g. prompt_source) are kept. A
    non-finite reward is written as null with ``reward_nonfinite: true``.
    """
    if first_k is not None and first_k < 0:
        raise ValueError(f"first_k must be >= 0 or None, got {first_k}")
    chosen = list(rows) if first_k is None else list(rows)[:first_k]
    if not chosen:
        return None
    lines = [json.dumps(_checked_row(row, i, step), ensure_ascii=False, allow_nan=False) + "\n"
             for i, row in enumerate(chosen)]
    path = samples_path(out_dir, step)
    atomic_write_text(path, "".join(lines))
    return path


def _checked_row(row: Mapping[str, Any], index: int, step: int) -> dict[str, Any]:
    where = f"samples of step {step}, row {index}"
    if not isinstance(row, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(row).__name__}")
    missing = [k for k in SAMPLE_KEYS if k not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (required: {', '.join(SAMPLE_KEYS)})")
    out: dict[str, Any] = {}
    for key, kinds in SAMPLE_KEYS.items():
        value = row[key]
        # bool is an Integral: refuse it where a count or version is meant.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise TypeError(f"{where}: '{key}' = {value!r} ({type(value).__name__}), expected {names}")
        out[key] = value
    out["response_tokens"] = int(out["response_tokens"])
    out["weight_version"] = int(out["weight_version"])
    if out["reward"] is not None:
        reward = float(out["reward"])
        out["reward"] = reward if math.isfinite(reward) else None
        if not math.isfinite(reward):
            out["reward_nonfinite"] = True
    for key in sorted(set(row) - set(SAMPLE_KEYS)):
        out[key] = row[key]
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: not JSON-serializable ({e})") from None
    return out
