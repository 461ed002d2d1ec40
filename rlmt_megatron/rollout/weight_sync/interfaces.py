"""One small interface for moving weights into engines; each transport is one class.

A transport takes the trainer-side bucket iterator (already delivered to the rank that talks to
the engine) and a weight version. Which transport is used follows the topology: the embedded
engine in the trainer's process takes buckets in-process; CUDA IPC (colocated SGLang), NCCL
broadcast (disaggregated servers) and disk are further implementations of the same interface.
"""

from __future__ import annotations

import abc
from typing import Iterable

from rlmt_megatron.rollout.engine import Bucket, RolloutEngine


class WeightTransport(abc.ABC):
    @abc.abstractmethod
    def push(self, buckets: Iterable[Bucket], version: int) -> None:
        """Deliver a complete set of weights as ``version``."""

    def close(self) -> None:
        """Release what the transport holds (process groups, files); no-op by default."""


class InProcessTransport(WeightTransport):
    """The engine lives in this process: hand it the buckets directly (no copies)."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine

    def push(self, buckets: Iterable[Bucket], version: int) -> None:
        self.engine.update_weights(buckets, version)
