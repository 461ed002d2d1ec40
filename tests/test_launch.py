"""The launch scripts' logic, without a cluster: rendezvous of launch/torchrun.sh, sweep line
selection, SIGTERM forwarding and requeue, and the disaggregated layout.

The scripts run for real under bash; ``python``, ``scontrol``, ``srun`` and ``nvidia-smi`` on PATH
are fakes written here. The fake ``python`` records the ``torch.distributed.run`` /
``sglang.launch_server`` command it was given (anything else goes to the real interpreter), and the
recorded torchrun command is read back with **torch's own torchrun argument parser**, so the checks
are on what torchrun would do, not on our spelling of it. The real-SLURM run is tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from helpers import REPO, free_port, free_ports

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SWEEP_LINE = REPO / "launch" / "sweep_line.py"
SLURM_DIR = REPO / "launch" / "slurm"
RECORD_ENV = ["OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "WANDB_MODE", "HF_HOME", "TRITON_CACHE_DIR",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "PYTHONUNBUFFERED",
              "CUDA_VISIBLE_DEVICES", "NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "SLURMD_NODENAME"]

FAKE_PYTHON = """\
#!{real}
# Fake interpreter: records torchrun / sglang launches, runs anything else with the real one.
import http.server, json, os, signal, sys, threading, time
argv = sys.argv[1:]
kind = {{"torch.distributed.run": "torchrun", "sglang.launch_server": "sglang"}}.get(argv[1] if argv[:1] == ["-m"] else "")
if kind is None:
    os.execv({real!r}, [{real!r}, *argv])
log = os.environ["FAKE_LOG"]
rec = {{"argv": argv, "env": {{k: os.environ.get(k) for k in {keys!r}}}, "pid": os.getpid()}}
with open(os.path.join(log, f"{{kind}}-{{os.getpid()}}.json"), "w") as f:
    json.dump(rec, f)
mode = os.environ.get("FAKE_" + kind.upper(), "exit:0")
def status():  # what rlmt-train writes before it exits (trainer/stop.py), when the test asks for it
    if kind == "torchrun" and os.environ.get("FAKE_STATUS"):
        with open(os.environ["FAKE_STATUS_FILE"], "w") as f:
            f.write(os.environ["FAKE_STATUS"])
def on_term(*_):
    open(os.path.join(log, f"term-{{kind}}-{{os.getpid()}}"), "w").close()
    status()
    os._exit(int(os.environ.get("FAKE_TERM_EXIT", "0")))
signal.signal(signal.SIGTERM, on_term)
if mode.startswith("exit:"):
    status()
    sys.exit(int(mode[5:]))
if mode == "ranks":  # like torchrun: ranks in their own sessions, exit 1 when one fails
    import subprocess
    rank = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_rank.py")
    procs = [subprocess.Popen([sys.executable, rank], start_new_session=True) for _ in range(2)]
    open(os.path.join(log, f"ready-{{kind}}-{{os.getpid()}}"), "w").close()
    sys.exit(1 if any([p.wait() for p in procs]) else 0)
if mode == "serve":  # answer /health_generate like a healthy SGLang server
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health_generate" else 404); self.end_headers()
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
open(os.path.join(log, f"ready-{{kind}}-{{os.getpid()}}"), "w").close()
for _ in range(600):  # "wait_term", "serve", "hang": until SIGTERM, at most a minute
    time.sleep(0.1)
sys.exit(3)
"""

# A rank with a helper process in its process group (like the checkpoint writer's manager):
# records the SIGTERMs each receives; the rank exits 75 on it, the helper ends with its rank.
FAKE_RANK = """\
import os, signal, subprocess, sys, time
log = os.environ["FAKE_LOG"]
def mark(what):
    open(os.path.join(log, f"{{what}}-{{os.getpid()}}"), "w").close()
if sys.argv[1:] == ["helper"]:
    signal.signal(signal.SIGTERM, lambda *_: (mark("term-helper"), os._exit(0)))
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.05)
    sys.exit(0)
