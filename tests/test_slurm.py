"""The SLURM scripts on a real SLURM: a one-node cluster started on this machine.

When ``sbatch`` is missing, Debian's ``slurm-wlm`` and ``munge`` are installed with apt-get (as
root only; the test is skipped, saying why, where that cannot be done). ``munged`` (as the munge
user, with its own key and socket), ``slurmctld`` and ``slurmd`` (as root) are started from a
minimal ``slurm.conf`` in a temporary directory, on free ports, and stopped at the end whatever
happens. Then, with the tiny models and the 2-step CPU GRPO recipe (embedded HF engine, W&B off):

- ``launch/slurm/sweep.sbatch`` runs a 2-task array, one grid line each;
- ``launch/slurm/single_node.sbatch`` runs ``examples/demo/slurm_tiny.yaml`` for 8 steps; sent SIGTERM the way ``--signal=B:TERM@120`` does checkpoints, is requeued by the script,
  and its second start resumes and finishes (SLURM's restart count and every step's metrics line
  are checked);
- ``launch/slurm/multi_node.sbatch`` under real ``srun`` (one node: a fake interpreter records what
  torchrun would be given).

Every job's final state and exit code come from ``scontrol show job``; every run's
``metrics.jsonl`` must hold steps 1 and 2, and its resolved ``config.yaml`` the overrides of its grid
line, directory and W&B name/group. The jobs run the suite's own interpreter (``RLMT_PYTHON`` =
``sys.executable``). Run alone with ``pytest -m slurm tests/test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, free_port

pytestmark = pytest.mark.slurm

TINY_RECIPE = REPO / "examples" / "demo" / "slurm_tiny.yaml"
SLURM_DIR = REPO / "launch" / "slurm"
DAEMONS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")
JOB_TIMEOUT_S = 900


def _missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get when absent; skip (saying why) when that is impossible."""
    if not _missing():
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM is not installed ({', '.join(_missing())} missing) and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install Debian's slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or _missing():
        pytest.skip(f"could not install slurm-wlm and munge with apt-get (exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    print(f"installed slurm-wlm and munge in {time.monotonic() - t0:.0f} s", file=sys.stderr)


class LocalSlurm:
    """munged + slurmctld + slurmd for this machine only, everything under one temp dir."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.munge_dir = root / "munge"
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"

    # ---------------------------------------------------------------------------------- start
    def start(self) -> None:
        self._start_munged()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.stdout", "w")
            # -D: foreground, so the process is ours to stop; -c (slurmctld): no saved state.
            args = [_which(daemon), "-D", "-f", str(self.conf)] + (["-c", "-i"] if daemon == "slurmctld" else [])
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env))
            if daemon == "slurmctld":
                self._wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, 60, "slurmctld to answer")
        self._wait(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle", 60,
                   "the node to be idle")

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        d = self.munge_dir
        d.mkdir()
        d.chmod(0o755)  # munged refuses a socket directory that others cannot search
        os.chown(d, munge.pw_uid, munge.pw_gid)
        key = d / "munge.key"
        made = subprocess.run(["runuser", "-u", "munge", "--", _which("mungekey"), "-c", "-k", str(key)],
                              capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, f"mungekey failed: {made.stderr}"
        self.socket = d / "munge.sock"
        self.munge_pidfile = d / "munged.pid"
        args = ["runuser", "-u", "munge", "--", _which("munged"), "--foreground", f"--key-file={key}",
                f"--socket={self.socket}", f"--pid-file={self.munge_pidfile}", f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}"]
        munged = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.root / "munged.stderr", "w"))
        self.procs.append(munged)
        self._wait(lambda: self.socket.exists() or munged.poll() is not None, 30, "munged's socket")
        assert munged.poll() is None, f"munged exited: {(self.root / 'munged.stderr').read_text()}"

    def _write_conf(self) -> None:
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        s = self.root
        for sub in ("state", "spool"):
            (s / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=rlmt{os.getpid()}
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/slurmctld.log
SlurmdLogFile={s}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SchedulerParameters=sched_interval=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=rlmt Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    # ---------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        self.run(["scancel", "--full", "--user=root"], check=False)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged (through runuser)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        try:  # munged itself, if runuser did not pass the signal on (checked to be munged, not a reused pid)
            pid = int(self.munge_pidfile.read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == "munged":
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, AttributeError):
            pass

    # ---------------------------------------------------------------------------------- use
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, args: list[str], env: dict) -> str:
        return self.run(["sbatch", "--parsable", *map(str, args)], env=env).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """``scontrol show job -o`` as dicts (one per array task)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait_done(self, job_ids: list[str], timeout: float) -> dict[str, list[dict]]:
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        end = time.monotonic() + timeout
        while True:
            jobs = {j: self.jobs(j) for j in job_ids}
            if all(t["JobState"] in final for tasks in jobs.values() for t in tasks):
                return jobs
            if time.monotonic() > end:
                raise AssertionError(f"jobs not finished after {timeout:.0f} s: "
                                     f"{ {j: [t['JobState'] for t in ts] for j, ts in jobs.items()} }\n{self.logs()}")
            time.sleep(2)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.stderr"):
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm():
    ensure_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("a local slurmd/slurmctld with SlurmUser=root needs root")
    # A short path: munged's socket path must fit in a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="rlmt-slurm-", dir="/tmp"))
    root.chmod(0o755)  # munged (munge user) must reach its directory inside
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def job_env(work: Path, **extra) -> dict:
    """What a submitter exports: the suite's interpreter and checkout, offline caches in ``work``."""
    return {"RLMT_PYTHON": sys.executable, "RLMT_REPO": str(REPO), "PYTHONPATH": str(REPO),
            "RLMT_CACHE_ROOT": str(work / "cache"), "RLMT_LOCAL_CACHE": str(work / "local"),
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_array_sweep(slurm, tiny_models, tmp_path):
    # The shipped tiny recipe (2 GRPO steps, HF engine, W&B off), pointed at the fixture's models.
    models = [f"models.policy={tiny_models / 'llama-policy'}", f"models.reward={tiny_models / 'llama-rm'}"]
    grid = tmp_path / "grid.txt"
    grid.write_text("# two runs of the tiny recipe: a named line and an unnamed one\nhi-lr: optim.lr=2e-3\nrun.seed=5\n")
    env = job_env(tmp_path, RLMT_SWEEP_DIR=str(tmp_path / "sweep"), RLMT_SWEEP_GROUP="tiny-sweep")
    common = ["--cpus-per-task=1", f"--chdir={REPO}"]
    # (single_node.sbatch alone is the preemption test's job below)
    sweep = slurm.sbatch([*common, "--job-name=rlmt-sweep", "--array=0-1", f"--output={tmp_path}/sweep-%A_%a.out",
                          SLURM_DIR / "sweep.sbatch", TINY_RECIPE, grid, *models], env)
    jobs = slurm.wait_done([sweep], JOB_TIMEOUT_S)

    def job_output():
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.out")))

    assert sorted(t["ArrayTaskId"] for t in jobs[sweep]) == ["0", "1"]
    for t in jobs[sweep]:
        assert (t["JobState"], t["ExitCode"]) == ("COMPLETED", "0:0"), job_output()

    # Each task ran its own grid line in its own directory, named in W&B after the line.
    expected = {"hi-lr": ("optim", "lr", 2e-3), "task001": ("run", "seed", 5)}
    for name, (section, key, value) in expected.items():
        out = tmp_path / "sweep" / name
        assert steps(out) == [1, 2], job_output()
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert cfg[section][key] == value
        assert cfg["run"]["out_dir"] == str(out) and cfg["models"]["policy"] == str(tiny_models / "llama-policy")
        assert (cfg["monitoring"]["wandb"]["name"], cfg["monitoring"]["wandb"]["group"]) == (name, "tiny-sweep")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == sorted(expected)


def test_sigterm_checkpoints_requeues_and_resumes(slurm, tiny_models, tmp_path):
    # The whole preemption contract on real SLURM with the real trainer: SIGTERM to the batch shell
    # (what --signal=B:TERM@120 sends) → forwarded through torchrun → the trainer checkpoints and
    # writes exit_status.json "stopped" → the script requeues → SLURM starts the job again →
    # resume=auto continues → the run finishes with every step exactly once.
    out = tmp_path / "run"
    overrides = [f"models.policy={tiny_models / 'llama-policy'}", f"models.reward={tiny_models / 'llama-rm'}",
                 f"run.out_dir={out}", "run.total_steps=8", "run.save_every=1"]
    job = slurm.sbatch(["--cpus-per-task=1", f"--chdir={REPO}", "--job-name=rlmt-requeue", f"--output={tmp_path}/rq-%j.out",
                        SLURM_DIR / "single_node.sbatch", TINY_RECIPE, *overrides], job_env(tmp_path))
    metrics = out / "metrics.jsonl"

    def output(tail: int | None = 6000) -> str:
        text = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("rq-*.out"))
        return text[-tail:] if tail else text

    LocalSlurm._wait(lambda: metrics.exists() and metrics.read_text().strip() != "", 300, "the first step")
    slurm.run(["scancel", "--batch", "--signal=TERM", job])
    end = time.monotonic() + JOB_TIMEOUT_S
    while True:
        (info,) = slurm.jobs(job)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") and int(info["Restarts"]) >= 1:
            break
        assert time.monotonic() < end, f"job {job} still {info['JobState']}, restarts {info['Restarts']}\n{output()}"
        time.sleep(2)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), output()
    log = output(tail=None)
    assert re.search(r"requeueing job \d+ \(restart 1 .*status stopped, requeue true", log), output()
    assert steps(out) == list(range(1, 9)), output()  # resumed where it stopped: no step lost or repeated
    assert json.loads((out / "exit_status.json").read_text())["status"] == "finished"


