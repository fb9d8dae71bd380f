"""Training batches made ahead in a background thread, across epoch boundaries.

Ray Data takes tens of milliseconds to hand over an epoch's first rows (its streaming executor
starts, then polls in sleeps), which the training step would otherwise wait for. A thread that
runs ahead of the step does that waiting while the step's torch operations run (they release
the GIL). It runs into the next epoch as soon as this one's batches are made, so the next
epoch's start overlaps this epoch's last steps.

The batches and their order are those of iterating in the step's own thread: every epoch's
order is fixed by its seed, not by when it is read.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any


class _EndOfEpoch:
    def __init__(self, cpu_seconds: float):
        self.cpu_seconds = cpu_seconds


# How long the producer waits on a full queue before it looks at the stop flag again.
_POLL_SECONDS = 0.05


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class EpochPrefetcher:
    """Iterates ``epochs`` (one iterable of batches per epoch, in order) in a daemon thread,
    keeping at most ``depth`` batches made ahead of the consumer.

    The consumer calls :meth:`next_epoch` once per epoch, in order, and must call
    :meth:`close` when it stops, finished or not (``with EpochPrefetcher(...) as prefetcher``).
    An error raised while making a batch is raised again where the consumer would have
    received that batch.
    """

    def __init__(self, epochs: Iterable[Iterable[Any]], depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        # CPU seconds that the thread spent making the last epoch that next_epoch finished.
        self.last_epoch_cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(epochs,), name="recoder-dist-prefetch", daemon=True
        )
        self._thread.start()

    def next_epoch(self) -> Iterator[Any]:
        """The batches of the next epoch, as they are made."""
        while True:
            item = self._queue.get()
            if isinstance(item, _EndOfEpoch):
                self.last_epoch_cpu_seconds = item.cpu_seconds
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        """Stops the producer: it ends at its next batch, or on its own if it is blocked inside
        the epochs' iterables (it is a daemon thread, so it never holds the process up)."""
        self._stop.set()
        self._thread.join(timeout=1.0)

    def __enter__(self) -> EpochPrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _produce(self, epochs: Iterable[Iterable[Any]]) -> None:
        try:
            for batches in epochs:
                started = time.thread_time()
                for batch in batches:
                    if not self._put(batch):
                        return
                if not self._put(_EndOfEpoch(time.thread_time() - started)):
                    return
            self._put(_Failure(RuntimeError("next_epoch called after the last epoch")))
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))

    def _put(self, item) -> bool:
        """Puts ``item`` when there is room; False once the consumer has closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False
