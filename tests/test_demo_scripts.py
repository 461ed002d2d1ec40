"""tools/run_demo.sh and tools/run_parity_demo.sh: their torchrun launcher, run twice at once.

Each script launches its two-process jobs through one shell function, ``run2``. The test takes
that function's definition out of the script, runs it in bash for two jobs at the same time,
and each job waits until the other has formed its own two-rank world: with a port written into
the launcher, the second job cannot bind it (EADDRINUSE) and the test fails.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

WORKER = r'''
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert dist.get_world_size() == 2 and t.item() == 2.0, (dist.get_world_size(), t.item())
here, me = Path(sys.argv[1]), sys.argv[2]
if dist.get_rank() == 0:
    (here / f"up-{me}").write_text(os.environ["MASTER_PORT"])
deadline = time.time() + 120
while len(list(here.glob("up-*"))) < 2:  # both jobs alive at once, or this one gives up
    assert time.time() < deadline, "the other job never formed its world"
    time.sleep(0.2)
dist.barrier()
dist.destroy_process_group()
'''


def launcher(script: Path) -> str:
    """The ``run2() { ... }`` line: the script's only torchrun invocation."""
    text = script.read_text()
    assert text.count("torch.distributed.run") == 1, f"{script.name}: every torchrun launch goes through run2"
    (line,) = [ln for ln in text.splitlines() if re.match(r"run2\(\) \{.*\}$", ln)]
    return line


@pytest.mark.parametrize("script", ["run_demo.sh", "run_parity_demo.sh"])
def test_two_launches_at_once_each_get_their_own_port(script, tmp_path):
    definition = launcher(REPO / "tools" / script)
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    jobs = [subprocess.Popen(["bash", "-c", f'set -euo pipefail; {definition}\nrun2 "$@"', "launch",
                              str(tmp_path / "worker.py"), str(tmp_path), name],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
            for name in ("a", "b")]
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-4000:]
    ports = {(tmp_path / f"up-{name}").read_text() for name in ("a", "b")}
    assert len(ports) == 2  # two rendezvous, on two ports


def _demo_folder_step(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLMT_DEMO_FOLDER_ONLY": "1"}
    return subprocess.run(["bash", str(REPO / "tools" / "run_demo.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=60)


def test_run_demo_refuses_a_folder_it_did_not_make_and_clears_only_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = _demo_folder_step(foreign)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {foreign} exists and is not an empty folder made by tools/run_demo.sh "
                                   f"(no {foreign}/.rlmt_demo): give another folder, or empty or remove it yourself")
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # a new folder (or an empty one) is made and marked; a second run clears it
    demo = tmp_path / "demo"
    assert _demo_folder_step(demo).returncode == 0
    assert (demo / ".rlmt_demo").is_file()
    (demo / "grpo").mkdir()
    proc = _demo_folder_step(demo)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in demo.iterdir()) == [".rlmt_demo"]