helper = subprocess.Popen([sys.executable, __file__, "helper"])
signal.signal(signal.SIGTERM, lambda *_: (mark("term-rank"), os._exit(75)))
mark("ready-rank")
time.sleep(60)
"""

FAKE_SCONTROL = """\
#!{real}
import os, sys
a = sys.argv[1:]
if a[:2] == ["show", "hostnames"]:
    print("\\n".join(a[2].split(",")))
elif a[:1] == ["requeue"]:
    with open(os.path.join(os.environ["FAKE_LOG"], "scontrol.log"), "a") as f:
        f.write(" ".join(a) + "\\n")
else:
    sys.exit("fake scontrol: unsupported " + " ".join(a))
"""

# srun: the command once per node of the step (concurrently, like srun), with the step's
# variables; SIGTERM is forwarded to every node's command.
FAKE_SRUN = """\
#!{real}
import json, os, signal, subprocess, sys
a = sys.argv[1:]
opts = {{}}
while a and a[0].startswith("--"):
    k, _, v = a.pop(0)[2:].partition("=")
    opts[k] = v
hosts = opts.get("nodelist", os.environ.get("SLURM_JOB_NODELIST", "")).split(",")
n = int(opts.get("nodes", len(hosts)))
with open(os.path.join(os.environ["FAKE_LOG"], f"srun-{{os.getpid()}}.json"), "w") as f:
    json.dump({{"opts": opts, "cmd": a}}, f)
procs = [subprocess.Popen(a, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_NODEID": str(i),
         "SLURM_STEP_NUM_NODES": str(n), "SLURM_STEP_NODELIST": ",".join(hosts[:n]), "SLURMD_NODENAME": hosts[i]}})
         for i in range(n)]
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
rcs = [p.wait() for p in procs]
sys.exit(next((r for r in rcs if r), 0))
"""

FAKE_NVIDIA_SMI = """\
#!/bin/sh
[ -n "$FAKE_GPUS" ] || {{ echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." ; exit 9; }}
i=0; while [ "$i" -lt "$FAKE_GPUS" ]; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; i=$((i+1)); done
"""


@pytest.fixture
def fake(tmp_path):
    """(environment, log dir): fakes first on PATH, no launch/SLURM variables inherited."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in {"python": FAKE_PYTHON, "scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN,
                       "nvidia-smi": FAKE_NVIDIA_SMI, "fake_rank.py": FAKE_RANK}.items():
        path = bin_dir / name
        path.write_text(text.format(real=sys.executable, keys=RECORD_ENV))
        path.chmod(0o755)
    drop = ("SLURM_", "SLURMD_", "MASTER_", "RLMT_", "WANDB_", "TORCH_NCCL_", "TORCH_ELASTIC", "PET_", "SGLANG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for k in ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "CPU_PROCS_PER_NODE", "OMP_NUM_THREADS",
              "CUDA_VISIBLE_DEVICES", "HF_HOME", "TRITON_CACHE_DIR"):
        env.pop(k, None)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), RLMT_CACHE_ROOT=str(tmp_path / "cache"),
               RLMT_LOCAL_CACHE=str(tmp_path / "local"), PYTHONPATH=str(REPO))
    return env, log


