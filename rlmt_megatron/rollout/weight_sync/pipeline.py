"""The weight sync, as one pipeline: export stream → optional FP8 → checksum → every engine's transport.

    trainer ranks: buckets_at(policy) ──► [fp8.quantize_buckets] ──► [StreamingChecksum tap] ──► fan-out ──► transport.push (engine 0)
                    (TP gathers, PP sends)     (weight_sync.fp8)         (weight_sync.checksum)     (fan_out.py)  transport.push (engine 1) …
                                                                                                                 (select.py's table)

The stream is read once and quantised once, whatever the number of engines; each engine's
transport gets the same buckets at the same time (``fan_out.py``), so a sync's wall time does not
grow with the engines while the transports run in parallel.

The export stream is collective: every trainer rank walks it (TP all-gathers, each PP stage
streaming to the rank that talks to the engines). So the rank holding the pipeline must read the
stream to its end even when a transport fails part-way (an engine dying mid-sync), or the other
ranks would wait in their gathers forever: :meth:`SyncPipeline.push` drains the rest of the stream
before it reports, and ranks without an engine call :func:`drain`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.rollout.engine import EngineError, RolloutEngine
from rlmt_megatron.rollout.fleet import MembersFailed
from rlmt_megatron.rollout.weight_sync.checksum import StreamingChecksum
from rlmt_megatron.rollout.weight_sync.fan_out import fan_out
from rlmt_megatron.rollout.weight_sync.interfaces import WeightTransport
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig

Quantizer = Callable[[Iterable[Bucket]], Iterator[Bucket]]


def drain(stream: Iterable[Bucket]) -> None:
    """Take part in the export without an engine (every rank but the engines' client)."""
    for _ in stream:
        pass


@dataclass
class SyncTarget:
    """One engine as the sync sees it: the transport that reaches it, and the engine itself (asked
    what it holds when the pipeline verifies checksums)."""

    transport: WeightTransport
    engine: RolloutEngine


def check_verifiable(engine: RolloutEngine) -> None:
    """``weight_sync.checksum=true`` needs engines that report what they hold."""
    if not hasattr(engine, "checksum"):
        raise RLMTError(f"weight_sync.checksum=true needs an engine that reports what it holds; "
                        f"the {engine.name} engine does not (use it with the hf or vllm engine)")


class SyncPipeline:
    """The run's sync: ``push(stream, version, targets)`` runs the stream through the stages into
    every target at once.

    ``verify``: after the transports, ask each engine for the checksum of what it holds and compare
    it with the checksum of what was sent (a silent mismatch fails that engine).
    """

    def __init__(self, *, quantize: Optional[Quantizer] = None, verify: bool = False):
        self.quantize = quantize
        self.verify = verify

    def push(self, stream: Iterable[Bucket], version: int, targets: Mapping[int, SyncTarget],
             fleet_size: Optional[int] = None) -> None:
        """Deliver ``version`` to every target (engine index -> target). Raises
        :class:`MembersFailed` naming the engines that failed (the others hold ``version``);
        ``fleet_size``: how many engines the run has, for the error's wording."""
        source = iter(stream)
        try:
            staged: Iterator[Bucket] = self.quantize(source) if self.quantize is not None else source
            checksum = StreamingChecksum() if self.verify else None
            failed = fan_out(_tap(staged, checksum), {i: _pusher(t.transport, version) for i, t in targets.items()})
            drain(source)  # a transport that stopped early must not leave the other ranks waiting
            if checksum is not None:
                sent = checksum.hexdigest()
                for i, target in targets.items():
                    if i in failed:
                        continue
                    try:
                        held = target.engine.checksum()
                    except EngineError as e:
                        failed[i] = str(e)
                        continue
                    if held != sent:
                        failed[i] = (f"{target.engine.name} engine: after sync v{version} it holds weights with "
                                     f"checksum {held}, the trainer sent {sent}")
        except Exception:
            drain(source)
            raise
        if failed:
            raise MembersFailed(failed, fleet_size or len(targets))


def _pusher(transport: WeightTransport, version: int) -> Callable[[Iterable[Bucket]], None]:
    return lambda buckets: transport.push(buckets, version)


def _tap(stream: Iterable[Bucket], checksum: Optional[StreamingChecksum]) -> Iterator[Bucket]:
    for bucket in stream:
        if checksum is not None:
            for name, t in bucket:
                checksum.add(name, t)
        yield bucket


def make_sync_pipeline(config: WeightSyncConfig, engine_kind: str) -> SyncPipeline:
    """The pipeline from the run's ``weight_sync`` section: FP8 quantisation when
    ``weight_sync.fp8`` asks for it, and the checksum check when ``weight_sync.checksum`` is on.
    Each engine's transport comes from the topology table (``select.make_transport``)."""
    from rlmt_megatron.rollout.weight_sync import fp8

    fp8_config = fp8.config_for_sync(config.fp8, engine_kind)
    return SyncPipeline(quantize=None if fp8_config is None else fp8.make_quantizer(fp8_config), verify=config.checksum)
