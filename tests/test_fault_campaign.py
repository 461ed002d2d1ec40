"""The fault campaign: a tiny RLMT run (GRPO, policy at TP=2 over two torchrun ranks, the hf
engine in its own process) under every fault a cluster deals out, each checked for the exit
status, ``exit_status.json``, the checkpoints on disk and the lines the user reads; and, the
reference for "nothing was lost", a resumed run's metrics and final weights must equal an
uninterrupted run's, bit for bit. docs/reliability.md reports the campaign as a table (a test
below keeps the two in step).

Faults are injected by tests/workers/fault_inject_worker.py (pauses in the update and inside a
checkpoint write) and faulty_engines.py (engine deaths, hangs, pauses in a generation or in a
weight sync); a "kill -9" kills every process of the job at once, as a dead node does. The
tests are grouped in classes so that pytest-xdist (``--dist loadscope``) spreads them.
"""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, free_port, read_metrics, torchrun, write_train_config
from rlmt_megatron.trainer.run_folder import LOCK_NAME

WORKER = "tests/workers/fault_inject_worker.py"
RELIABILITY_DOC = REPO / "docs" / "reliability.md"


def _wait_until(condition, timeout_s: float = 400.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def write_config(path: Path, tiny: Path, out: Path, **sections) -> Path:
    """The shared tiny config: 4 steps, the policy at TP=2, the hf engine in a child process (so
    the tests can kill it)."""
    merged = {"run": {"total_steps": 4}, "rollout": {"engine_process": "subprocess"}, "build": {"parallel": {"tp": 2}}}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return write_train_config(path, tiny, out, **merged)


def metrics(out: Path, drop=("timing/", "engines/")) -> list[dict]:
    return read_metrics(out, drop)


def exit_status(out: Path) -> dict:
    return json.loads((out / "exit_status.json").read_text())


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final_hf" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def complete_steps(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    out = []
    for child in map(int, children):
        out += [child, *_descendants(child)]
    return out


class Job:
    """rlmt-train under torchrun (2 ranks) in its own session, its output in ``log``.

    torchrun starts each rank in a session of its own (with the rank's engine process and
    checkpoint writers), so :meth:`kill_all` walks the process tree: every process of the job
    gets SIGKILL at once, as when a node dies.
    """

    def __init__(self, cfg: Path, log: Path, faults: Path, *overrides: str, file_size_limit: int | None = None,
                 **env: str):
        self.log, self.faults = log, faults
        faults.mkdir(parents=True, exist_ok=True)
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RLMT_FAULT_DIR": str(faults), **env}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), WORKER, str(cfg), *overrides]

        def limit_file_size():  # in the child: torchrun and every process it starts inherit it
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=environ, preexec_fn=limit_file_size)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, marker: str) -> None:
        """Until the fault's marker file appears; the job must still be running then."""
        assert _wait_until(lambda: (self.faults / marker).exists() or self.proc.poll() is not None), \
            f"{marker} never appeared"
        assert self.proc.poll() is None, self.text()[-3000:]

    def signal_all(self, sig: signal.Signals) -> None:
        """``sig`` to torchrun and every process under it, as SLURM signals a job's processes."""
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # ended meanwhile
                pass

    def kill_all(self) -> None:
        self.signal_all(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.kill_all()


def rank_error(text: str) -> str:
    """The one-line error rank 0 printed (torchrun adds its own report after it)."""
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert lines, text[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# One run folder through every kill, a full disk and a damaged checkpoint


class TestKillsDiskAndDamageOnOneRun:
    """One chain on one folder, against one uninterrupted reference run. Each start resumes
    from what the previous fault left; the finished run must equal the reference."""

    def test_every_fault_resumes_to_the_uninterrupted_runs_metrics_and_weights(self, tiny_models, tmp_path):
        straight, chain, faults = tmp_path / "straight", tmp_path / "chain", tmp_path / "faults"
        every_step = {"run": {"total_steps": 4, "save_every": 1}}
        ref_cfg = write_config(tmp_path / "straight.yaml", tiny_models, straight, **every_step)
        cfg = write_config(tmp_path / "chain.yaml", tiny_models, chain, **every_step)

        # Reference. While it trains step 2, a second run on its folder is refused: one line
        # naming the holder (rank 0, this host), the running job untouched.
        ref = Job(ref_cfg, tmp_path / "straight.log", faults / "ref", RLMT_FAULT_TRAIN="pause@2")
        ref.wait_for("training_2")
        holder = int((faults / "ref" / "training_2").read_text())
        second = torchrun(2, [WORKER, str(ref_cfg)], check=False, timeout=300)
        assert second.returncode != 0
        assert rank_error(second.stdout + second.stderr).startswith(
            f"error: run.out_dir {straight} is in use by another run (host {socket.gethostname()}, pid {holder}, since ")
        (faults / "ref" / "signalled").write_text("")
        assert ref.finish() == 0, ref.text()[-3000:]
        assert exit_status(straight)["status"] == "finished"
        reference = metrics(straight)
        assert [r["step"] for r in reference] == [1, 2, 3, 4]

        # 1. SIGTERM to every process while step 2 generates: the rollout is abandoned, step 1's
        #    checkpoint stands, the ranks exit 75 for a requeue. The folder starts with the lock of
        #    a killed run (this host, its pid gone): taken over, not a refusal.
        chain.mkdir()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (chain / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then"}))
        job = Job(cfg, tmp_path / "1_sigterm.log", faults / "1", RLMT_FAULT="pause@1",
                  TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300")
        job.wait_for("paused_1.pid")
        job.signal_all(signal.SIGTERM)
        job.finish()
        assert "taking over the lock of a run that is gone" in job.text(), job.text()[-3000:]
        assert "stopped by SIGTERM (step 2's rollout was abandoned)" in job.text(), job.text()[-3000:]
        status = exit_status(chain)
        assert (status["status"], status["requeue"], status["exit_code"], status["step"]) == ("stopped", True, 75, 1)
        assert complete_steps(chain) == ["step_00000001"]

        # 2. A full disk when step 2's checkpoint is written (a file-size limit between the
        #    largest other file of the run and the optimizer state's files): one error saying
        #    how much room there is, status "failed" (not requeued) naming step 1's checkpoint,
        #    the unfinished folder removed.
        sizes = {p: p.stat().st_size for p in (straight / "checkpoints").rglob("*") if p.is_file()}
        optimizer = min(s for p, s in sizes.items() if p.parent.name == "optimizer" and p.suffix == ".distcp")
        others = max(s for p, s in sizes.items() if p.parent.name != "optimizer")
        assert others < optimizer, (others, optimizer)
        limit = (others + optimizer) // 2
        job = Job(cfg, tmp_path / "2_disk.log", faults / "2", file_size_limit=limit)
        assert job.finish() != 0
        line = rank_error(job.text())
        assert line.startswith(f"error: {chain}/checkpoints/step_00000002.tmp: writing the checkpoint failed ("), line
        assert f"a file-size limit (ulimit -f) of {limit} bytes" in line
        assert "]: Traceback" not in job.text()  # no rank's traceback ("[rank0]: ..."); torchrun prints its own
        status = exit_status(chain)
        assert (status["status"], status["requeue"], status["exit_code"], status["step"]) == ("failed", False, 2, 1)
        assert status["checkpoint"] == str(chain / "checkpoints" / "step_00000001")
        assert status["message"].endswith(f"the newest complete checkpoint is step 1's: {status['checkpoint']}")
        assert complete_steps(chain) == ["step_00000001"]
        assert not (chain / LOCK_NAME).exists()  # a run that fails removes its lock

        # 3. kill -9 of the job inside step 2's checkpoint write (weights written, optimizer
        #    state and COMPLETE not): the .tmp folder is never resumed from.
        job = Job(cfg, tmp_path / "3_ckpt.log", faults / "3", RLMT_FAULT_CKPT="pause@2")
        job.wait_for("checkpoint_2")
        job.kill_all()
        assert complete_steps(chain) == ["step_00000001", "step_00000002.tmp"]
        assert not (chain / "exit_status.json").exists()  # cleared at start; a killed run writes none

        # 4. kill -9 during step 3's policy update (the second update of this start).
        job = Job(cfg, tmp_path / "4_train.log", faults / "4", RLMT_FAULT_TRAIN="pause@2")
        job.wait_for("training_2")
        job.kill_all()
        assert complete_steps(chain) == ["step_00000001", "step_00000002"]  # the stale .tmp cleaned by the save

        # 5. kill -9 during step 3's weight sync to the engine (version 3, one bucket applied).
        job = Job(cfg, tmp_path / "5_sync.log", faults / "5", RLMT_FAULT="pausesync@3")
        job.wait_for("syncing_3.pid")
        job.kill_all()
        assert complete_steps(chain) == ["step_00000001", "step_00000002"]

        # 6. The engine process dies in step 3's generation (restarted, the step retried); then
        #    kill -9 during step 4's generation, after step 3's checkpoint.
        job = Job(cfg, tmp_path / "6_engine.log", faults / "6", RLMT_FAULT="die@2,pause@3")
        job.wait_for("paused_3.pid")
        job.kill_all()
        assert "hf engine process died (exit code -9) while generating" in job.text(), job.text()[-3000:]
        assert (faults / "6" / "died.pid").exists()
        assert "step_00000003" in complete_steps(chain) and "step_00000004" not in complete_steps(chain)

        # 7. Step 3's checkpoint is damaged on disk (a weight shard cut short): the resume says so
        #    and continues from step 2's; the run finishes.
        shard = sorted((chain / "checkpoints" / "step_00000003" / "policy" / "model").glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[:1000])
        job = Job(cfg, tmp_path / "7_damaged.log", faults / "7")
        assert job.finish() == 0, job.text()[-3000:]
        assert re.search(rf"warning: checkpoint {chain}/checkpoints/step_00000003 is damaged \({chain}/checkpoints/"
                         r"step_00000003/policy: cannot load the Megatron checkpoint of role policy", job.text())
        assert "resuming from the one before it instead" in job.text()
        assert exit_status(chain)["status"] == "finished"

        drop = ("timing/", "rollout/restarts", "engines/")  # engine speeds and restarts vary with the faults
        assert metrics(chain, drop) == [{k: v for k, v in r.items() if not k.startswith(drop)} for r in reference]
        assert_same_weights(straight, chain)

        # 8. A fresh run (run.resume=never) on the used folder: refused, nothing in it touched.
        before = {str(p): p.stat().st_mtime_ns for p in chain.rglob("*")}
        fresh = torchrun(2, [WORKER, str(cfg), "run.resume=never"], check=False, timeout=300)
        assert fresh.returncode != 0
        assert rank_error(fresh.stdout + fresh.stderr).startswith(
            f"error: run.out_dir {chain} holds a previous run's outputs (checkpoints/ (steps 3, 4), metrics.jsonl, ")
        assert {str(p): p.stat().st_mtime_ns for p in chain.rglob("*")} == before


# ---------------------------------------------------------------------------------------------
# Stop signals, wherever they are delivered


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


class TestStopSignalDeliveries:
    @pytest.mark.parametrize("delivery", list(DELIVERIES))
    def test_a_stop_signal_after_a_periodic_checkpoint_stops_with_a_checkpoint_wherever_it_is_delivered(
            self, tiny_models, tmp_path, delivery):
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
        proc = Job(cfg, log, faults, RLMT_FAULT_TRAIN="pause@2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="100").proc
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
        assert [r["step"] for r in metrics(out)] == [1, 2]
        # (a resume from a stop checkpoint, to the uninterrupted run's numbers: the first test)


# ---------------------------------------------------------------------------------------------
# One process (world of one, the exit status seen directly)

ONE_PROCESS = {"parallel": {"tp": 1}}


def _env(faults: Path, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RLMT_FAULT_DIR": str(faults), **extra}


class TestOneProcess:
    def test_sigterm_during_the_update_finishes_the_step_and_exits_for_requeue(self, tiny_models, tmp_path):
        out, faults = tmp_path / "run", tmp_path / "faults"
        faults.mkdir()
        cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, rollout={"engine_process": "inline"}, build=ONE_PROCESS)
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

    def test_a_hanging_engine_is_restarted_then_the_run_stops_with_a_checkpoint(self, tiny_models, tmp_path):
        out, faults = tmp_path / "run", tmp_path / "faults"
        faults.mkdir()
        cfg = write_config(tmp_path / "cfg.yaml", tiny_models, out, rollout={"timeout_s": 2, "max_restarts": 1},
                           run={"watchdog_timeout_s": 0.5}, build=ONE_PROCESS)
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


    def test_one_engine_of_two_dies_mid_rollout_and_the_async_run_equals_an_uninterrupted_one(self, tiny_models, tmp_path):
        # Two hf engines (rollout.engines: 2), each in its own process, with asynchronous rollouts
        # (rollout.max_staleness: 2, TIS). In the faulty run the engine processes kill themselves
        # at the first generation under weight version 0 (step 1's; once per run): the dead
        # engine's prompt finishes on the other, and it is restarted and re-synced (checksum
        # checked) before step 2's batch is launched. A prompt's samples depend only on the
        # prompt, the weights and the seed (hf engines in a fleet seed each prompt), so the run
        # equals the uninterrupted one, metrics and final weights bit for bit.
        #
        # Asynchronous, worked out by hand for four steps: step 1 samples synchronously (version
        # 0, trained at 0: staleness 0); step 2's batch is launched during step 1 from version 0
        # and trained at version 1 (staleness 1); step 3's is launched during step 2, still from
        # version 0 (no sync: 2 behind is within the bound) and trained at 2 (staleness 2); before
        # step 4's launch the engines must be synced (version 2); it is trained at 3 (staleness 1).
        runs = {}
        for name, fault in (("straight", {}), ("killed", {"RLMT_FAULT": "die@0"})):
            out, faults = tmp_path / name, tmp_path / f"faults_{name}"
            faults.mkdir()
            cfg = write_config(tmp_path / f"{name}.yaml", tiny_models, out, build=ONE_PROCESS,
                               run={"total_steps": 4, "save_every": 2}, optim={"lr": 1e-2},
                               rollout={"engines": 2, "engine_process": "subprocess", "max_staleness": 2},
                               algorithm={"kl_coef": 0.01, "entropy_coef": 0.001, "rollout_correction": {"mode": "tis"}})
            runs[name] = subprocess.run([sys.executable, WORKER, str(cfg)], cwd=REPO, capture_output=True, text=True,
                                        timeout=600, env=_env(faults, **fault))
            assert runs[name].returncode == 0, runs[name].stderr[-3000:]
        err = runs["killed"].stderr
        died = re.search(r"rollout engine (\d) failed: hf engine process died \(exit code -9\) while generating", err)
        assert died, err[-3000:]
        dead = int(died.group(1))
        assert f"restarting rollout engine {dead} (1/3 in a row, 1 in this run)" in err
        drop = ("timing/", "engines/", "rollout/restarts")
        assert metrics(tmp_path / "killed", drop) == metrics(tmp_path / "straight", drop)
        assert_same_weights(tmp_path / "straight", tmp_path / "killed")

        killed, rows = read_metrics(tmp_path / "killed"), read_metrics(tmp_path / "straight")
        # each step's 2 prompts served once: in step 1 both by the live engine, then one each
        assert killed[0][f"engines/{1 - dead}/prompts"] == 2 and killed[0][f"engines/{dead}/prompts"] == 0
        assert all(r["engines/0/prompts"] == r["engines/1/prompts"] == 1 for r in killed[1:] + rows)
        # restarted within step 1, before step 2's launch
        assert [r["rollout/restarts"] for r in killed] == [1] * 4 and killed[3][f"engines/{dead}/restarts"] == 1
        assert [r["engines/serving"] for r in killed] == [2] * 4
        # the staleness as worked out above; the one sync before step 4's launch
        assert [r["rollout/staleness_max"] for r in rows] == [r["rollout/staleness_mean"] for r in rows] == [0, 1, 2, 1]
        assert [r["rollout/off_policy_token_frac"] for r in rows] == [0, 1, 1, 1]
        hist = [{int(k.rsplit("/", 1)[1]): v for k, v in r.items() if k.startswith("rollout/staleness_hist/")}
                for r in rows]
        assert hist == [{0: 1}, {0: 0, 1: 1}, {0: 0, 1: 0, 2: 1}, {0: 0, 1: 1}]
        assert ["timing/sync" in r for r in rows] == [False, False, True, False]
        # the correction sees the staleness: weights of 1 on step 1 (same weights, two float32
        # implementations), clearly not on the stale steps
        on_policy = abs(rows[0]["rollout_correction/weight_max"] - 1)
        assert on_policy < 1e-4
        assert all(abs(r["rollout_correction/weight_max"] - 1) > 10 * max(on_policy, 1e-5) for r in rows[1:]), rows
        # a checkpoint keeps the sampler after the trained steps' prompts (2 per step), not after a launched batch's
        for step in (2, 4):
            extra = json.loads((tmp_path / "straight" / "checkpoints" / f"step_{step:08d}" / "extra.json").read_text())
            assert (extra["step"], extra["sampler"]["position"]) == (step, 2 * step)


# ---------------------------------------------------------------------------------------------
# The report


def test_the_reliability_doc_reports_every_test_of_the_campaign():
    import ast

    tree = ast.parse(Path(__file__).read_text())
    tests = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
             and node.name.startswith("test_") and node.name != "test_the_reliability_doc_reports_every_test_of_the_campaign"]
    table = RELIABILITY_DOC.read_text()
    assert len(tests) == 5
    missing = [name for name in tests if f"`{name}" not in table]
    assert not missing, f"docs/reliability.md does not report {missing}"
    assert [d for d in DELIVERIES if f"[{d}]`" not in table] == []
