"""Who may write ``run.out_dir``: one run at a time, and a fresh run never over an old one.

* **Lock.** Rank 0 creates ``out_dir/.rlmt_run.lock`` atomically (``O_CREAT | O_EXCL``) before
  anything in the folder is touched, holding JSON ``{host, pid, started, command}``, and removes
  it when the run ends, whatever the outcome. A second run on the folder is refused naming the
  holder. A lock left by a killed run is taken over: same host and its pid no longer alive, or
  the same SLURM job (``SLURM_JOB_ID``): a requeued job keeps its id and may start on another
  node after a hard kill, and only one start of a job runs at a time. Any other lock from another
  host is never assumed stale (its pid means nothing here).
* **Fresh start.** A run that would start fresh (``run.resume: never``, or ``auto`` with no
  complete checkpoint) in a folder holding a previous run's results is refused
  (``run.overwrite: refuse``), or those entries are moved to ``out_dir/previous_runs/<UTC time>/``
  (``backup``). Without this, the new run's ``keep_last`` pruning deleted its own checkpoints
  while the old ones (higher steps) stayed, and metrics, samples and the final export mixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from rlmt_megatron.checkpoint.train_state import latest_checkpoint, list_checkpoints, load_train_state
from rlmt_megatron.distributed.collectives import is_rank0, rank0_decides
from rlmt_megatron.errors import DamagedCheckpointError, RLMTError

LOCK_NAME = ".rlmt_run.lock"
BACKUP_DIR = "previous_runs"

# A previous run's *results*: what a fresh run would prune (checkpoints), append to or replace.
# Their presence makes a fresh start refuse. Empty ones do not count: an attempt that completed
# no step (stopped or crashed in step 1) left nothing to lose, and rerunning the same command
# must go on working (the requeue contract of trainer/stop.py).
RESULTS = ("checkpoints", "metrics.jsonl", "metrics.jsonl.prev", "samples", "final_hf")
# Moved aside with the results on backup: the rest of that run's record, so the new run's
# config, logs, W&B run and exit status are only its own (and one_round DPO's recorded samples,
# which a fresh start that finds them, left by an attempt that completed no step, discards:
# trainer/one_round.py). Not listed, so left in place: what every start rebuilds from the config
# (rollout_init_hf/, rollout_init_fp8/, weight_sync/).
RECORD = ("config.yaml", "exit_status.json", "tensorboard", "wandb", "wandb_run_id", "watchdog", "plots",
          "one_round_rollouts")


class RunFolderError(RLMTError):
    """``run.out_dir`` is in use by another run, or holds a run this one must not mix with."""


# ---------------------------------------------------------------------------------------------
# the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a zombie (killed, not yet reaped) is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: Path) -> Optional[dict]:
    """The holder's record, or None when the file is unreadable (being written, or damaged)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}"


def acquire_lock(out_dir: str | Path) -> dict:
    """Create ``out_dir/.rlmt_run.lock`` for this process (taking over a stale one); returns the
    record written. Raises RunFolderError when another run holds the folder."""
    out = Path(out_dir)
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"run.out_dir {out}: cannot create it ({e.strerror}); pick a writable run.out_dir") from None
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "command": shlex.join([sys.executable, *sys.argv]), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    for _ in range(5):  # another start may take or drop the lock between our steps: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                time.sleep(0.2)  # its writer may be between open and write
                holder = _read_lock(path)
            if holder is None:
                raise RunFolderError(f"run.out_dir {out} is locked by {path}, which cannot be read; if no run uses "
                                     f"this folder, delete {path} and start again") from None
            same_job = me["slurm_job_id"] is not None and holder.get("slurm_job_id") == me["slurm_job_id"]
            if holder.get("host") != me["host"] and not same_job:
                raise RunFolderError(f"run.out_dir {out} is in use by another run ({_describe(holder)}); wait for it, "
                                     f"or if that run is gone (its host is down), delete {path} by hand") from None
            if not same_job and _pid_alive(holder["pid"]):
                raise RunFolderError(f"run.out_dir {out} is in use by another run ({_describe(holder)}); wait for it "
                                     f"to end or stop it, or pick another run.out_dir") from None
            if _take_over(path, holder):
                print(f"{out}: taking over the lock of a run that is gone ({_describe(holder)})", file=sys.stderr)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return me
    raise RunFolderError(f"run.out_dir {out}: other runs keep taking {path}; start one run per folder")


