"""Test helpers: start real multi-process jobs with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlmt_megatron.distributed.collectives import free_port  # noqa: F401 (tests import it from here)

REPO = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> int:
    """A free port p with p + 1 .. p + count - 1 free too (servers or groups at consecutive ports)."""
    import contextlib
    import socket

    for _ in range(50):
        port = free_port()
        try:
            with contextlib.ExitStack() as held:
                for k in range(1, count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port + k))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {count} consecutive free ports")


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


PROMPTS = REPO / "examples" / "data" / "synthetic_prompts.jsonl"


def write_train_config(path: Path, tiny: Path, out: Path, **sections) -> Path:
    """A tiny rlmt-train config (2 GRPO steps, 2 prompts x 3 samples of 8 tokens, checksummed
    syncs, W&B off) with ``sections`` merged in section by section; written to ``path``."""
    import yaml

    cfg = {
        "run": {"out_dir": str(out), "total_steps": 2, "save_every": 0, "seed": 3, "deterministic": True},
        "models": {"policy": str(tiny / "llama-policy"), "reward": str(tiny / "llama-rm")},
        "data": {"prompts": [str(PROMPTS)], "max_prompt_tokens": 48, "prompts_per_step": 2},
        "rollout": {"samples_per_prompt": 3, "max_new_tokens": 8, "temperature": 1.0},
        "algorithm": {"kl_coef": 0.01, "entropy_coef": 0.001},
        "optim": {"lr": 1e-3},
        "batching": {"train_tokens_per_microbatch": 512, "logprob_tokens_per_microbatch": 512},
        "weight_sync": {"checksum": True},
        "monitoring": {"wandb": {"mode": "disabled"}},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(out: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    """The rows of ``out/metrics.jsonl``, without the keys starting with any of ``drop``."""
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]

