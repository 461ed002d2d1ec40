"""rlmt-train (under torchrun or as one process) with faults injected from the environment.

The hf engine that ``rollout.engine_process: subprocess`` starts is ``faulty_engines.
FaultyHFEngine`` (faults chosen by RLMT_FAULT, see there). RLMT_FAULT_TRAIN=pause@S makes rank 0
write <RLMT_FAULT_DIR>/training_S when step S's policy update starts and wait there until the
test has signalled the job (it writes <RLMT_FAULT_DIR>/signalled, or 300 s pass).
Everything else is the real loop; exit status and files are what a user would see.
"""

import os
import sys
import time
from pathlib import Path

from rlmt_megatron.cli.train import cli
from rlmt_megatron.rollout import factory
from rlmt_megatron.trainer import updates

factory.HF_ENGINE = "faulty_engines.FaultyHFEngine"  # importable in the engine process: sys.path travels with spawn


def _pause_training(at_step: int, folder: Path) -> None:
    real = updates.UPDATES["grpo"]
    calls = []

    def update(*args, **kwargs):  # every update's signature, passed through
        calls.append(1)
        if len(calls) == at_step and os.environ.get("RANK", "0") == "0":
            (folder / f"training_{at_step}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not (folder / "signalled").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return real(*args, **kwargs)

    updates.UPDATES["grpo"] = update


if __name__ == "__main__":
    kind, _, at = os.environ.get("RLMT_FAULT_TRAIN", "").partition("@")
    if kind == "pause":
        _pause_training(int(at), Path(os.environ["RLMT_FAULT_DIR"]))
    sys.argv[0] = "rlmt-train"
    cli()
