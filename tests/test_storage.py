"""Locations of runs and snapshots: local paths and URIs, against hand-worked cases; writes that
are atomic; and, against a real (local) S3 server, the same files round-tripped through a bucket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recoder_dist import storage
from recoder_dist.training.snapshot import Snapshot, load_snapshot, save_snapshot

S3 = "s3://bucket/runs/a?endpoint_override=127.0.0.1:9000&scheme=http"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://b/x", True),
        ("gs://b/x", True),
        ("file:///tmp/x", False),
        ("/tmp/x", False),
        ("runs/x", False),
        ("C:/runs", False),
    ],
)
def test_is_uri(location, expected):
    assert storage.is_uri(location) is expected


def test_paths_and_uris_are_joined_suffixed_and_climbed_the_same_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalized("runs/a") == str(tmp_path / "runs" / "a")
    assert storage.normalized("file:///tmp/x") == "/tmp/x"
    assert storage.join("runs", "b", "c") == str(tmp_path / "runs" / "b" / "c")
    assert storage.join(S3, "ckpt", "/m.pt") == (
        "s3://bucket/runs/a/ckpt/m.pt?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.suffixed(S3, "_epoch_3.model") == (
        "s3://bucket/runs/a_epoch_3.model?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.suffixed("runs/m", "_epoch_3.model") == str(tmp_path / "runs/m_epoch_3.model")
    assert storage.parent(S3) == "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.parent("runs/m.pt") == str(tmp_path / "runs")
    # Ray and pyarrow give a checkpoint's path within the filesystem: bucket/key for S3.
    assert storage.with_path(S3, "bucket/runs/a/trial/checkpoint_1") == (
        "s3://bucket/runs/a/trial/checkpoint_1?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.with_path("/runs", "/runs/trial/checkpoint_1") == "/runs/trial/checkpoint_1"


def test_an_unknown_scheme_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="cannot open nope://bucket/x"):
        storage.filesystem("nope://bucket/x")


def test_local_writes_copies_and_reads(tmp_path):
    target = tmp_path / "deep" / "folder" / "file.bin"
    assert storage.write_atomically(target, lambda f: f.write(b"abc")) == str(target)
    assert target.read_bytes() == b"abc"
    assert storage.exists(target) and storage.is_file(target)
    assert not storage.is_file(tmp_path / "deep")
    copied = storage.copy(target, tmp_path / "copy.bin")
    assert Path(copied).read_bytes() == b"abc"
    with storage.local_copy(target) as local:
        assert local == str(target)  # a local file is read where it is
    with pytest.raises(FileNotFoundError, match="no file at"), storage.local_copy(tmp_path / "x"):
        pass


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.bin"
    storage.write_atomically(target, lambda f: f.write(b"old"))

    def dying(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_atomically(target, dying)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def snapshot(epoch: int) -> Snapshot:
    import torch

    return Snapshot(
        model_class="m.M",
        model_params={"h": [3]},
        model_state={"w": torch.arange(6.0).reshape(2, 3) * epoch},
        num_items=3,
        num_users=None,
        epoch=epoch,
        seed=7,
    )


def test_snapshots_round_trip_through_a_bucket(s3_server, tmp_path, monkeypatch):
    """save/load/copy of snapshots at s3:// URIs, on a real S3 API (moto), with credentials in
    the environment as a node has them."""
    import torch

    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)
    location = s3_server.uri("snapshots/model_epoch_2.model")
    assert save_snapshot(snapshot(2), location) == location
    info = s3_server.filesystem().get_file_info(s3_server.path("snapshots/model_epoch_2.model"))
    assert info.size > 0
    loaded = load_snapshot(location)
    assert loaded.epoch == 2 and loaded.seed == 7
    assert torch.equal(loaded.model_state["w"], torch.arange(6.0).reshape(2, 3) * 2)
    local = storage.copy(location, tmp_path / "local.model")
    assert load_snapshot(local).epoch == 2
    back = storage.copy(local, s3_server.uri("copies/back.model"))
    assert load_snapshot(back).epoch == 2
    # Bucket to bucket, the store's own copy: the same bytes.
    within = storage.copy(location, s3_server.uri("copies/within.model"))
    fs = s3_server.filesystem()
    with fs.open_input_stream(s3_server.path("copies/within.model")) as f:
        copied = f.read()
    with fs.open_input_stream(s3_server.path("snapshots/model_epoch_2.model")) as f:
        assert copied == f.read()
    assert load_snapshot(within).epoch == 2
    with pytest.raises(FileNotFoundError, match="no file at s3://"):
        storage.copy(s3_server.uri("snapshots/missing.model"), s3_server.uri("copies/x.model"))
    with pytest.raises(FileNotFoundError, match="no snapshot file at s3://"):
        load_snapshot(s3_server.uri("snapshots/missing.model"))
