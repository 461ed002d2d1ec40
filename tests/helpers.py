"""Test helpers: start real multi-process jobs with torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, target: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run`` with ``nproc`` local processes.

    ``target`` is either ``['-m', 'module', args...]`` or ``['script.py', args...]``.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_cli(module: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a CLI module as a plain single process (world of one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def run_worker_once(cache: dict, worker: str, runs: dict, name: str, model_dir: Path, tmp_path_factory):
    """Run ``tests/workers/<worker>`` for ``runs[name] = (nproc, extra args)`` once per session;
    the worker saves a torch file whose contents are returned (and cached)."""
    import torch

    if name not in cache:
        nproc, extra = runs[name]
        out = tmp_path_factory.mktemp(worker.split(".")[0]) / f"{name}.pt"
        torchrun(nproc, [f"tests/workers/{worker}", "--model", str(model_dir), "--out", str(out), *extra])
        cache[name] = torch.load(out)
    return cache[name]


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys (float64)."""
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
