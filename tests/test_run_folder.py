"""run.out_dir belongs to one run: the lock (one run at a time) and the fresh-start check (a new
run never mixes with an old one's checkpoints, metrics and samples).

The end-to-end tests are one-process rlmt-train runs of one step on the tiny models; the lock
and folder functions are also tested directly.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_metrics, run_cli, write_train_config
from rlmt_megatron.trainer import run_folder
from rlmt_megatron.trainer.run_folder import LOCK_NAME, RunFolderError

ONE_STEP = {"total_steps": 1, "export_hf": False}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, pid: int, host: str | None = None, slurm_job_id: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2024-01-02T03:04:05+00:00",
              "command": "rlmt-train other.yaml", "slurm_job_id": slurm_job_id}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> contents), the lock file excepted."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def train(cfg: Path, *overrides: str):
    return run_cli("rlmt_megatron.cli.train", [str(cfg), *overrides])


def error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# end to end


def test_fresh_run_in_a_used_folder_is_refused_or_backed_up(tiny_models, tmp_path):
    out = tmp_path / "run"
    cfg = write_train_config(tmp_path / "cfg.yaml", tiny_models, out, run=ONE_STEP)
    # A killed run's lock (this host, its pid gone) does not block the folder.
    write_lock(out, dead_pid())
    first = train(cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "taking over the lock of a run that is gone" in first.stderr
    assert not (out / LOCK_NAME).exists()  # removed when the run finished
    before = snapshot(out)
    assert "checkpoints/step_00000001/COMPLETE" in before and "metrics.jsonl" in before

    # run.resume=never over it: refused before anything is touched, the lock gone again.
    refused = train(cfg, "run.resume=never")
    line = error_line(refused)
    assert line.startswith(f"error: run.out_dir {out} holds a previous run's outputs (checkpoints/ (steps 1), "
                           "metrics.jsonl, samples/)"), line
    assert "run.resume=auto" in line and "run.overwrite=backup" in line and "another run.out_dir" in line
    assert snapshot(out) == before
    assert not (out / LOCK_NAME).exists()

    # run.overwrite=backup: the old run moves aside intact; what is in out_dir is the new run's.
    backed = train(cfg, "run.resume=never", "run.overwrite=backup", "run.seed=4")
    assert backed.returncode == 0, backed.stderr[-3000:]
    assert "run.overwrite=backup moved the previous run" in backed.stderr
    (old,) = (out / "previous_runs").iterdir()
    assert snapshot(old) == before
    new_status = json.loads((out / "exit_status.json").read_text())
    assert Path(new_status["checkpoint"]).exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert not (out / "metrics.jsonl.prev").exists()
    assert read_metrics(out) != read_metrics(old)  # another seed: another run, not the old one's rows
    assert not (out / LOCK_NAME).exists()


# A folder in use (a live run holds the lock), and the lock removed when a run fails: the fault
# campaign (test_fault_campaign.py) runs both at TP=2.


# ---------------------------------------------------------------------------------------------
# the functions


def test_lock_is_exclusive_records_its_holder_and_is_released_only_by_it(tmp_path):
    out = tmp_path / "run"
    mine = run_folder.acquire_lock(out)
    on_disk = json.loads((out / LOCK_NAME).read_text())
    assert on_disk == mine and on_disk["pid"] == os.getpid() and on_disk["host"] == socket.gethostname()
    assert on_disk["started"].endswith("+00:00") and on_disk["command"]
    with pytest.raises(RunFolderError, match=rf"in use by another run \(host .*, pid {os.getpid()}, since "):
        run_folder.acquire_lock(out)
    other = write_lock(out, os.getpid())  # not ours any more: release leaves it
    run_folder.release_lock(out, mine)
    assert json.loads((out / LOCK_NAME).read_text()) == other
    (out / LOCK_NAME).unlink()
    mine = run_folder.acquire_lock(out)
    run_folder.release_lock(out, mine)
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_is_taken_over_but_another_hosts_never(tmp_path, capsys):
    out = tmp_path / "run"
    write_lock(out, dead_pid())
    mine = run_folder.acquire_lock(out)
    assert mine["pid"] == os.getpid()
    assert "taking over the lock of a run that is gone" in capsys.readouterr().err
    (out / LOCK_NAME).unlink()
    holder = write_lock(out, dead_pid(), host="gone-node-17")
    with pytest.raises(RunFolderError, match=rf"host gone-node-17, .*delete {out / LOCK_NAME} by hand"):
        run_folder.acquire_lock(out)
    assert json.loads((out / LOCK_NAME).read_text()) == holder


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch, capsys):
    # SLURM keeps the job id across a requeue; after a hard kill the job may restart elsewhere.
    out = tmp_path / "run"
    write_lock(out, os.getpid(), host="gone-node-17", slurm_job_id="4242")  # pid alive here: must not matter
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    mine = run_folder.acquire_lock(out)
    assert (mine["pid"], mine["slurm_job_id"]) == (os.getpid(), "4242")
    assert "taking over the lock of a run that is gone" in capsys.readouterr().err
    (out / LOCK_NAME).unlink()
    holder = write_lock(out, os.getpid(), host="gone-node-17", slurm_job_id="4243")  # another job: refused
    with pytest.raises(RunFolderError, match="host gone-node-17"):
        run_folder.acquire_lock(out)
    assert json.loads((out / LOCK_NAME).read_text()) == holder


def test_an_attempt_that_completed_no_step_is_not_a_previous_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what a run stopped (or crashed) during step 1 leaves: nothing of value, so rerunning works
    (out / "metrics.jsonl").write_text("")
    (out / "config.yaml").write_text("run: {}\n")
    (out / "exit_status.json").write_text('{"status": "stopped", "requeue": true, "step": 0}\n')
    assert run_folder.previous_results(out) == []
    run_folder.check_fresh_start(out, "auto", "refuse")
    (out / "samples").mkdir()
    (out / "samples" / "step_000001.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderError, match=r"\(samples/\) and this run would start fresh \(run.resume=auto found no "
                                             r"complete checkpoint to continue\): move them"):
        run_folder.check_fresh_start(out, "auto", "refuse")
    run_folder.check_fresh_start(out, str(tmp_path / "elsewhere"), "refuse")  # resumes from a path: not fresh
    run_folder.check_fresh_start(out, "auto", "backup")
    (moved,) = (out / "previous_runs").iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["config.yaml", "exit_status.json", "metrics.jsonl", "samples"]
    assert sorted(p.name for p in out.iterdir()) == ["previous_runs"]
