"""Live progress from the workers to the driver's console: epoch records and notes.

``ray.train.report`` hands results to the Train controller through a one-slot queue that the
controller empties every 2 s, so reporting every epoch would stall short epochs. Rank 0 instead
sends each epoch's record to this small actor (a call that it never waits for), and any rank may
add a note (a warning the user must see: the workers' own logs stay in Ray's log files). The
actor lives on the driver's node, and only shows a run as it goes: what a run returns comes from
Ray Train's Result (``Result.return_value``), so a lost actor costs the console its lines, never
the run its results.

A named run's actor also holds the run's name on the cluster (a named actor, owned by the
driver: it dies with it): a second job that starts the same run while the first lives is
refused at once, naming the first (``RunInUseError``), instead of writing the same checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time

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


# Where the actors that hold runs' names live (named actors are unique within a namespace),
# and how long a new run waits for a name held by a driver that has just ended.
RUNS_NAMESPACE = "recoder_dist.runs"
CLAIM_WAIT_S = 5.0


class RunInUseError(ValueError):
    """Another job is training the run (the same name and storage) on this cluster."""


@ray.remote(num_cpus=0)
class ProgressLog:
    """Epoch records and notes, in the order they arrive; ``holder`` describes the driver."""

    def __init__(self, holder: dict | None = None):
        self._items: list[tuple[str, object]] = []
        self._read = 0
        self._holder = holder or {}

    def holder(self) -> dict:
        return self._holder

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
    of the epochs that evaluate (the others at DEBUG). ``run``: the run's key (its storage and
    name), held by the actor for as long as this printer (see the module docstring).

    Raises:
        RunInUseError: another live job holds ``run``.
    """

    def __init__(self, every: int = 1, interval_s: float = 0.5, run: str | None = None):
        here = ray.get_runtime_context().get_node_id()
        options = dict(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        if run is not None:
            options.update(name=run, namespace=RUNS_NAMESPACE)
        # A holder whose driver has just ended (a stopped job, resubmitted) lets go of the name
        # shortly after (Ray ends a driver's actors with it): a live one still holds it when
        # this gives up.
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            try:
                self.log = ProgressLog.options(**options).remote(driver())
                break
            except ValueError:  # the name is taken
                if run is None:  # no name to take: another mistake, as it is
                    raise
                if time.monotonic() > deadline:
                    raise RunInUseError(_in_use(run)) from None
                time.sleep(0.2)
        self._run = run
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
        if self._run is not None:
            _wait_released(self._run)

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


def driver() -> dict:
    """Who runs this driver, for the message of a job refused while it runs: its cluster (the
    Ray session's name), job, submission, host, pid and start."""
    context = ray.get_runtime_context()
    return {
        "cluster": context.get_session_name(),
        "job": context.get_job_id(),
        "submission": os.environ.get("RAY_JOB_SUBMISSION_ID"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _in_use(run: str) -> str:
    try:
        holder = ray.get(ray.get_actor(run, namespace=RUNS_NAMESPACE).holder.remote(), timeout=10)
    except Exception:  # it ended meanwhile: say what we know
        holder = {}
    who = ", ".join(f"{key} {value}" for key, value in holder.items() if value is not None)
    return (
        f"the run {run} is being trained by another job ({who or 'that just ended'}): "
        "wait for it or stop it, or give this run another name"
    )


def _wait_released(run: str, timeout_s: float = 10.0) -> None:
    """Until the run's name is free again (a killed actor's name is released shortly after),
    so that the next run of this name from this driver is not refused."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(run, namespace=RUNS_NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
