"""A run's lease in its storage: what keeps two clusters that share a bucket from training one
run (the same storage and name) at once.

On one cluster a named actor holds the run (``training.driver.progress``): it dies with its
driver, so a stopped job's run is free again at once. A driver on another cluster cannot see
that actor. So the driver also keeps a lease in the run's folder, ``LEASE_FILE``: who holds the
run (the cluster's Ray session, the job, the host and pid) and until when, renewed while the
run goes on and deleted when it ends. A driver of another cluster that finds a lease that has not
expired is refused, naming the holder; one that finds an expired lease (its holder was lost
without deleting it) takes it over. A lease of this cluster's is left to the named actor,
which knows whether its driver lives (a stopped job, submitted again at once, goes on).

Buckets and shared folders offer no compare-and-swap through pyarrow, so taking a lease is:
read, write, wait ``settle_s`` (half a second), read back; of two drivers that write within
that time, the one that does not read back its own lease steps down. A renewal that finds
another driver's lease logs an error (the run cannot be taken back from its workers): that
needs a write that took longer than ``settle_s`` between a read and a read back. The
clusters' clocks must agree to well within ``lease_s``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

from recoder_dist import storage
from recoder_dist.training.driver.progress import RunInUseError, driver

logger = logging.getLogger(__name__)

LEASE_FILE = ".recoder_dist_lease.json"
LEASE_ENV = "RECODER_DIST_LEASE_S"  # the lease's length, for tests
LEASE_S = 60.0


class RunLease:
    """Holds the run at ``run`` (its storage and name, a folder or a URI) for this driver
    (``holder``: a dict that describes it, ``"cluster"`` its Ray session's name; by default
    ``progress.driver()``) while the block lasts: taken on entry, renewed every third of
    ``lease_s``, deleted on exit.

    Raises (on entry):
        RunInUseError: another cluster's driver holds the run.
    """

    def __init__(
        self, run: str, holder: dict | None = None, lease_s: float | None = None, settle_s=0.5
    ):
        self._location = storage.join(run, LEASE_FILE)
        self._run = run
        self._holder = {**(holder or driver()), "token": uuid.uuid4().hex}
        self._lease_s = float(lease_s or os.environ.get(LEASE_ENV) or LEASE_S)
        self._settle_s = settle_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)

    def __enter__(self) -> RunLease:
        self._refuse_if_held()
        self._write()
        time.sleep(self._settle_s)
        current = self._read()
        if current is None or current.get("token") != self._holder["token"]:
            raise _in_use(self._run, current or {})
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            current = self._read()
            if current is not None and current.get("token") == self._holder["token"]:
                storage.delete(self._location)
        except Exception as e:  # the run's outcome stands; the lease expires by itself
            logger.warning("could not delete the lease of the run %s: %s", self._run, e)

    def _refuse_if_held(self) -> None:
        current = self._read()
        if current is None or current.get("cluster") == self._holder["cluster"]:
            return  # free, or this cluster's: the named actor has decided
        if current.get("expires", 0) > time.time():
            raise _in_use(self._run, current)
        logger.warning(
            "taking over the run %s from a lease that expired (%s)", self._run, _who(current)
        )

    def _renew(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            try:
                current = self._read()
                if current is not None and current.get("token") != self._holder["token"]:
                    logger.error(
                        "the run %s was taken over by another driver (%s): two drivers train "
                        "it now; stop one of them",
                        self._run,
                        _who(current),
                    )
                    return
                self._write()
            except Exception as e:  # the storage down for longer than its retries: go on
                logger.warning("could not renew the lease of the run %s: %s", self._run, e)

    def _read(self) -> dict | None:
        if not storage.is_file(self._location):
            return None
        with storage.local_copy(self._location) as path, open(path) as f:
            try:
                return json.load(f)
            except ValueError:  # a lease cut short: nobody's
                return None

    def _write(self) -> None:
        lease = {**self._holder, "expires": time.time() + self._lease_s}
        storage.write_atomically(self._location, lambda f: f.write(json.dumps(lease).encode()))


def _who(lease: dict) -> str:
    shown = ("cluster", "job", "submission", "host", "pid", "since")
    return ", ".join(f"{key} {lease[key]}" for key in shown if lease.get(key) is not None)


def _in_use(run: str, lease: dict) -> RunInUseError:
    return RunInUseError(
        f"the run {run} is being trained by a driver of another cluster "
        f"({_who(lease) or 'that just wrote its lease'}): wait for it or stop it, or give this "
        "run another name"
    )