def _take_over(path: Path, stale: dict) -> bool:
    """Remove the stale lock ``stale``, unless another start replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.replace(path, aside)  # atomic: we now own whatever lock file was there
    except FileNotFoundError:
        return False  # someone else removed it; try to create ours
    if _read_lock(aside) == stale:
        aside.unlink()
        return True
    # We grabbed a live lock another start created a moment ago: put it back (link fails if a
    # third start created one in between, and then that one holds the folder).
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    aside.unlink()
    return False


def release_lock(out_dir: str | Path, mine: dict) -> None:
    """Remove the lock if it is still ``mine`` (never another run's)."""
    path = Path(out_dir) / LOCK_NAME
    if _read_lock(path) == mine:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# fresh start over a previous run


def _nonempty(p: Path) -> bool:
    if p.is_dir():
        return any(p.iterdir())
    return p.is_file() and p.stat().st_size > 0


def previous_results(out_dir: str | Path) -> list[str]:
    """The previous run's results in ``out_dir`` (names from RESULTS, non-empty only)."""
    out = Path(out_dir)
    found = []
    for name in RESULTS:
        p = out / name
        if _nonempty(p):
            if name == "checkpoints":
                steps = [s for s, _ in list_checkpoints(p)]
                name = f"checkpoints/ (steps {', '.join(map(str, steps))})" if steps else "checkpoints/ (incomplete ones)"
            elif p.is_dir():
                name += "/"
            found.append(name)
    return found


def resume_checkpoint(out_dir: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint a run with ``run.resume`` continues from, or None for a fresh start:
    ``auto``: the latest complete one under ``out_dir/checkpoints``; ``never``: none; else the path."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(Path(out_dir) / "checkpoints")
    return Path(resume)


def load_resume_state(out_dir: str | Path, resume: str, engines: dict) -> tuple[Optional[Path], Optional[dict]]:
    """Every rank: load the training state ``run.resume`` names into ``engines``; returns the
    checkpoint and its ``extra`` dict, or ``(None, None)`` for a fresh start.

    With ``auto``, a newest checkpoint that is damaged (DamagedCheckpointError: marked complete
    but a file is missing or unreadable, a storage fault after the save) is passed over, saying
    so, for the complete one before it, and so on; if none loads, the error names each. Nothing
    is moved or deleted: the damaged folder stays for inspection until the resumed run saves
    that step again (which replaces it) or ``keep_last`` prunes it. An explicit path is loaded
    or refused, never swapped for another checkpoint. Any other CheckpointError (a layout or
    schedule that does not fit) is raised at once: an older checkpoint would not fit either.
    """
    if resume != "auto":
        path = resume_checkpoint(out_dir, resume)
        return (None, None) if path is None else (path, load_train_state(path, engines))
    candidates = [p for _, p in reversed(list_checkpoints(Path(out_dir) / "checkpoints"))]
    damaged = []
    for path in candidates:
        try:
            return path, load_train_state(path, engines)
        except DamagedCheckpointError as e:
            damaged.append(f"{path.name}: {e}")
            if is_rank0() and path is not candidates[-1]:
                print(f"warning: checkpoint {path} is damaged ({e}); resuming from the one before it instead "
                      f"(the damaged folder is left as it is)", file=sys.stderr, flush=True)
    if damaged:
        raise DamagedCheckpointError(f"no complete checkpoint under {Path(out_dir) / 'checkpoints'} could be loaded: "
                                     + "; ".join(damaged))
    return None, None


def starts_fresh(out_dir: str | Path, resume: str) -> bool:
    return resume_checkpoint(out_dir, resume) is None


def backup_previous_run(out_dir: str | Path) -> tuple[Path, list[str]]:
    """Move the previous run's entries (RESULTS and RECORD) to ``out_dir/previous_runs/<UTC>/``."""
    out = Path(out_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = out / BACKUP_DIR / stamp, 1
    while dest.exists():  # two backups within a second
        dest, n = out / BACKUP_DIR / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    moved = []
    for name in RESULTS + RECORD:
        if (out / name).exists():
            os.rename(out / name, dest / name)  # same filesystem: a rename, nothing copied or deleted
            moved.append(name)
    return dest, moved


def check_fresh_start(out_dir: str | Path, resume: str, overwrite: str) -> None:
    """Rank 0: refuse (or back up) a fresh start in a folder holding a previous run's results."""
    out = Path(out_dir)
    if not starts_fresh(out, resume):
        return
    found = previous_results(out)
    if not found:
        return
    if overwrite == "backup":
        dest, moved = backup_previous_run(out)
        print(f"{out}: run.overwrite=backup moved the previous run ({', '.join(moved)}) to {dest}", file=sys.stderr)
        return
    why = "run.resume=never" if resume == "never" else "run.resume=auto found no complete checkpoint to continue"
    ways = "continue it with run.resume=auto, " if resume == "never" and latest_checkpoint(out / "checkpoints") else ""
    raise RunFolderError(f"run.out_dir {out} holds a previous run's outputs ({', '.join(found)}) and this run would "
                         f"start fresh ({why}): {ways}move them to {out / BACKUP_DIR}/ with run.overwrite=backup, "
                         f"or pick another run.out_dir")


@contextlib.contextmanager
def claim_run_folder(out_dir: str | Path, resume: str, overwrite: str) -> Iterator[None]:
    """Every rank: lock ``out_dir`` and check a fresh start there (rank 0 decides, every rank
    raises the same RunFolderError); rank 0 removes the lock on the way out, whatever happens."""
    def claim() -> Optional[dict]:
        mine = acquire_lock(out_dir)
        try:
            check_fresh_start(out_dir, resume, overwrite)
        except BaseException:
            release_lock(out_dir, mine)
            raise
        return mine

    mine = rank0_decides(claim, "locking run.out_dir", shared=(RLMTError,))
    try:
        yield
    finally:
        if is_rank0():
            release_lock(out_dir, mine)
