"""The hf rollout engine with one fault injected, run by rlmt-train in its engine process.

RLMT_FAULT (read in the engine's own process, which inherits the environment) picks the fault,
RLMT_FAULT_DIR holds the marker files the fault and the test use to meet:

  die@V    the first generate at weight version V SIGKILLs its own process (once per run)
  hang@V   every generate at weight version >= V sleeps instead of answering
  pause@V  the first generate at weight version V writes paused.pid and waits (at most 300 s) for
           the test to signal the job
"""

import os
import signal
import time
from pathlib import Path

from rlmt_megatron.rollout.hf_engine import HFEngine


def _once(marker: Path) -> bool:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


class FaultyHFEngine(HFEngine):
    def generate(self, prompts, params):
        kind, _, at = os.environ.get("RLMT_FAULT", "").partition("@")
        folder = Path(os.environ.get("RLMT_FAULT_DIR", "."))
        version = int(at) if at else -1
        if kind == "die" and self.weight_version == version and _once(folder / "died.pid"):
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang" and self.weight_version >= version:
            (folder / f"hang_{os.getpid()}.pid").write_text(str(os.getpid()))
            time.sleep(600)
        if kind == "pause" and self.weight_version == version and _once(folder / "paused.pid"):
            time.sleep(300)
        return super().generate(prompts, params)
