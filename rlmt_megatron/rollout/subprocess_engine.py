"""Any in-process engine, run in a child process behind a pipe, with every wait bounded.

The trainer's process may already be part of a torch.distributed world (torchrun), which an
engine such as vLLM must not join; and an engine that crashes or hangs must not take the trainer
with it. ``SubprocessEngine`` starts the engine in a fresh (spawned) process without the
launcher's rendezvous variables, forwards the RolloutEngine calls over a pipe, and turns a dead
or silent child into an ``EngineError`` that names the engine and what it was doing, after at
most ``timeout_s`` seconds. Weight buckets travel pickled through the pipe: right for CPU tests
and small models; GPU deployments use the CUDA IPC or NCCL transports instead.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import time
import traceback
from typing import Any, Iterable, Optional, Sequence

from rlmt_megatron.rollout.engine import Bucket, EngineError, RolloutEngine
from rlmt_megatron.rollout.types import Generation, SamplingParams

# Variables torchrun/SLURM set for the trainer; an engine process must start its own world.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def _serve(conn, engine_path: str, kwargs: dict, env: dict[str, str]) -> None:
    for var in _LAUNCHER_VARS:
        os.environ.pop(var, None)
    os.environ.update(env)
    try:
        module, cls = engine_path.rsplit(".", 1)
        engine = getattr(importlib.import_module(module), cls)(**kwargs)
        conn.send(("ok", engine.name))
    except BaseException as e:  # report, then exit: the parent raises EngineError
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        return
    while True:
        method, args = conn.recv()
        try:
            if method == "close":
                engine.close()
                conn.send(("ok", None))
                return
            conn.send(("ok", getattr(engine, method)(*args)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))


class SubprocessEngine(RolloutEngine):
    """``SubprocessEngine("rlmt_megatron.rollout.vllm_engine.VLLMEngine", {"model_dir": d})``."""

    def __init__(self, engine_path: str, kwargs: dict[str, Any], timeout_s: float = 600.0,
                 startup_timeout_s: float = 900.0, env: Optional[dict[str, str]] = None):
        """``env``: variables set in the engine's process before the engine is imported (its GPU)."""
        self.name = engine_path.rsplit(".", 1)[1]
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, engine_path, kwargs, dict(env or {})), daemon=True, name=f"engine-{self.name}")
        self._proc.start()
        child.close()
        self.name = self._wait("starting", startup_timeout_s)
        self.weight_version = 0

    def _wait(self, doing: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ready = self._conn.poll(min(0.5, max(0.0, deadline - time.monotonic())))
                reply = self._conn.recv() if ready else None
            except (EOFError, OSError):
                # the child closed its end or the connection was reset (a signal killed it
                # mid-reply): either way it is exiting or gone
                self._proc.join(5)
                raise EngineError(
                    f"{self.name} engine process died (exit code {self._proc.exitcode}) while {doing}"
                ) from None
            if ready:
                status, value = reply
                if status == "ok":
                    return value
                if status == "error":
                    raise EngineError(f"{self.name} engine failed while {doing}: {value}")
            if not self._proc.is_alive() and not self._has_reply():  # dead, and no last reply left
                raise EngineError(f"{self.name} engine process died (exit code {self._proc.exitcode}) while {doing}")
            if time.monotonic() >= deadline:
                self._proc.kill()
                self._proc.join(5)
                raise EngineError(f"{self.name} engine did not answer within {timeout_s:.0f} s while {doing}; "
                                  "its process was killed")

    def _has_reply(self) -> bool:
        try:
            return self._conn.poll(0)
        except (EOFError, OSError):  # nothing more can come from a closed or reset pipe
            return False

    def _call(self, method: str, doing: str, *args) -> Any:
        if not self._proc.is_alive():
            raise EngineError(f"{self.name} engine process is not running (exit code {self._proc.exitcode}); "
                              f"cannot start {doing}")
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, OSError):
            raise EngineError(f"{self.name} engine process died (exit code {self._proc.exitcode}) while {doing}") from None
        return self._wait(doing, self.timeout_s)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[list[Generation]]:
        return self._call("generate", "generating", [list(p) for p in prompts], params,
                          None if seeds is None else list(seeds))

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        self._call("update_weights", f"syncing weights v{version}", list(buckets), version)
        self.weight_version = version

    def checksum(self) -> str | None:
        return self._call("checksum", "computing a checksum")

    def health(self) -> bool:
        return self._proc.is_alive()

    def sleep(self) -> None:
        self._call("sleep", "releasing memory")

    def wake(self) -> None:
        self._call("wake", "resuming memory")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close", "closing")
            except EngineError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
