"""Pushing the policy's weights to the rollout engine after every update. Collective.

Every trainer rank walks the export (TP gathers, each PP stage's sender streaming to rank 0);
rank 0 hands the bucket stream to the transport chosen for the topology. With
``weight_sync.checksum`` the trainer checksums the stream as it flows and compares it with what
the engine reports holding, so a silent mismatch stops the run.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

from rlmt_megatron.checkpoint.hf_export import Bucket, buckets_at
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.engine import EngineError, RolloutEngine
from rlmt_megatron.rollout.weight_sync.checksum import StreamingChecksum
from rlmt_megatron.rollout.weight_sync.interfaces import WeightTransport
from rlmt_megatron.runner.model_runner import ModelRunner


class PolicySync:
    def __init__(self, engine: Optional[RolloutEngine], transport: Optional[WeightTransport], bucket_bytes: int,
                 check_checksum: bool = False, quantize=None):
        if check_checksum and engine is not None and not hasattr(engine, "checksum"):
            raise RLMTError(f"weight_sync.checksum=true needs an engine that reports what it holds; "
                            f"the {engine.name} engine does not (use it with the hf or vllm engine)")
        self.engine = engine  # None on every rank but 0
        self.transport = transport
        self.bucket_bytes = bucket_bytes
        self.check_checksum = check_checksum
        self.quantize = quantize  # optional bucket-stream wrapper (FP8 rollouts)

    def push(self, policy: ModelRunner, version: int) -> None:
        stream = buckets_at(policy.built, dst=0, bucket_bytes=self.bucket_bytes)
        if self.engine is None:
            for _ in stream:  # take part in the gathers and sends
                pass
            return
        if self.quantize is not None:
            stream = self.quantize(stream)
        checksum = StreamingChecksum() if self.check_checksum else None
        self.transport.push(_tap(stream, checksum), version)
        if checksum is not None:
            held = self.engine.checksum()
            if held != checksum.hexdigest():
                raise EngineError(f"{self.engine.name} engine: after sync v{version} it holds weights with checksum "
                                  f"{held}, the trainer sent {checksum.hexdigest()}")


def _tap(stream: Iterable[Bucket], checksum: Optional[StreamingChecksum]) -> Iterator[Bucket]:
    for bucket in stream:
        if checksum is not None:
            for name, t in bucket:
                checksum.add(name, t)
        yield bucket


def fp8_quantizer(scheme: str, engine_kind: str):
    """A bucket-stream wrapper quantising linear weights to FP8 for FP8 rollouts, or None."""
    from rlmt_megatron.rollout.weight_sync import fp8

    config = fp8.config_for_sync(scheme, engine_kind)
    return None if config is None else fp8.make_quantizer(config)
