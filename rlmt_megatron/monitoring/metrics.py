"""Per-step scalar metrics of a run: ``metrics.jsonl``, TensorBoard and Weights & Biases.

``metrics.jsonl`` is the record of truth (``rlmt-plot`` reads it; one JSON object per step, step
first, keys sorted, flushed and fsync'd per line so a killed run loses at most the line being
written). TensorBoard and W&B are views of the same numbers. Only one process writes: the
caller constructs the logger with ``is_writer=True`` on global rank 0 and ``False`` elsewhere.

Resuming from step S keeps steps <= S everywhere: later ``metrics.jsonl`` lines are dropped
(atomic rewrite), TensorBoard gets ``purge_step=S+1`` (readers discard the orphaned steps), and
W&B continues the run whose id is stored in ``out_dir/wandb_run_id``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional

from pydantic import Field

from rlmt_megatron.config.base import StrictModel
from rlmt_megatron.errors import InputFileError, RLMTError
from rlmt_megatron.file_modes import apply_default_mode

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
# Keys of a metrics.jsonl line that are not metrics.
RESERVED_KEYS = ("step", "nonfinite_keys")


class WandbConfig(StrictModel):
    """Weights & Biases. ``mode`` None resolves at start (see ``resolve_wandb_mode``)."""

    mode: Optional[Literal["offline", "online", "disabled"]] = Field(
        None, description="None: $WANDB_MODE if set, else online when $WANDB_API_KEY is set, else offline"
    )
    project: str = "rlmt"
    entity: Optional[str] = None
    name: Optional[str] = Field(None, description="run name; default: the run directory's name")
    group: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    dir: Optional[str] = Field(None, description="where wandb writes its files; default: the run directory")


class MonitoringConfig(StrictModel):
    """What a run records besides checkpoints."""

    tensorboard: bool = Field(True, description="write TensorBoard scalars to out_dir/tensorboard")
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    samples_per_step: Optional[int] = Field(
        None, ge=0, description="rollouts dumped per step to out_dir/samples (first K); None = all, 0 = none"
    )


def resolve_wandb_mode(cfg: WandbConfig, env: Mapping[str, str] = os.environ) -> str:
    """The mode to run W&B in: explicit config, then $WANDB_MODE, then online iff an API key is set."""
    if cfg.mode is not None:
        return cfg.mode
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("offline", "online", "disabled"):
        return env_mode
    if env_mode == "dryrun":  # wandb's older spelling of offline
        return "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def encode_line(step: int, metrics: Mapping[str, Any]) -> str:
    """One metrics.jsonl line (with the newline): step first, keys sorted, NaN/inf as null."""
    record: dict[str, Any] = {"step": step}
    nonfinite = []
    for key in sorted(metrics):
        value = metrics[key]
        if value is None or not math.isfinite(value):
            nonfinite.append(key)
            value = None
        record[key] = value
    if nonfinite:
        record["nonfinite_keys"] = nonfinite
    # allow_nan=False: strict JSON, readable by any parser (NaN is not JSON).
    return json.dumps(record, allow_nan=False, ensure_ascii=False) + "\n"


def read_metrics(path: str | Path, tolerate_torn_tail: bool = True) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order.

    A last line without its newline is what a kill during a write leaves behind: with
    ``tolerate_torn_tail`` it is skipped (with a warning) if it does not parse. Any other bad
    line raises InputFileError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    return [rec for _, rec in _iter_metrics(path, tolerate_torn_tail)]


def _iter_metrics(path: Path, tolerate_torn_tail: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(raw line, record) pairs; raw lines end with a newline."""
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = lineno == len(lines) and not line.endswith("\n")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if torn and tolerate_torn_tail:
                log.warning("%s:%d: skipping a partly written last line (the run was killed mid-write)", path, lineno)
                return
            raise InputFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise InputFileError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise InputFileError(f"{path}:{lineno}: field 'step' is missing or not an integer")
        yield (line if line.endswith("\n") else line + "\n"), rec


