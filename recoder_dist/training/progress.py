"""Live progress from the workers to the driver's console: epoch records and notes.

``ray.train.report`` hands results to the Train controller through a one-slot queue that the
controller empties every 2 s, so reporting every epoch would stall short epochs. Rank 0 instead
sends each epoch's record to this small actor (a call that it never waits for), and any rank may
add a note (a warning the user must see: the workers' own logs stay in Ray's log files). The
actor lives on the driver's node, and only shows a run as it goes: what a run returns comes from
Ray Train's Result (``Result.return_value``), so a lost actor costs the console its lines, never
the run its results.
"""

from __future__ import annotations

import logging
import math
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger("recoder_dist")

# Record keys that are bookkeeping, not figures to show.
_NOT_SHOWN = {
    "epoch",
    "last_epoch",
    "loss",
    "seconds",
    "peak_rss_mb",
    "private_rss_mb",
    "eval_users",
    "snapshot",
    "profile",
}
_NOT_SHOWN |= {"sync_bytes_per_step", "dense_sync_bytes_per_step"}


@ray.remote(num_cpus=0)
class ProgressLog:
    """Epoch records and notes, in the order they arrive."""

    def __init__(self):
        self._items: list[tuple[str, object]] = []
        self._read = 0

    def append(self, record: dict) -> None:
        self._items.append(("record", record))

    def note(self, message: str) -> None:
        self._items.append(("note", message))

    def unread(self) -> list[tuple[str, object]]:
        new = self._items[self._read :]
        self._read = len(self._items)
        return new


def format_record(record: dict) -> str:
    """``epoch 3/40  loss 512.3456  0.42 s  712 MB  NDCG@100 0.4012 (600 users)``."""
    parts = [f"epoch {record['epoch']}/{record['last_epoch']}", f"loss {record['loss']:.4f}"]
    parts.append(f"{record['seconds']:.2f} s")
    if "peak_rss_mb" in record:
        parts.append(f"{record['peak_rss_mb']:,.0f} MB")
    metrics = [f"{k} {v:.4f}" for k, v in record.items() if k not in _NOT_SHOWN]
    if metrics:
        parts.append("  ".join(metrics) + f" ({record['eval_users']} users)")
    return "  ".join(parts)


class ProgressPrinter:
    """Logs what a :class:`ProgressLog` receives on the driver while a run goes on: every note,
    and at INFO the epoch records of every ``every``-th epoch, of the first and last epochs and
    of the epochs that evaluate (the others at DEBUG)."""

    def __init__(self, every: int = 1, interval_s: float = 0.5):
        here = ray.get_runtime_context().get_node_id()
        self.log = ProgressLog.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
        ).remote()
        self._every = max(1, every)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ProgressPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        ray.kill(self.log)

    def _poll(self) -> None:
        while not self._stop.wait(self._interval_s) and self._drain():
            pass

    def _drain(self) -> bool:
        """Logs what arrived; False once the actor is gone (the run goes on without lines)."""
        if self._lost:
            return False
        try:
            items = ray.get(self.log.unread.remote())
        except ray.exceptions.RayActorError as e:
            self._lost = True
            logger.warning(
                "progress lines stop here (their actor was lost: %s)", str(e).splitlines()[0]
            )
            return False
        for kind, item in items:
            if kind == "note":
                logger.warning(item)
            else:
                level = logging.INFO if self._shown(item) else logging.DEBUG
                logger.log(level, format_record(item))
        return True

    def _shown(self, record: dict) -> bool:
        epoch = record["epoch"]
        return (
            epoch % self._every == 0 or epoch in (1, record["last_epoch"]) or "eval_users" in record
        )


def epochs_between_lines(num_epochs: int, lines: int = 10) -> int:
    """Show about ``lines`` epoch lines in a run of ``num_epochs`` epochs."""
    return max(1, math.ceil(num_epochs / lines))
