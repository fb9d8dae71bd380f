"""Storage calls retried through an outage (recoder_dist.retry, recoder_dist.retrying_fs): the
backoff and its bound on a fake clock, then real uploads and downloads through the local S3
server behind tests/flaky_proxy.py, which refuses or stalls connections for a while."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from recoder_dist import storage
from recoder_dist.retry import (
    RETRY_ENV,
    StorageUnavailableError,
    is_transient,
    retry_seconds,
    with_retries,
)
from tests.flaky_proxy import FlakyProxy

URI = "s3://bucket/run/epoch_3/snapshot.pt"
REFUSED = OSError(
    "When uploading part for key 'run/epoch_3/snapshot.pt' in bucket 'bucket': AWS Error "
    "NETWORK_CONNECTION during UploadPart operation: curlCode: 56, Failure when receiving data "
    "from the peer; Details: Recv failure: Connection reset by peer"
)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, error: Exception, clock: FakeClock, cost_s: float = 0.0):
    """An operation that raises ``error`` ``times`` times (each try taking ``cost_s``), then
    returns "done"; ``calls`` counts the tries."""

    def operation():
        operation.calls += 1
        clock.now += cost_s
        if operation.calls <= times:
            raise error
        return "done"

    operation.calls = 0
    return operation


def test_a_call_that_fails_n_times_is_retried_with_doubling_waits_each_logged(caplog):
    clock = FakeClock()
    operation = failing(5, REFUSED, clock)
    with caplog.at_level(logging.WARNING, logger="recoder_dist.retry"):
        result = with_retries(operation, URI, "upload", seconds=120, sleep=clock.sleep, clock=clock)
    assert result == "done" and operation.calls == 6
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert all(URI in w and "NETWORK_CONNECTION" in w for w in warnings), warnings
    assert "try 1, 0.0 s of 120 s), retrying in 0.5 s" in warnings[0]


def test_the_wait_stops_doubling_at_8_s():
    clock = FakeClock()
    operation = failing(7, REFUSED, clock)
    with_retries(operation, URI, "upload", seconds=120, sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_a_call_that_never_succeeds_fails_within_the_bound_with_one_error_naming_the_uri():
    clock = FakeClock()
    operation = failing(10**9, REFUSED, clock, cost_s=6.0)  # the SDK's own 3 tries: ~6 s
    with pytest.raises(StorageUnavailableError) as raised:
        with_retries(operation, URI, "upload", seconds=60, sleep=clock.sleep, clock=clock)
    # Tries begin at 0, 6.5, 13.5, 21.5, 31.5, 45.5, 59.5 s: the next would begin after the
    # bound, so the error comes at the end of the last try (65.5 s).
    assert operation.calls == 7 and clock.now == 65.5
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"storage unavailable: upload {URI} failed 7 time(s) over 65.5 s")
    assert f"(retry bound 60 s, {RETRY_ENV})" in message and "NETWORK_CONNECTION" in message
    assert raised.value.__cause__ is REFUSED
    assert isinstance(raised.value, OSError)  # callers that catch OSError still do


def test_a_bound_of_0_tries_once():
    clock = FakeClock()
    operation = failing(1, REFUSED, clock)
    with pytest.raises(StorageUnavailableError, match="failed 1 time"):
        with_retries(operation, URI, "read", seconds=0, sleep=clock.sleep, clock=clock)
    assert operation.calls == 1 and clock.sleeps == []


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no file"),
        PermissionError("denied"),
        OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied"),
        OSError("AWS Error NO_SUCH_BUCKET during HeadObject operation"),
        ValueError("not storage at all"),
    ],
)
def test_errors_that_another_try_would_not_fix_are_raised_at_once(error):
    clock = FakeClock()
    operation = failing(1, error, clock)
    with pytest.raises(type(error)) as raised:
        with_retries(operation, URI, "upload", seconds=120, sleep=clock.sleep, clock=clock)
    assert raised.value is error and operation.calls == 1 and not is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        REFUSED,
        ConnectionRefusedError("refused"),
        TimeoutError("timed out"),
        OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate"),
        OSError("AWS Error UNKNOWN (HTTP status 503) ... HTTP response code 503"),
    ],
)
def test_connection_errors_and_try_later_answers_are_transient(error):
    assert is_transient(error)


def test_the_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert retry_seconds() == 120.0
    monkeypatch.setenv(RETRY_ENV, "2.5")
    assert retry_seconds() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(RETRY_ENV, bad)
        with pytest.raises(ValueError, match=f"{RETRY_ENV} must be a number of seconds >= 0"):
            retry_seconds()


# --- Real uploads through the proxy ------------------------------------------------------------


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """The session's S3 server behind a FlakyProxy; this process has the credentials."""
    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)
    host, port = s3_server.host_port.split(":")
    with FlakyProxy(host, int(port)) as proxy:
        proxy.uri = lambda key: (
            f"s3://{s3_server.path(key)}?endpoint_override={proxy.host_port}&scheme=http"
        )
        yield proxy