FAKE_RECORDER = """\
#!{real}
# Stands in for the interpreter: records the torchrun command and the step's SLURM variables.
import json, os, sys
if sys.argv[1:3] != ["-m", "torch.distributed.run"]:
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
keys = ("SLURM_STEP_ID", "SLURM_STEP_NUM_NODES", "SLURM_NODEID", "SLURM_PROCID", "SLURM_CPUS_ON_NODE", "OMP_NUM_THREADS")
with open({log!r}, "w") as f:
    json.dump({{"argv": sys.argv[3:], "env": {{k: os.environ.get(k) for k in keys}}}}, f)
"""


def test_multi_node_script_under_real_srun(slurm, tmp_path):
    # One node is all this machine has: the point is that real srun accepts the step's options and
    # that torchrun.sh reads a real step's variables (a one-node step: --standalone).
    from torch.distributed.run import get_args_parser

    record = tmp_path / "torchrun.json"
    fake = tmp_path / "python"
    fake.write_text(FAKE_RECORDER.format(real=sys.executable, log=str(record)))
    fake.chmod(0o755)
    job = slurm.sbatch([f"--chdir={REPO}", "--nodes=1", "--job-name=rlmt-multi", f"--output={tmp_path}/mn-%j.out",
                        SLURM_DIR / "multi_node.sbatch", TINY_RECIPE, "run.seed=9"],
                       job_env(tmp_path, RLMT_PYTHON=str(fake), OMP_NUM_THREADS=""))
    (info,) = slurm.wait_done([job], 120)[job]
    out = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("mn-*.out"))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out
    rec = json.loads(record.read_text())
    args = get_args_parser().parse_args(rec["argv"])
    assert args.standalone and args.nproc_per_node == "1" and args.training_script_args == [str(TINY_RECIPE), "run.seed=9"]
    env = rec["env"]
    assert env["SLURM_STEP_ID"] == "0" and env["SLURM_STEP_NUM_NODES"] == "1" and env["SLURM_NODEID"] == "0", env
    # --exclusive gave the job every core, srun handed them to the step, torchrun.sh to the one rank
    assert env["SLURM_CPUS_ON_NODE"] == str(os.cpu_count()) and env["OMP_NUM_THREADS"] == str(os.cpu_count()), env
