"""The weight sync, as one pipeline: export stream → optional FP8 → checksum → transport.

    trainer ranks: buckets_at(policy) ──► [fp8.quantize_buckets] ──► [StreamingChecksum tap] ──► transport.push
                    (TP gathers, PP sends)     (weight_sync.fp8)         (weight_sync.checksum)    (select.py's table)

The export stream is collective: every trainer rank walks it (TP all-gathers, each PP stage
streaming to the rank that talks to the engine). So the rank holding the pipeline must read the
stream to its end even when a stage fails part-way (an engine dying mid-sync), or the other ranks
would wait in their gathers forever: :meth:`SyncPipeline.push` drains the rest of the stream
before it re-raises, and ranks without an engine call :func:`drain`.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.engine import EngineError, RolloutEngine
from rlmt_megatron.rollout.weight_sync.checksum import StreamingChecksum
from rlmt_megatron.rollout.weight_sync.interfaces import WeightTransport
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig, make_transport

Quantizer = Callable[[Iterable[Bucket]], Iterator[Bucket]]


def drain(stream: Iterable[Bucket]) -> None:
    """Take part in the export without an engine (every rank but the engine's)."""
    for _ in stream:
        pass


class SyncPipeline:
    """One engine's sync: ``push(stream, version)`` runs the stream through the stages.

    ``verify_with``: after the transport, ask this engine for the checksum of what it holds and
    compare it with the checksum of what was sent (a silent mismatch stops the run).
    """

    def __init__(self, transport: WeightTransport, *, quantize: Optional[Quantizer] = None,
                 verify_with: Optional[RolloutEngine] = None):
        if verify_with is not None and not hasattr(verify_with, "checksum"):
            raise RLMTError(f"weight_sync.checksum=true needs an engine that reports what it holds; "
                            f"the {verify_with.name} engine does not (use it with the hf or vllm engine)")
        self.transport = transport
        self.quantize = quantize
        self.verify_with = verify_with

    def push(self, stream: Iterable[Bucket], version: int) -> None:
        source = iter(stream)
        try:
            staged: Iterator[Bucket] = self.quantize(source) if self.quantize is not None else source
            checksum = StreamingChecksum() if self.verify_with is not None else None
            self.transport.push(_tap(staged, checksum), version)
            drain(source)  # a transport that stopped early must not leave the other ranks waiting
            if checksum is not None:
                held = self.verify_with.checksum()
                if held != checksum.hexdigest():
                    raise EngineError(f"{self.verify_with.name} engine: after sync v{version} it holds weights with "
                                      f"checksum {held}, the trainer sent {checksum.hexdigest()}")
        except Exception:
            drain(source)
            raise

    def close(self) -> None:
        self.transport.close()


def _tap(stream: Iterable[Bucket], checksum: Optional[StreamingChecksum]) -> Iterator[Bucket]:
    for bucket in stream:
        if checksum is not None:
            for name, t in bucket:
                checksum.add(name, t)
        yield bucket


def make_sync_pipeline(config: WeightSyncConfig, engine: RolloutEngine, engine_kind: str, placement: str, *,
                       engine_tp_size: int = 1, base_dir: Optional[str] = None,
                       disk_dir: Optional[str] = None) -> SyncPipeline:
    """The pipeline for ``engine`` from the run's ``weight_sync`` section: the transport chosen by
    the topology table (``select.py``), FP8 quantisation when ``weight_sync.fp8`` asks for it, and
    the checksum check when ``weight_sync.checksum`` is on."""
    from rlmt_megatron.rollout.weight_sync import fp8

    fp8_config = fp8.config_for_sync(config.fp8, engine_kind)
    transport = make_transport(config, engine, placement, engine_tp_size=engine_tp_size, base_dir=base_dir,
                               disk_dir=disk_dir)
    return SyncPipeline(transport, quantize=None if fp8_config is None else fp8.make_quantizer(fp8_config),
                        verify_with=engine if config.checksum else None)
