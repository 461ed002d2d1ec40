"""One bucket stream into several consumers at once (one per engine), read once, held briefly.

Each consumer (an engine's ``transport.push``) runs in its own thread and reads its own bounded
queue; the producer (the caller's thread, which walks the collective export stream) hands every
bucket to every queue. So the whole sync takes about as long as the slowest engine's transport,
not the sum over engines, and at most ``depth`` buckets per engine wait in memory beyond the one
being exported (the buckets are shared, not copied).

Failure of one consumer never blocks the others or the producer: a consumer that raised, or
returned before the end, keeps emptying its queue until the end. A failure of the stream itself
(the export) is raised in every consumer, so none mistakes half a set of weights for a whole one,
and then in the caller.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Mapping

from rlmt_megatron.checkpoint.safetensors_io import Bucket
from rlmt_megatron.rollout.engine import failure_text

Consumer = Callable[[Iterable[Bucket]], None]

_END = object()


class StreamFailed(Exception):
    """Raised in the consumers when the producer's stream failed part-way."""


class _Aborted:
    def __init__(self, error: BaseException):
        self.error = error


def fan_out(stream: Iterable[Bucket], consumers: Mapping[int, Consumer], depth: int = 2) -> dict[int, str]:
    """Feed every bucket of ``stream`` to every consumer; returns index -> error text for the
    consumers that failed (an empty dict when all succeeded). With one consumer it runs in the
    caller's thread."""
    if not consumers:
        for _ in stream:
            pass
        return {}
    if len(consumers) == 1:
        (index, consume), = consumers.items()
        stream_error: list[BaseException] = []

        def guarded() -> Iterator[Bucket]:
            try:
                yield from stream
            except BaseException as e:
                stream_error.append(e)
                raise

        try:
            consume(guarded())
        except Exception as e:  # noqa: BLE001 - reported per consumer, like the threaded case
            if stream_error:
                raise stream_error[0] from None
            return {index: failure_text(e)}
        if stream_error:  # the consumer swallowed the export's failure
            raise stream_error[0]
        return {}
    queues = {i: queue.Queue(maxsize=depth) for i in consumers}
    failed: dict[int, str] = {}

    def run(index: int) -> None:
        q = queues[index]
        seen_end = False

        def buckets() -> Iterator[Bucket]:
            nonlocal seen_end
            while True:
                item = q.get()
                if item is _END:
                    seen_end = True
                    return
                if isinstance(item, _Aborted):
                    seen_end = True
                    raise StreamFailed(f"the weight export failed part-way: {failure_text(item.error)}")
                yield item

        try:
            consumers[index](buckets())
        except Exception as e:  # noqa: BLE001
            failed[index] = failure_text(e)
        while not seen_end:  # returned or failed early: keep the producer from blocking on this queue
            item = q.get()
            seen_end = item is _END or isinstance(item, _Aborted)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"sync-engine-{i}") for i in consumers]
    for t in threads:
        t.start()
    try:
        for bucket in stream:
            for q in queues.values():
                q.put(bucket)
    except BaseException as e:
        for q in queues.values():
            q.put(_Aborted(e))
        for t in threads:
            t.join()
        raise
    for q in queues.values():
        q.put(_END)
    for t in threads:
        t.join()
    return failed
