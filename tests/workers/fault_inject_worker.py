"""rlmt-train (under torchrun or as one process) with faults injected from the environment.

The hf engine that ``rollout.engine_process: subprocess`` starts is ``faulty_engines.
FaultyHFEngine`` (faults chosen by RLMT_FAULT, see there). On rank 0:

* RLMT_FAULT_TRAIN=pause@N: the N-th policy update of this process writes
  <RLMT_FAULT_DIR>/training_N and waits there until the test has signalled the job (it writes
  <RLMT_FAULT_DIR>/signalled) or killed it, or 300 s pass;
* RLMT_FAULT_CKPT=pause@S: the checkpoint of step S, once its model weights are written (the
  optimizer state and the COMPLETE marker not yet), writes <RLMT_FAULT_DIR>/checkpoint_S and
  waits up to 300 s for the test to kill the job.

Everything else is the real loop; exit status and files are what a user would see.
"""

import os
import sys
import time
from pathlib import Path

from rlmt_megatron.checkpoint import dist_ckpt
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


def _pause_checkpoint(at_step: int, folder: Path) -> None:
    real = dist_ckpt.save_model_checkpoint  # train_state looks it up at each save

    def save(built, path, *args, **kwargs):
        result = real(built, path, *args, **kwargs)
        if f"step_{at_step:08d}.tmp" in str(path) and os.environ.get("RANK", "0") == "0":
            (folder / f"checkpoint_{at_step}").write_text(str(os.getpid()))
            time.sleep(300)
        return result

    dist_ckpt.save_model_checkpoint = save


if __name__ == "__main__":
    for variable, inject in (("RLMT_FAULT_TRAIN", _pause_training), ("RLMT_FAULT_CKPT", _pause_checkpoint)):
        kind, _, at = os.environ.get(variable, "").partition("@")
        if kind == "pause":
            inject(int(at), Path(os.environ["RLMT_FAULT_DIR"]))
    sys.argv[0] = "rlmt-train"
    cli()
