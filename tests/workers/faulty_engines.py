"""The hf (and vLLM) rollout engines with faults injected, run in their engine processes.

RLMT_FAULT (read in the engine's own process, which inherits the environment) picks the faults,
comma-separated; RLMT_FAULT_DIR holds the marker files the faults and the test use to meet:

  die@V        the first generate at weight version V SIGKILLs its own process (once per run
               folder: marker died.pid)
  hang@V       every generate at weight version >= V sleeps instead of answering (hang_<pid>.pid)
  pause@V      the first generate at weight version V writes paused_V.pid and waits (at most
               300 s) for the test to signal or kill the job
  pausesync@V  the weight update to version V applies its first bucket, writes syncing_V.pid and
               waits (at most 300 s): the sync is under way, the engine's version not yet V
"""

import os
import signal
import time
from pathlib import Path

from rlmt_megatron.rollout.hf_engine import HFEngine
from rlmt_megatron.rollout.vllm_engine import VLLMEngine


def _once(marker: Path) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _faults() -> dict[str, int]:
    out = {}
    for item in filter(None, os.environ.get("RLMT_FAULT", "").split(",")):
        kind, _, at = item.partition("@")
        out[kind] = int(at)
    return out


def _folder() -> Path:
    return Path(os.environ.get("RLMT_FAULT_DIR", "."))


class FaultyHFEngine(HFEngine):
    def generate(self, prompts, params, seeds=None):
        faults, folder = _faults(), _folder()
        if faults.get("die") == self.weight_version and _once(folder / "died.pid"):
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in faults and self.weight_version >= faults["hang"]:
            (folder / f"hang_{os.getpid()}.pid").write_text(str(os.getpid()))
            time.sleep(600)
        if faults.get("pause") == self.weight_version and _once(folder / f"paused_{self.weight_version}.pid"):
            time.sleep(300)
        return super().generate(prompts, params, seeds)

    def update_weights(self, buckets, version):
        if _faults().get("pausesync") == version:
            buckets = _pause_after_first(buckets, _folder() / f"syncing_{version}.pid")
        return super().update_weights(buckets, version)


def _pause_after_first(buckets, marker: Path):
    # resumed when the engine asks for the next bucket, i.e. once the first one is applied
    for i, bucket in enumerate(buckets):
        yield bucket
        if i == 0 and _once(marker):
            time.sleep(300)


class FaultyVLLMEngine(VLLMEngine):
    """vLLM with ``die@V`` only: the first generate at weight version V SIGKILLs its process."""

    def generate(self, prompts, params, seeds=None):
        if _faults().get("die") == self.weight_version and _once(_folder() / "died.pid"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate(prompts, params, seeds)