@pytest.fixture
def recipe(tmp_path):
    """A valid rlmt-train config (the scripts load it before launching); nothing reads the files."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"run: {{out_dir: {tmp_path / 'run'}, total_steps: 1}}\n"
                    "models: {policy: /models/p, reward: /models/rm}\ndata: {prompts: [p.jsonl]}\n")
    return path


def run(cmd, env, timeout=60, **kw):
    return subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def records(log: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(log.glob(f"{kind}-*.json"))]


def torchrun_args(rec: dict):
    """The recorded command as torchrun itself parses it."""
    assert rec["argv"][:2] == ["-m", "torch.distributed.run"], rec["argv"]
    return get_args_parser().parse_args(rec["argv"][2:])


def launch(env, log, *args, **extra_env):
    proc = run(["bash", TORCHRUN_SH, *args], {**env, **extra_env})
    assert proc.returncode == 0, proc.stderr
    (rec,) = records(log, "torchrun")
    return torchrun_args(rec), rec["env"]


# ---------------------------------------------------------------------------------- torchrun.sh


def test_single_node_without_gpu_is_one_standalone_cpu_process(fake, recipe):
    env, log = fake
    a, e = launch(env, log, recipe, "optim.lr=1e-5", "data.prompts=[a.jsonl, b.jsonl]")
    assert a.standalone
    assert a.nproc_per_node == "1" and a.max_restarts == 0
    assert a.module and a.training_script == "rlmt_megatron.cli.train"
    assert a.training_script_args == [str(recipe), "optim.lr=1e-5", "data.prompts=[a.jsonl, b.jsonl]"]
    # launch/env.sh reached the trainer's environment
    cores = os.cpu_count()
    assert e["OMP_NUM_THREADS"] == str(cores) and e["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert e["WANDB_MODE"] == "offline" and e["PYTHONUNBUFFERED"] == "1"
    assert e["HF_HOME"] == env["RLMT_CACHE_ROOT"] + "/huggingface"
    assert e["TRITON_CACHE_DIR"] == env["RLMT_LOCAL_CACHE"] + "/triton"
    assert e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and int(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 120


def test_gpus_counted_with_nvidia_smi_one_process_each(fake, recipe):
    env, log = fake
    a, e = launch(env, log, recipe, FAKE_GPUS="4", OMP_NUM_THREADS="7", WANDB_API_KEY="x")
    assert a.nproc_per_node == "4"
    assert e["OMP_NUM_THREADS"] == "7" and e["WANDB_MODE"] == "online"  # caller's value kept; key → online


def test_cpu_flag_hides_gpus_and_cpu_procs_per_node(fake, recipe):
    env, log = fake
    a, e = launch(env, log, "--cpu", recipe, FAKE_GPUS="8", CPU_PROCS_PER_NODE="2")
    assert a.nproc_per_node == "2" and e["CUDA_VISIBLE_DEVICES"] == ""


def test_slurm_multi_node_rendezvous(fake, recipe):
    env, log = fake
    slurm = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu07,gpu08,gpu11", SLURM_NNODES="3",
                 SLURM_NODEID="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96")
    a, e = launch(env, log, recipe, **slurm)
    assert not a.standalone
    assert (a.nnodes, a.node_rank, a.master_addr, a.master_port) == ("3", 2, "gpu07", 20000 + 4242 % 20000)
    assert a.nproc_per_node == "8" and a.rdzv_backend == "static"
    assert "timeout=900" in a.rdzv_conf
    assert e["OMP_NUM_THREADS"] == "12"  # 96 cores / 8 ranks


def test_step_variables_win_over_job_variables(fake, recipe):
    # Inside an srun step over part of the job, the step's node list and size are the rendezvous.
    env, log = fake
    slurm = dict(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="a,b,c,d", SLURM_NNODES="4", SLURM_STEP_NODELIST="c,d",
                 SLURM_STEP_NUM_NODES="2", SLURM_NODEID="1", SLURM_GPUS_ON_NODE="2")
    a, _ = launch(env, log, recipe, **slurm)
    assert (a.nnodes, a.node_rank, a.master_addr) == ("2", 1, "c")


def test_explicit_environment_wins_over_slurm(fake, recipe):
    env, log = fake
    a, _ = launch(env, log, "--nproc-per-node", "3", recipe, SLURM_JOB_ID="9", SLURM_JOB_NODELIST="x,y",
                  SLURM_NNODES="2", SLURM_NODEID="0", SLURM_GPUS_ON_NODE="8", NNODES="4", NODE_RANK="3",
                  MASTER_ADDR="10.1.2.3", MASTER_PORT="31337")
    assert (a.nnodes, a.node_rank, a.master_addr, a.master_port, a.nproc_per_node) == ("4", 3, "10.1.2.3", 31337, "3")


def test_wandb_project_from_environment_unless_given(fake, recipe, tmp_path):
    env, log = fake
    a, _ = launch(env, log, recipe, RLMT_WANDB_PROJECT="rlmt-paper")
    assert a.training_script_args == [str(recipe), "monitoring.wandb.project=rlmt-paper"]
    for p in log.glob("torchrun-*.json"):
        p.unlink()
    a, _ = launch(env, log, recipe, "monitoring.wandb.project=mine", RLMT_WANDB_PROJECT="rlmt-paper")
    assert a.training_script_args == [str(recipe), "monitoring.wandb.project=mine"]


@pytest.mark.parametrize("case, extra_env, message", [
    ("no recipe", {}, "missing RECIPE.yaml"),
    ("missing file", {}, "recipe 'nope.yaml' not found"),
    ("rank out of range", {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK must be in [0, 2)"),
    ("multi-node without master", {"NNODES": "2", "NODE_RANK": "0"}, "2 nodes need MASTER_ADDR"),
    ("bad gpus", {"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be a non-negative integer"),
])
def test_torchrun_sh_errors(fake, recipe, case, extra_env, message):
    env, log = fake
    args = {"no recipe": [], "missing file": ["nope.yaml"]}.get(case, [recipe])
    proc = run(["bash", TORCHRUN_SH, *args], {**env, **extra_env})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not records(log, "torchrun")


def test_sigterm_reaches_the_ranks_not_their_helpers_nor_torchrun(fake, recipe):
    # torchrun would signal each rank's whole process group (helpers included), killing the
    # checkpoint writer's helpers mid-checkpoint; torchrun.sh signals the ranks themselves.
    env, log = fake
    p = subprocess.Popen(["bash", str(TORCHRUN_SH), str(recipe)], env={**env, "FAKE_TORCHRUN": "ranks"}, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: len(list(log.glob("ready-rank-*"))) == 2 and list(log.glob("ready-torchrun-*")))
        time.sleep(0.3)  # the helpers are started by then
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert len(list(log.glob("term-rank-*"))) == 2, err
    assert not list(log.glob("term-helper-*")) and not list(log.glob("term-torchrun-*")), err
    assert p.returncode == 1, err  # torchrun's own status after its ranks exited 75


# ---------------------------------------------------------------------------------- sweep lines


GRID = """\
# a comment, then a blank line

