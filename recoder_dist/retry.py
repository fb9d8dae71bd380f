"""Storage operations that outlast an outage: a call that fails for a reason that passes (the
connection refused or reset, a timeout, the store's "slow down" or 5xx) is tried again with
exponential backoff, for a bounded total time, each retry logged at WARNING with the location
and the error; after the bound, one :class:`StorageUnavailableError` names the location.

The bound is ``RETRY_SECONDS`` (120 s), or the environment variable ``RECODER_DIST_STORAGE_RETRY_S``
of the process that does the I/O (on a cluster: set it on every node, or in the job's
``runtime_env``), read at each call, so a test can make it short. Errors that another try would
not fix (a missing file, access denied, a bad request) are raised at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

RETRY_SECONDS = 120.0
RETRY_ENV = "RECODER_DIST_STORAGE_RETRY_S"
FIRST_DELAY_S = 0.5  # then doubled at each retry, up to MAX_DELAY_S
MAX_DELAY_S = 8.0

T = TypeVar("T")

# What pyarrow's S3 and GCS filesystems say (in an OSError) when the store did not answer or
# answered "try later": the AWS SDK's error names, curl's, and the socket's.
_TRANSIENT = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Connection reset",
    "Connection refused",
    "Couldn't connect",
    "timed out",
    "Timeout",
    "REQUEST_TIMEOUT",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "INTERNAL_FAILURE",
    "HTTP response code 50",
)


class StorageUnavailableError(OSError):
    """The storage did not answer for the whole retry bound (an ``OSError``, as the error of
    the last try was)."""


def retry_seconds() -> float:
    """The retry bound in force: ``RECODER_DIST_STORAGE_RETRY_S`` if set, else ``RETRY_SECONDS``.

    Raises:
        ValueError: the variable is not a number >= 0.
    """
    value = os.environ.get(RETRY_ENV)
    if value is None or value == "":
        return RETRY_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # NaN too
        raise ValueError(f"{RETRY_ENV} must be a number of seconds >= 0, not {value!r}")
    return seconds


def is_transient(error: BaseException) -> bool:
    """Whether another try may succeed: a connection or timeout error, or an ``OSError`` whose
    message names one (pyarrow's filesystems raise plain ``OSError`` for every failure); never
    a missing file, a permission error, or anything that is not an ``OSError``."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return isinstance(error, OSError) and any(mark in str(error) for mark in _TRANSIENT)


def with_retries(
    operation: Callable[[], T],
    location: str,
    what: str,
    *,
    seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``operation()``, tried again while it fails with a transient error (see
    :func:`is_transient`), waiting 0.5 s, 1 s, 2 s, ... (at most 8 s) between tries, until
    ``seconds`` (default: :func:`retry_seconds`) have passed since the first try began: no try
    begins after the bound, so the call ends within the bound plus one try's time. The
    operation must be safe to repeat (a whole upload, a read).

    Args:
        operation: the call; its result is returned.
        location: what it reads or writes, for the log and the error.
        what: the operation in a few words ("upload", "read"), for the same.
        seconds: the bound; 0 tries once.
        sleep, clock: for tests.

    Raises:
        StorageUnavailableError: still failing after the bound (the last error chained).
        Exception: whatever ``operation`` raised that is not transient, at once.
    """
    bound = retry_seconds() if seconds is None else seconds
    started = clock()
    delay, tries = FIRST_DELAY_S, 0
    while True:
        tries += 1
        try:
            return operation()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = clock() - started
            if elapsed + delay > bound:
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise StorageUnavailableError(
                    f"storage unavailable: {what} {location} failed {tries} time(s) over "
                    f"{elapsed:.1f} s (retry bound {bound:g} s, {RETRY_ENV}): {first_line}"
                ) from e
            logger.warning(
                "%s %s failed (try %d, %.1f s of %g s), retrying in %.1f s: %s",
                what,
                location,
                tries,
                elapsed,
                bound,
                delay,
                e,
            )
            sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
