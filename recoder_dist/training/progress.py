"""Per-epoch progress from rank 0 to the driver.

``ray.train.report`` hands results to the Train controller through a one-slot queue that the
controller empties every 2 s, so reporting every epoch would stall short epochs. Rank 0 instead
appends each epoch's metrics to this small actor (a non-blocking call) and reports to Ray Train
only what Ray Train must keep: checkpoints and evaluation results.
"""

from __future__ import annotations

import logging
import threading

import ray

logger = logging.getLogger("recoder_dist")


@ray.remote(num_cpus=0)
class ProgressLog:
    def __init__(self):
        self._records: list[dict] = []
        self._read = 0

    def append(self, record: dict) -> None:
        self._records.append(record)

    def unread(self) -> list[dict]:
        new = self._records[self._read :]
        self._read = len(self._records)
        return new


def format_record(record: dict) -> str:
    fields = "  ".join(
        f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in record.items()
        if key not in ("epoch", "last_epoch")
    )
    if "epoch" in record:
        return f"epoch {record['epoch']}/{record.get('last_epoch', '?')}  {fields}"
    return fields


class ProgressPrinter:
    """Logs the records of a :class:`ProgressLog` on the driver while a run goes on, and
    collects them."""

    def __init__(self, interval_s: float = 0.5):
        self.log = ProgressLog.remote()
        self.records: list[dict] = []
        self._interval_s = interval_s
        self._stop = threading.Event()
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
        while not self._stop.wait(self._interval_s):
            self._drain()

    def _drain(self) -> None:
        for record in ray.get(self.log.unread.remote()):
            self.records.append(record)
            logger.info(format_record(record))

    def history(self) -> list[dict]:
        """One record per epoch, in order: after a restart from a checkpoint, the epochs
        trained again replace their first records."""
        by_epoch = {record["epoch"]: record for record in self.records}
        return [by_epoch[epoch] for epoch in sorted(by_epoch)]
