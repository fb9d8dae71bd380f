"""A second, unrelated Ray instance on this machine, as other users' Ray often is.

Ray Train's ``PlacementGroupCleaner`` finds the cluster by looking for local Ray instances, and
gives up when it finds several ("Found multiple active Ray instances"); the tests that must not
depend on it run with this instance up. It is a plain ``ray.init()`` in a process of its own
session, stopped by that session's process group: nothing here stops Ray by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

_SCRIPT = """
import sys, time, ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
print("up", ray.get_runtime_context().gcs_address, flush=True)
time.sleep(3600)
"""


@pytest.fixture
def second_ray():
    """Yields the GCS address of a second Ray instance, up for the test's duration."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    failures = []
    # Ray gives a node 30 s to start (not configurable); a busy machine can take longer.
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", _SCRIPT],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its raylet, GCS and workers join this process group
        )
        try:
            seen = []
            for line in process.stdout:  # until it says it is up, or exits
                if line.startswith("up "):
                    yield line.split()[1]
                    return
                seen.append(line)
            failures.append("".join(seen)[-1000:])
        finally:
            stop_session(process)
    raise RuntimeError(f"the second Ray instance did not start: {failures}")


def stop_session(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Ends ``process`` and every process of its session (started with start_new_session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            process.poll()  # reaps the leader, so that a finished group reads as gone
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
