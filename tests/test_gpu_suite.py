"""benchmarks/gpu_suite.sh: the runbook for a lent GPU. Here (no GPU) it must refuse cleanly, and
every stage must call an existing benchmark with flags that benchmark's own parser accepts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.sh"


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_refuses_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(SUITE), "train"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr


def _stage_commands() -> dict[str, list[str]]:
    """stage -> the benchmark argv the case statement runs (before "$@")."""
    out = {}
    for line in SUITE.read_text().splitlines():
        m = re.match(r"\s+(\w+)\)\s+\"\$py\" (.*?) \"\$@\"", line)
        if m:
            out[m.group(1)] = m.group(2).replace('"', "").split()
    return out


@pytest.mark.parametrize("stage", ["train", "logprobs", "sync", "grpo", "fp8"])
def test_stage_flags_are_accepted_by_the_benchmark(stage, tmp_path):
    argv = _stage_commands()[stage]
    script = REPO / argv[0]
    assert script.is_file(), argv
    flags = [a for a in argv[1:] if a.startswith("--")]
    usage = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 0, usage.stderr
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", usage.stdout), (stage, flag)


def test_tests_stage_runs_the_gpu_tests():
    assert _stage_commands()["tests"][:3] == ["-m", "pytest", "-q"]
    assert (REPO / "tests" / "gpu").is_dir()