lr3e-7: optim.lr=3e-7 format.strict=true
optim.lr=1e-6 "data.prompts=[a.jsonl, b.jsonl]"   # trailing comment
zero: format.kind=zero
"""


def sweep_line(*args):
    return subprocess.run([sys.executable, SWEEP_LINE, *map(str, args)], capture_output=True, text=True, timeout=30)


def test_sweep_line_selection(tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text(GRID)
    assert sweep_line("--count", grid).stdout == "3\n"
    expected = {0: ["lr3e-7", "optim.lr=3e-7", "format.strict=true"],
                1: ["task001", "optim.lr=1e-6", "data.prompts=[a.jsonl, b.jsonl]"],
                2: ["zero", "format.kind=zero"]}
    for i, lines in expected.items():
        proc = sweep_line(grid, i)
        assert proc.returncode == 0 and proc.stdout.splitlines() == lines, proc


@pytest.mark.parametrize("text, task, message", [
    (GRID, 3, "task id 3 is out of range: the grid has 3 task(s), ids 0-2"),
    ("a: x=1\na: y=2\n", 0, "grid.txt:2: task name 'a' is already used on line 1"),
    ("x=1\nfoo\n", 0, "grid.txt:2: 'foo' is not a key=value override"),
    ("x=1 run.out_dir=/elsewhere\n", 0, "grid.txt:1: run.out_dir is set by the sweep"),
    ("b/c: x=1\n", 0, "task name 'b/c' must be letters"),
    ("x='1\n", 0, "grid.txt:1: cannot split the line"),
    ("# only comments\n\n", 0, "the grid has no task"),
])
def test_sweep_line_errors_name_file_and_line(tmp_path, text, task, message):
    grid = tmp_path / "grid.txt"
    grid.write_text(text)
    proc = sweep_line(grid, task)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_sweep_sbatch_runs_the_array_tasks_line(fake, recipe, tmp_path):
    env, log = fake
    grid = tmp_path / "grid.txt"
    grid.write_text(GRID)
    sweep = tmp_path / "sweep"
    slurm = dict(SLURM_JOB_ID="78", SLURM_ARRAY_JOB_ID="77", SLURM_ARRAY_TASK_ID="1", SLURM_SUBMIT_DIR=str(REPO),
                 RLMT_SWEEP_DIR=str(sweep))
    proc = run(["bash", SLURM_DIR / "sweep.sbatch", recipe, grid, "run.total_steps=2"], {**env, **slurm})
    assert proc.returncode == 0, proc.stderr
    (rec,) = records(log, "torchrun")
    a = torchrun_args(rec)
    assert a.training_script_args == [str(recipe), "run.total_steps=2", "optim.lr=1e-6", "data.prompts=[a.jsonl, b.jsonl]",
                                      f"run.out_dir={sweep}/task001", "monitoring.wandb.name=task001",
                                      "monitoring.wandb.group=sweep"]
    assert not (log / "scontrol.log").exists()  # finished without SIGTERM: no requeue


def test_sweep_sbatch_bad_task_id_stops_before_torchrun(fake, recipe, tmp_path):
    env, log = fake
    grid = tmp_path / "grid.txt"
    grid.write_text(GRID)
    proc = run(["bash", SLURM_DIR / "sweep.sbatch", recipe, grid], {**env, "SLURM_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "9",
                                                                    "SLURM_SUBMIT_DIR": str(REPO)})
    assert proc.returncode == 2 and "task id 9 is out of range" in proc.stderr
    assert not records(log, "torchrun")


# ------------------------------------------------------------------------- SIGTERM and requeue


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def exit_status(status: str, requeue: bool, code: int) -> str:
    """exit_status.json as the trainer writes it (its own writer, trainer/stop.py)."""
    from rlmt_megatron.trainer.stop import write_exit_status

    with tempfile.TemporaryDirectory() as d:
        # The message quotes the requeue key, which a careless reader of the file would take.
        return write_exit_status(d, status, requeue=requeue, exit_code=code, step=3, checkpoint=None,
                                 message='not "requeue": true', signal_name="SIGTERM").read_text()


STOPPED = exit_status("stopped", True, 75)
FINISHED = exit_status("finished", False, 0)
# The body of every batch script (launch/slurm/common.sh) around a run whose status file is $1;
# the decision matrix runs through it, without single_node.sbatch's config loading (seconds each).
BATCH_BODY = """\
set -euo pipefail
source "$RLMT_REPO/launch/slurm/common.sh"
rlmt_status_file="$1"
rlmt_start python -m torch.distributed.run
rlmt_wait "$rlmt_last_pid"
rlmt_finish "$rlmt_rc"
"""


@pytest.mark.parametrize("case, trainer, restarts, rc, requeued", [
    # SIGTERM → the trainer checkpoints, writes "stopped" and exits 75 → requeue (through single_node.sbatch)
    ("stopped", {"FAKE_STATUS": STOPPED, "FAKE_TERM_EXIT": "75"}, "0", 75, True),
    # a signal during the last step lets the run finish → no requeue despite SIGTERM
    ("finished anyway", {"FAKE_STATUS": FINISHED}, "0", 0, False),
    # killed before it could write its status (e.g. past torchrun's shutdown timeout) → requeue
    ("killed", {"FAKE_TERM_EXIT": "143"}, "0", 143, True),
    ("too many restarts", {"FAKE_STATUS": STOPPED, "FAKE_TERM_EXIT": "75"}, "20", 75, False),
])
def test_sigterm_is_forwarded_and_requeue_follows_the_exit_status(fake, recipe, tmp_path, case, trainer, restarts, rc,
                                                                   requeued):
    env, log = fake
    (tmp_path / "run").mkdir()
    status = tmp_path / "run" / "exit_status.json"
    job = {**env, "SLURM_JOB_ID": "4242", "RLMT_REPO": str(REPO), "SLURM_RESTART_COUNT": restarts,
           "FAKE_TORCHRUN": "wait_term", "FAKE_STATUS_FILE": str(status), **trainer}
    cmd = ["bash", SLURM_DIR / "single_node.sbatch", recipe] if case == "stopped" else ["bash", "-c", BATCH_BODY, "batch", status]
    p = subprocess.Popen([str(c) for c in cmd], env=job, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: list(log.glob("ready-torchrun-*"))), "fake torchrun never started"
        p.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 does: the batch shell only
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    (rec,) = records(log, "torchrun")
    assert (log / f"term-torchrun-{rec['pid']}").exists(), err  # torchrun (the trainer's parent) got SIGTERM
    assert p.returncode == rc, err  # the trainer's exit status is the job's
    requeue = (log / "scontrol.log").read_text() if (log / "scontrol.log").exists() else ""
    assert requeue == ("requeue 4242\n" if requeued else ""), err


@pytest.mark.parametrize("case, trainer, stale, requeued", [
    # stopped by a signal that reached the ranks but not the batch shell: the file decides
    ("stopped without batch SIGTERM", {"FAKE_TORCHRUN": "exit:75", "FAKE_STATUS": STOPPED}, False, True),
    ("crashed", {"FAKE_TORCHRUN": "exit:7"}, False, False),
    # an earlier attempt's "stopped" file must not requeue a run that now crashed before writing
    ("crashed, stale status file", {"FAKE_TORCHRUN": "exit:7"}, True, False),
])
def test_requeue_without_sigterm_only_when_this_attempt_asks(fake, tmp_path, case, trainer, stale, requeued):
    env, log = fake
    status = tmp_path / "run" / "exit_status.json"
    status.parent.mkdir()
    if stale:
        status.write_text(STOPPED)
        os.utime(status, (time.time() - 3600, time.time() - 3600))
    job = {**env, "SLURM_JOB_ID": "1", "RLMT_REPO": str(REPO), "FAKE_STATUS_FILE": str(status), **trainer}
    proc = run(["bash", "-c", BATCH_BODY, "batch", status], job)
    assert proc.returncode == int(trainer["FAKE_TORCHRUN"][5:]), proc.stderr
    assert (log / "scontrol.log").exists() == requeued, proc.stderr


def test_batch_interpreter_without_rlmt_falls_back_to_sigterm_rule(fake, recipe):
    # e.g. the ranks run in a container and the batch shell's interpreter cannot import rlmt
    env, log = fake
    proc = run(["bash", SLURM_DIR / "single_node.sbatch", recipe],
               {**env, "SLURM_JOB_ID": "3", "SLURM_SUBMIT_DIR": str(REPO), "RLMT_BATCH_PYTHON": "false"})
    assert proc.returncode == 0 and "could not resolve the run directory (exit 1)" in proc.stderr, proc.stderr
    assert len(records(log, "torchrun")) == 1 and not (log / "scontrol.log").exists()


def test_bad_config_fails_the_job_before_anything_starts(fake, tmp_path):
    env, log = fake
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {total_steps: -1}\nmodels: {policy: p, reward: r}\ndata: {prompts: [p.jsonl]}\n")
    proc = run(["bash", SLURM_DIR / "single_node.sbatch", bad], {**env, "SLURM_JOB_ID": "2", "SLURM_SUBMIT_DIR": str(REPO)})
    assert proc.returncode == 2 and "run.total_steps" in proc.stderr, proc.stderr
    assert not records(log, "torchrun")


def test_multi_node_sbatch_one_torchrun_per_node(fake, recipe):
    env, log = fake
    job = dict(SLURM_JOB_ID="300", SLURM_JOB_NODELIST="n1,n2", SLURM_NNODES="2", SLURM_CPUS_ON_NODE="32",
               SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO), RLMT_SRUN_ARGS="--container-image=img --container-mounts=/a:/a")
    proc = run(["bash", SLURM_DIR / "multi_node.sbatch", recipe, "run.seed=7"], {**env, **job})
    assert proc.returncode == 0, proc.stderr
    (srun,) = records(log, "srun")
    assert srun["opts"]["nodes"] == "2" and srun["opts"]["ntasks-per-node"] == "1"
    assert srun["opts"]["cpus-per-task"] == "32" and srun["opts"]["kill-on-bad-exit"] == "1"
    assert srun["opts"]["container-image"] == "img" and srun["opts"]["container-mounts"] == "/a:/a"
    parsed = sorted((torchrun_args(r) for r in records(log, "torchrun")), key=lambda a: a.node_rank)
    assert [(a.nnodes, a.node_rank, a.master_addr, a.master_port) for a in parsed] == [("2", 0, "n1", 20300),
                                                                                      ("2", 1, "n1", 20300)]
    assert all(a.training_script_args == [str(recipe), "run.seed=7"] for a in parsed)


# -------------------------------------------------------------------------------- disaggregated


def test_disaggregated_waits_for_health_then_trains_on_the_other_nodes(fake, recipe):
    env, log = fake
    port = free_port()
    job = dict(SLURM_JOB_ID="500", SLURM_JOB_NODELIST="localhost,t1,t2", SLURM_NNODES="3", SLURM_GPUS_ON_NODE="4",
               SLURM_SUBMIT_DIR=str(REPO), SGLANG_MODEL="/models/policy", SGLANG_PORT=str(port),
               RLMT_HEALTH_POLL_S="0.2", FAKE_SGLANG="serve")
    proc = run(["bash", SLURM_DIR / "disaggregated.sbatch", recipe, "run.total_steps=3"], {**env, **job})
    assert proc.returncode == 0, proc.stderr
    (server,) = records(log, "sglang")
    argv = server["argv"]
    flag = {k: argv[argv.index(k) + 1] for k in ("--model-path", "--tp", "--nnodes", "--node-rank", "--port", "--dist-init-addr")}
    assert flag == {"--model-path": "/models/policy", "--tp": "4", "--nnodes": "1", "--node-rank": "0",
                    "--port": str(port), "--dist-init-addr": "localhost:20500"}
    assert (log / f"term-sglang-{server['pid']}").exists()  # stopped once the trainer finished
    assert server["env"]["HF_HOME"] == env["RLMT_CACHE_ROOT"] + "/huggingface"  # env.sh sourced in the step
    trainers = sorted((torchrun_args(r) for r in records(log, "torchrun")), key=lambda a: a.node_rank)
    assert [(a.nnodes, a.node_rank, a.master_addr) for a in trainers] == [("2", 0, "t1"), ("2", 1, "t1")]
    assert trainers[0].training_script_args == [
        str(recipe), "run.total_steps=3", "rollout.engine=sglang", "rollout.placement=disaggregated",
        f"rollout.sglang_url=http://localhost:{port}", "rollout.engine_tp_size=4"]


@pytest.mark.parametrize("mode, message", [("hang", "did not answer 200 within 2s"),
                                           ("exit:1", "server process exited before")])
def test_disaggregated_unhealthy_server_stops_before_training(fake, recipe, mode, message):
    env, log = fake
    job = dict(SLURM_JOB_ID="501", SLURM_JOB_NODELIST="localhost,t1", SLURM_NNODES="2", GPUS_PER_NODE="2",
               SLURM_SUBMIT_DIR=str(REPO), SGLANG_MODEL="/m", SGLANG_PORT=str(free_port()),
               SGLANG_HEALTH_TIMEOUT_S="2", RLMT_HEALTH_POLL_S="0.2", FAKE_SGLANG=mode)
    proc = run(["bash", SLURM_DIR / "disaggregated.sbatch", recipe], {**env, **job})
    assert proc.returncode == 2 and message in proc.stderr and "not healthy" in proc.stderr, proc.stderr
    assert not records(log, "torchrun")


def test_disaggregated_needs_a_trainer_node(fake, recipe):
    env, log = fake
    job = dict(SLURM_JOB_ID="502", SLURM_JOB_NODELIST="only", SLURM_SUBMIT_DIR=str(REPO), SGLANG_MODEL="/m",
               GPUS_PER_NODE="8")
    proc = run(["bash", SLURM_DIR / "disaggregated.sbatch", recipe], {**env, **job})
    assert proc.returncode == 2 and "leaves none for the trainer" in proc.stderr
    assert not records(log, "sglang")


def test_single_node_with_colocated_sglang(fake, recipe):
    env, log = fake
    port = free_port()
    job = dict(SLURM_JOB_ID="600", SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO), SGLANG_MODEL="/models/p",
               SGLANG_PORT=str(port), RLMT_HEALTH_POLL_S="0.2", FAKE_SGLANG="serve")
    proc = run(["bash", SLURM_DIR / "single_node.sbatch", recipe], {**env, **job})
    assert proc.returncode == 0, proc.stderr
    (server,) = records(log, "sglang")
    argv = server["argv"]
    assert argv[argv.index("--tp") + 1] == "2" and argv[argv.index("--mem-fraction-static") + 1] == "0.5"
    assert "--enable-memory-saver" in argv and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--base-gpu-id") + 1] == "0"
    assert (log / f"term-sglang-{server['pid']}").exists()
    (trainer,) = (torchrun_args(r) for r in records(log, "torchrun"))
    assert trainer.nproc_per_node == "2" and trainer.training_script_args == [
        str(recipe), "rollout.engine=sglang", "rollout.placement=colocated", "rollout.engines=1",
        f"rollout.sglang_url=[http://127.0.0.1:{port}]", "rollout.engine_tp_size=2"]


def test_single_node_with_several_colocated_sglang_servers(fake, recipe):
    # 4 GPUs at SGLANG_TP=2: two servers, each an engine (server k on GPUs 2k, 2k+1, port + k), all
    # stopped once the trainer finished
    env, log = fake
    port = free_ports(2)
    job = dict(SLURM_JOB_ID="601", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=str(REPO), SGLANG_MODEL="/models/p",
               SGLANG_TP="2", SGLANG_PORT=str(port), RLMT_HEALTH_POLL_S="0.2", FAKE_SGLANG="serve")
    proc = run(["bash", SLURM_DIR / "single_node.sbatch", recipe], {**env, **job})
    assert proc.returncode == 0, proc.stderr
    servers = sorted(records(log, "sglang"), key=lambda r: int(r["argv"][r["argv"].index("--base-gpu-id") + 1]))
    assert [(r["argv"][r["argv"].index("--base-gpu-id") + 1], r["argv"][r["argv"].index("--port") + 1],
             r["argv"][r["argv"].index("--tp") + 1]) for r in servers] == [("0", str(port), "2"), ("2", str(port + 1), "2")]
    assert all((log / f"term-sglang-{r['pid']}").exists() for r in servers)
    (trainer,) = (torchrun_args(r) for r in records(log, "torchrun"))
    assert trainer.nproc_per_node == "4" and trainer.training_script_args == [
        str(recipe), "rollout.engine=sglang", "rollout.placement=colocated", "rollout.engines=2",
        f"rollout.sglang_url=[http://127.0.0.1:{port},http://127.0.0.1:{port + 1}]", "rollout.engine_tp_size=2"]
    # a TP that does not divide the node's GPUs is refused before anything starts
    bad = run(["bash", SLURM_DIR / "single_node.sbatch", recipe], {**env, **job, "SLURM_JOB_ID": "602", "SGLANG_TP": "3"})
    assert bad.returncode != 0 and "SGLANG_TP=3 does not divide the node's 4 GPUs" in bad.stderr


