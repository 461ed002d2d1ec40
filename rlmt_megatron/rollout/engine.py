"""The interface every rollout engine implements (embedded HF, vLLM, SGLang).

Weights arrive as an iterator of buckets of HF-named tensors (``checkpoint/hf_export.py`` exports them, ``rollout/weight_sync/pipeline.py`` delivers them), with
the trainer's weight version; every generation records the version it was sampled under.
"""

from __future__ import annotations

import abc
from typing import Iterable, Optional, Sequence

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.types import Generation, SamplingParams


class EngineError(RLMTError, RuntimeError):
    """A rollout engine failed; the message names the engine and what it was doing."""


def failure_text(error: BaseException) -> str:
    """How one engine's failure reads in a fleet's report: an ``EngineError``'s own message (it
    names the engine and what it was doing), anything else with its type."""
    return str(error) if isinstance(error, EngineError) else f"{type(error).__name__}: {error}"


class RolloutEngine(abc.ABC):
    name: str = "engine"
    weight_version: int = -1

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> list[list[Generation]]:
        """For each prompt (token ids), ``params.n`` generations. ``seeds``: one sampler seed per
        prompt (``rollout/fleet.request_seeds``), so that prompts do not share random numbers and a
        prompt's samples do not depend on the call it was served in; None: ``params.seed``."""

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Replace all weights with the HF-named tensors in ``buckets`` (a complete set)."""

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (colocated engines); no-op by default."""

    def wake(self) -> None:
        """Take the memory back before the next rollout; no-op by default."""

    def health(self) -> bool:
        return True

    def close(self) -> None:
        """Release everything; the engine is unusable afterwards."""