def _read(s3_server, key: str) -> bytes:
    with s3_server.filesystem().open_input_stream(s3_server.path(key)) as f:
        return f.read()


# Refused, a call fails after the SDK's own 3 attempts (about 6 s): an outage longer than that
# reaches our retries. Stalled, a call waits in the SDK until the connection drops.
@pytest.mark.slow
@pytest.mark.parametrize("mode, seconds", [("refuse", 8), ("stall", 3)])
def test_an_upload_and_a_download_outlast_an_outage(
    proxied, s3_server, tmp_path, mode, seconds, caplog
):
    payload = bytes(range(256)) * 4096  # 1 MiB
    local = tmp_path / "file"
    local.write_bytes(payload)
    key = f"retry/{mode}/file"
    proxied.outage(mode, seconds=seconds)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="recoder_dist.retry"):
        storage.upload(str(local), proxied.uri(key))
    assert time.monotonic() - started >= seconds - 0.5  # it waited for the outage's end
    assert _read(s3_server, key) == payload
    if mode == "refuse":  # a stalled call waits in the SDK, then passes: no retry of ours
        assert any(proxied.uri(key) in r.getMessage() for r in caplog.records)

    proxied.outage(mode, seconds=seconds)
    with storage.local_copy(proxied.uri(key)) as copied, open(copied, "rb") as f:
        assert f.read() == payload


@pytest.mark.slow
def test_an_upload_through_a_store_that_never_answers_fails_within_the_bound(
    proxied, tmp_path, monkeypatch
):
    monkeypatch.setenv(RETRY_ENV, "2")
    local = tmp_path / "file"
    local.write_bytes(b"x" * 1000)
    proxied.outage("refuse", seconds=600)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as raised:
        storage.upload(str(local), proxied.uri("retry/never/file"))
    # One try of the SDK's (its own 3 attempts, about 6 s), then the bound has passed.
    assert time.monotonic() - started < 20
    assert proxied.uri("retry/never/file") in str(raised.value)
    assert f"retry bound 2 s, {RETRY_ENV}" in str(raised.value)


@pytest.mark.slow
def test_ray_trains_copy_through_the_retrying_filesystem_outlasts_an_outage(
    proxied, s3_server, tmp_path
):
    """What Ray Train does with a checkpoint folder (pyarrow.fs.copy_files, in threads), into
    the filesystem that the launcher gives it: every file arrives whole."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    files = {f"shard_{i}.pt": bytes([i]) * (300_000 + i) for i in range(12)}  # > 8 I/O threads
    for name, data in files.items():
        (folder / name).write_bytes(data)
    fs, path = storage.retrying_filesystem(proxied.uri("retry/copy/epoch_1"))
    timer = threading.Timer(0.05, proxied.outage, args=("refuse", 8))
    timer.start()
    pafs.copy_files(str(folder), path, destination_filesystem=fs, use_threads=True)
    timer.join()
    assert proxied.refused > 0  # the outage began during the copy
    for name, data in files.items():
        assert _read(s3_server, f"retry/copy/epoch_1/{name}") == data, name


def test_the_retrying_filesystem_pickles_as_its_uri_alone(proxied, monkeypatch):
    """Sent to Ray's workers and controller, it carries no credentials: each process opens the
    store with its own."""
    fs, _ = storage.retrying_filesystem(proxied.uri("retry/pickle"))
    fs.get_file_info("x/y")  # opens the store in this process
    data = pickle.dumps(fs)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert os.environ[name].encode() not in data
    again = pickle.loads(data)
    assert again.handler.location == proxied.uri("retry/pickle")


@pytest.mark.slow
def test_the_rows_read_from_a_bucket_outlast_an_outage(proxied, s3_server, prepared_ml100k):
    """What a read task of ``UserRowFiles.row_blocks`` runs (the file's footer, then its row
    groups), each started during an outage that the SDK's own attempts do not outlast."""
    from recoder_dist.data.parquet_rows import _footer, _read_row_groups
    from recoder_dist.datasets import open_prepared

    local = open_prepared(prepared_ml100k).train
    name = os.path.basename(local.paths[0])
    bucket = s3_server.filesystem()
    with (
        open(local.paths[0], "rb") as f,
        bucket.open_output_stream(s3_server.path(f"retry/rows/{name}")) as out,
    ):
        out.write(f.read())
    uri = proxied.uri(f"retry/rows/{name}")
    proxied.outage("refuse", seconds=8)
    metadata = _footer(uri)
    assert metadata.num_rows == local.num_rows
    proxied.outage("refuse", seconds=8)
    groups = tuple(range(metadata.num_row_groups))
    table, rows = _read_row_groups(uri, groups, local.num_items, local.has_target)
    assert proxied.refused > 0 and rows == local.num_rows
    assert table.equals(pq.read_table(local.paths[0]))  # the file as read from its folder
