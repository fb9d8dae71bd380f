"""Shared fixtures: one local Ray instance for the whole session, and the real datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A cluster whose worker node shares no disk with the head, and a local S3 server.
from tests.multinode import no_shared_disk_cluster, s3_server  # noqa: F401

SHARED_DATA = Path(
    os.environ.get(
        "RECODER_DIST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)


def shared_data(name: str) -> Path:
    """Folder of a dataset in ../shared/data; skips when absent, except under CI=true."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            raise FileNotFoundError(f"{folder} is missing: CI must run the real-data tests")
        pytest.skip(f"{folder} is absent (the real datasets live in ../shared/data)")
    return folder


@pytest.fixture(params=["compiled", "reference"])
def kernel_mode(request) -> str:
    """Runs a test once with the CPU fast paths ("compiled") and once with their numpy/torch
    references ("reference"); the test passes the mode on as an argument."""
    return request.param


@pytest.fixture
def compiled(kernel_mode) -> bool:
    """``kernel_mode`` as the ``compiled=`` argument of the functions and objects that hold a
    fast path."""
    return kernel_mode == "compiled"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with more logical CPUs than cores, so that Ray Data tasks are never starved
    by the Train workers on a 2-core machine."""
    import ray

    from recoder_dist.training.driver.launcher import init_local_ray

    started = not ray.is_initialized()
    if started:
        init_local_ray(num_cpus=4, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def sharded_run(ray_session, tmp_path_factory):
    """The straight sharded 2-worker run of tests/test_sharded_training.py, which the tests of
    two files compare with: one worker group for all of them."""
    from tests.test_sharded_training import straight_run

    return straight_run(tmp_path_factory.mktemp("sharded-run"))


@pytest.fixture(scope="session")
def prepared_ml100k(tmp_path_factory) -> Path:
    """MovieLens 100K as `recoder-dist prepare` writes it: 100 validation and 100 test users."""
    from recoder_dist.cli import main

    folder = tmp_path_factory.mktemp("prepared-ml100k")
    argv = [
        "prepare",
        "--dataset",
        "ml-100k",
        "--data-dir",
        str(shared_data("ml-100k")),
        "--output",
        str(folder),
        "--val-users",
        "100",
        "--test-users",
        "100",
    ]
    if main(argv) != 0:
        raise RuntimeError("recoder-dist prepare failed on ml-100k")
    return folder