def truncate_metrics(path: str | Path, keep_through_step: int) -> int:
    """Drop the records with step > ``keep_through_step`` (atomic rewrite); returns how many."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line, rec in _iter_metrics(path, tolerate_torn_tail=True):
        if rec["step"] <= keep_through_step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(kept))
    return dropped


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        apply_default_mode(fd)  # mkstemp makes it 0600; the result should read like any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_resolved_config(out_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """``out_dir/config.yaml``: the fully resolved run config (``cfg.model_dump(mode="json")``)."""
    import yaml

    path = Path(out_dir) / CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True))
    return path


# ---------------------------------------------------------------------------------------------
# the logger


class MetricsLogger:
    """Writes each step's scalars to metrics.jsonl, TensorBoard and W&B (rank 0 only).

    ``resume_from_step``: None for a fresh run (an existing metrics.jsonl is moved to
    ``metrics.jsonl.prev``, a new W&B run is started); S when the run continues after step S.
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: MonitoringConfig,
        run_config: Mapping[str, Any],
        resume_from_step: Optional[int] = None,
        is_writer: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.config = config
        self.is_writer = is_writer
        self._file = self._tb = self._wandb_run = None
        if not is_writer:
            return
        if resume_from_step is not None and resume_from_step < 0:
            raise ValueError(f"resume_from_step must be >= 0, got {resume_from_step}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / METRICS_FILE
        if resume_from_step is None:
            if path.exists() and path.stat().st_size > 0:
                log.warning("%s exists and this is a fresh run: moving it to %s.prev", path, path.name)
                os.replace(path, path.with_name(path.name + ".prev"))
        else:
            dropped = truncate_metrics(path, resume_from_step)
            if dropped:
                log.info("%s: dropped %d step(s) after the resumed step %d", path, dropped, resume_from_step)
        self._file = path.open("a", encoding="utf-8")
        try:
            if config.tensorboard:
                self._tb = _open_tensorboard(self.out_dir / TENSORBOARD_DIR, resume_from_step)
            self._wandb_run = _start_wandb(self.out_dir, config.wandb, dict(run_config), resume_from_step)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (name -> number) for ``step`` everywhere."""
        if not self.is_writer:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log after close()")
        values = _as_floats(step, metrics)
        line = encode_line(step, values)
        # One write per line, then flush + fsync: a kill loses at most this line.
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in values.items():
                # Classic float32 scalars: every TensorBoard reader handles (and purges) them;
                # metrics.jsonl keeps the exact float64 values.
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_floats(step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"step {step}: metric names must be non-empty strings, got {key!r}")
        if key in RESERVED_KEYS:
            raise ValueError(f"step {step}: '{key}' is reserved in metrics.jsonl; rename the metric")
        try:
            # float() also takes numpy scalars and one-element tensors (.item() semantics).
            out[key] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"step {step}: metric '{key}' = {value!r} is not a number") from None
    return out


def _open_tensorboard(log_dir: Path, resume_from_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RLMTError(
            f"TensorBoard logging needs the 'tensorboard' package ({e}); "
            "pip install tensorboard, or set monitoring.tensorboard=false"
        ) from None
    # purge_step writes a SessionLog.START event: readers drop the steps >= purge_step seen in
    # earlier event files. A fresh run writes one too (at 0, hiding any older run in this dir),
    # because TensorBoard's plugin accumulator treats the first START of a run as no restart.
    purge_step = 0 if resume_from_step is None else resume_from_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _start_wandb(out_dir: Path, cfg: WandbConfig, run_config: dict, resume_from_step: Optional[int]):
    mode = resolve_wandb_mode(cfg)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        if cfg.mode is None:  # the default, not a request: run without W&B
            log.warning("wandb is not installed: W&B logging is off (pip install wandb to enable it)")
            return None
        raise RLMTError(
            f"monitoring.wandb.mode={cfg.mode} needs the 'wandb' package: pip install wandb, "
            "or set monitoring.wandb.mode=disabled"
        ) from None
    id_file = out_dir / WANDB_ID_FILE
    run_id = None
    if resume_from_step is not None and id_file.is_file():
        run_id = id_file.read_text(encoding="utf-8").strip() or None
    if run_id is None:
        run_id = secrets.token_hex(6)  # W&B ids: [a-z0-9], unique per project
        atomic_write_text(id_file, run_id + "\n")
    wandb_dir = Path(cfg.dir) if cfg.dir else out_dir
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=mode,
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or out_dir.resolve().name,
        group=cfg.group,
        tags=list(cfg.tags) or None,
        dir=str(wandb_dir),
        config=run_config,
        id=run_id,
        # allow: continue the stored run if W&B knows it, else create it under that id.
        resume="allow",
        # Several runs may be created in one process (tests, sweeps): never reuse an active one.
        reinit="create_new",
    )
