"""Fault handling in rlmt-train: stop signals (SLURM preemption), a dying or hanging rollout
engine, collective timeouts and the watchdog.

End to end (real torchrun jobs or one process, tiny models, the hf engine in a child process so
it can die): faults are injected by tests/workers/fault_inject_worker.py and faulty_engines.py.
The reference for "nothing was lost" is an uninterrupted run of the same config: a SIGTERM in
the middle of step 2's rollout, an automatic resume, an engine killed during step 3, a SIGKILL of
the whole job after step 3's checkpoint and a second automatic resume must give the same metrics
and bit-identical final weights (one chain, one reference run).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, free_port, read_metrics, torchrun, write_train_config
from rlmt_megatron.rollout.engine import EngineError
from rlmt_megatron.config.rlmt import RLMTConfig
from rlmt_megatron.rollout.weight_sync.pipeline import SyncPipeline
from rlmt_megatron.trainer.stop import Interrupted, StopSignals
from rlmt_megatron.trainer.watchdog import Watchdog, activity

WORKER = "tests/workers/fault_inject_worker.py"


def _wait_until(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------------------------------------
# Units


def test_stop_signal_sets_a_flag_and_interrupts_only_the_engine_wait():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(["SIGTERM"]) as stop:
        # while rank 0 waits for the engine: the wait is interrupted
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(Interrupted):
            with stop.interruptible():
                _wait_until(lambda: False, 60)
        timer.join()
        assert stop.requested and stop.signal_name == "SIGTERM"
        # a region entered after the request stops at once
        with pytest.raises(Interrupted):
            with stop.interruptible():
                pytest.fail("the body must not run once a stop was requested")
    assert signal.getsignal(signal.SIGTERM) is before

    with StopSignals(["SIGTERM"]) as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # anywhere else: only the flag, the code goes on
        assert _wait_until(lambda: stop.requested, 10)
        assert stop.agreed()  # a world of one agrees with itself
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_failed_weight_push_still_reads_the_whole_export_stream():
    # The export stream is collective: if rank 0 stopped reading it, the other ranks would wait in
    # their gathers forever. The error must still come out.
    read = []

    def stream():
        for i in range(5):
            read.append(i)
            yield [(f"w{i}", torch.zeros(2))]

    class DyingTransport:
        def push(self, buckets, version):
            next(iter(buckets))
            raise EngineError("engine process died while syncing")

    with pytest.raises(EngineError, match="died while syncing"):
        SyncPipeline(DyingTransport()).push(stream(), 3)
    assert read == [0, 1, 2, 3, 4]


def _config(**sections) -> RLMTConfig:
    tree = {"models": {"policy": "p", "reward": "r"}, "data": {"prompts": ["x.jsonl"]}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return RLMTConfig.model_validate(tree)


def test_collective_timeout_outlasts_the_engine_timeout():
    assert _config().collective_timeout_minutes() == 3600 / 60 + 10  # default rollout.timeout_s: 1 h
    assert _config(rollout={"timeout_s": 60}).collective_timeout_minutes() == 30
    assert _config(run={"collective_timeout_minutes": 90}).collective_timeout_minutes() == 90
    with pytest.raises(ValueError, match="run.collective_timeout_minutes=20 .*rollout.timeout_s=3600"):
        _config(run={"collective_timeout_minutes": 20})  # refused when the config is loaded


def test_engine_process_choices_that_cannot_work_are_refused_at_load():
    with pytest.raises(ValueError, match="engine_process=inline is impossible with the vllm engine"):
        _config(rollout={"engine": "vllm", "engine_process": "inline"})
    with pytest.raises(ValueError, match="sglang engine is its own server"):
        _config(rollout={"engine": "sglang", "sglang_url": "http://h:1", "engine_process": "subprocess"})


def test_watchdog_reports_a_stuck_phase_once_with_its_stack(tmp_path, capfd):
    with Watchdog(0.3, tmp_path / "watchdog", rank=5) as dog:
        with activity("step 7"):
            with activity("quick phase"):
                pass
            with activity("stuck phase"):
                assert _wait_until(lambda: dog.reports >= 1, 30)
                time.sleep(1.0)  # still stuck: no second report for the same phase
    text = (tmp_path / "watchdog" / "rank_5.txt").read_text()
    assert text.count("=== watchdog") == 1
    assert "rank 5" in text and "'step 7 > stuck phase'" in text
    assert "in _wait_until" in text  # the main thread's stack, where it really was
    assert "'step 7 > stuck phase'" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# End to end


def write_config(path: Path, tiny: Path, out: Path, **sections) -> Path:
    """The shared tiny config, run for 4 steps with the hf engine in a child process (so the
    tests can kill it)."""
    merged = {"run": {"total_steps": 4}, "rollout": {"engine_process": "subprocess"}}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return write_train_config(path, tiny, out, **merged)


def metrics(out: Path, drop=("timing/",)) -> list[dict]:
    return read_metrics(out, drop)


def exit_status(out: Path) -> dict:
    return json.loads((out / "exit_status.json").read_text())


def _env(faults: Path, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RLMT_FAULT_DIR": str(faults), **extra}


def _job(cfg: Path, log: Path, env: dict) -> subprocess.Popen:
    """rlmt-train under torchrun (2 ranks) in its own session, so the test can signal the whole job."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), WORKER, str(cfg)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def test_stop_resume_engine_kill_and_sigkill_chain_matches_uninterrupted_run(tiny_models, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("RLMT_FAULT_DIR", str(faults))
    every_step = {"run": {"total_steps": 4, "save_every": 1}}  # periodic checkpoints: the SIGKILL resumes from one
    torchrun(2, [WORKER, str(write_config(tmp_path / "a.yaml", tiny_models, straight, **every_step))], timeout=600)

    # 1. SIGTERM to the whole job (torchrun, both ranks, the engine process) while step 2 generates.
    cfg = write_config(tmp_path / "b.yaml", tiny_models, stopped, **every_step)
    log = tmp_path / "stopped.log"
    proc = _job(cfg, log, _env(faults, RLMT_FAULT="pause@1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300"))
    try:
        assert _wait_until(lambda: (faults / "paused.pid").exists() or proc.poll() is not None, 400), "never paused"
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "stopped by SIGTERM (step 2's rollout was abandoned)" in text, text[-3000:]
    status = exit_status(stopped)
    assert (status["status"], status["requeue"], status["exit_code"], status["step"]) == ("stopped", True, 75, 1)
    assert Path(status["checkpoint"]).name == "step_00000001"
    assert (Path(status["checkpoint"]) / "COMPLETE").exists()
    assert [r["step"] for r in metrics(stopped)] == [1]

    # 2. Automatic resume; step 3's first generation kills its engine process: restarted, retried.
    #    Once step 3's checkpoint is complete, SIGKILL the whole job (no handler runs, no status).
    log = tmp_path / "resumed.log"
    proc = _job(cfg, log, _env(faults, RLMT_FAULT="die@2"))
    marker = stopped / "checkpoints" / "step_00000003" / "COMPLETE"
    try:
        assert _wait_until(lambda: marker.exists() or proc.poll() is not None, 400), "step 3's checkpoint never completed"
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "hf engine process died (exit code -9) while generating" in log.read_text()
    assert (faults / "died.pid").exists()
    assert not (stopped / "checkpoints" / "step_00000004").exists()
    assert not (stopped / "exit_status.json").exists()  # cleared when the run started; a SIGKILLed run writes none

    # 3. Automatic resume from step 3's periodic checkpoint; the run finishes.
    torchrun(2, [WORKER, str(cfg)], timeout=600)
    assert exit_status(stopped)["status"] == "finished"

    assert [r["rollout/restarts"] for r in metrics(stopped)] == [0, 0, 1, 1]
    drop = ("timing/", "rollout/restarts")
    assert metrics(stopped, drop) == metrics(straight, drop)
    a = load_file(str(straight / "final_hf" / "model.safetensors"))
    b = load_file(str(stopped / "final_hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_during_the_update_finishes_the_step_and_exits_for_requeue(tiny_models, tmp_path):
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, rollout={"engine_process": "inline"})
    proc = subprocess.Popen([sys.executable, WORKER, str(cfg)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=_env(faults, RLMT_FAULT_TRAIN="pause@2"))
    try:
        assert _wait_until(lambda: (faults / "training_2").exists() or proc.poll() is not None, 400)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        (faults / "signalled").write_text("")
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err
    status = exit_status(out)
    assert (status["status"], status["requeue"], status["step"], status["signal"]) == ("stopped", True, 2, "SIGTERM")
    ckpt = out / "checkpoints" / "step_00000002"
    assert Path(status["checkpoint"]) == ckpt and (ckpt / "COMPLETE").exists()
    extra = json.loads((ckpt / "extra.json").read_text())
    assert (extra["step"], extra["weight_version"], extra["sampler"]["position"]) == (2, 2, 4)
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_a_hanging_engine_is_restarted_then_the_run_stops_with_a_checkpoint(tiny_models, tmp_path):
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, rollout={"timeout_s": 2, "max_restarts": 1},
                       run={"watchdog_timeout_s": 0.5})
    proc = subprocess.run([sys.executable, WORKER, str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=_env(faults, RLMT_FAULT="hang@1"))  # every generation from step 2 on hangs
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: the rollout engine failed 2 times in a row (rollout.max_restarts=1); last error: hf engine did " \
           "not answer within 2 s while generating" in proc.stderr
    assert "Traceback" not in proc.stderr
    hung = sorted(faults.glob("hang_*.pid"))
    assert len(hung) == 2  # the first engine and its one restart
    for pid in (int(p.read_text()) for p in hung):
        assert _wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30), f"engine process {pid} is still alive"
    status = exit_status(out)
    assert (status["status"], status["requeue"], status["step"]) == ("engine_failed", False, 1)
    extra = json.loads((out / "checkpoints" / "step_00000001" / "extra.json").read_text())
    assert (extra["step"], extra["engine_restarts"]) == (1, 1)
    assert [r["step"] for r in metrics(out)] == [1]
    # the loop's watchdog said where rank 0 was stuck
    report = (out / "watchdog" / "rank_0.txt").read_text()
    assert "'step 2 > rollout > engine generate'" in report and "subprocess_engine.py" in report


def test_watchdog_names_what_each_rank_waits_on_and_the_collective_times_out(tmp_path):
    # The collective timeout (8 s) also bounds the rendezvous: short enough to keep the test quick,
    # long enough for two ranks to meet on a loaded 2-core machine (2 s timed out there once).
    torchrun(2, ["tests/workers/watchdog_worker.py", "--out", str(tmp_path), "--timeout-s", "8", "--watchdog-s", "0.5",
                 "--sleep", "12"], timeout=300)
    waiting = (tmp_path / "watchdog" / "rank_0.txt").read_text()
    stuck = (tmp_path / "watchdog" / "rank_1.txt").read_text()
    assert "rank 0" in waiting and "'step 1 > barrier: waiting for rank 1'" in waiting and " in barrier" in waiting
    assert "rank 1" in stuck and "'step 1 > slow work on rank 1'" in stuck and " in _slow_work" in stuck
    # the barrier failed after the configured timeout instead of waiting for rank 1
    error = json.loads((tmp_path / "rank0_result.json").read_text())["error"]
    assert error is not None and "Timed out" in error


def _ranks_of(torchrun_pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


# Where a stop signal lands. torchrun starts each rank in a session of its own (with the rank's
# helper processes: checkpoint writers, engine process), so "job" signals torchrun's group and
# every rank's group: every process of the job, as SLURM (preemption, time limit, scancel) does.
DELIVERIES = {
    "job": (signal.SIGTERM, ("torchrun", "rank groups")),
    "ranks": (signal.SIGTERM, ("ranks",)),
    "torchrun": (signal.SIGTERM, ("torchrun",)),  # it forwards to each rank's process group
    "job-sigint": (signal.SIGINT, ("torchrun", "rank groups")),  # Ctrl-C, with SIGINT a stop signal
}


@pytest.mark.parametrize("delivery", list(DELIVERIES))
def test_a_stop_signal_after_a_periodic_checkpoint_stops_with_a_checkpoint_wherever_it_is_delivered(
        tiny_models, tmp_path, delivery):
    # The periodic checkpoint of step 1 has started the checkpoint writer's helpers; the stop
    # checkpoint of step 2 needs them (or their replacements) alive after the signal.
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    sig, targets = DELIVERIES[delivery]
    run = {"total_steps": 4, "save_every": 1}
    if sig == signal.SIGINT:
        # Ctrl-C also reaches the engine's own process, which dies mid-sync: the loop sees an
        # engine failure (a reset pipe included) and still stops with its checkpoint
        run["stop_signals"] = ["SIGTERM", "SIGINT"]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, run=run)
    log = tmp_path / "stopped.log"
    # launch/env.sh's shutdown timeout: torchrun, when signalled, waits that long for the ranks
    proc = _job(cfg, log, _env(faults, RLMT_FAULT_TRAIN="pause@2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="100"))
    try:
        assert _wait_until(lambda: (faults / "training_2").exists() or proc.poll() is not None, 400), "never paused"
        assert proc.poll() is None, log.read_text()[-3000:]
        ranks = _ranks_of(proc.pid)
        assert len(ranks) == 2, ranks
        if "torchrun" in targets:
            os.killpg(proc.pid, sig)
        for rank in ranks:
            if "rank groups" in targets:
                os.killpg(rank, sig)
            elif "ranks" in targets:
                os.kill(rank, sig)
        (faults / "signalled").write_text("")
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    # torchrun exits 1 both when its workers exit 75 and when it was signalled itself: the launch
    # scripts (launch/slurm/common.sh) decide from exit_status.json, never from this code.
    assert proc.returncode == 1, text[-3000:]
    assert "BrokenPipeError" not in text, text[-3000:]
    assert f"stopped by {sig.name} (after step 2)" in text, text[-3000:]
    status = exit_status(out)
    assert (status["status"], status["requeue"], status["exit_code"], status["step"], status["signal"]) == \
        ("stopped", True, 75, 2, sig.name)
    ckpt = out / "checkpoints" / "step_00000002"
    assert Path(status["checkpoint"]) == ckpt and (ckpt / "COMPLETE").exists()
    assert not list((out / "checkpoints").glob("*.tmp")), sorted(p.name for p in (out / "checkpoints").iterdir())
    first = metrics(out)
    assert [r["step"] for r in first] == [1, 2]

    if delivery == "job":  # one resume for all deliveries: the same command finishes the run
        torchrun(2, [WORKER, str(cfg)], timeout=600)
        assert exit_status(out)["status"] == "finished"
        rows = metrics(out)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert rows[:2] == first
