"""Snapshot files: round trip, refusal of foreign or malicious files, atomic writes."""

from __future__ import annotations

import os
import pickle
import shlex
from dataclasses import fields

import pytest
import torch

import recoder_dist.training.snapshot as snapshot_module
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.snapshot import (
    FORMAT,
    VERSION,
    Snapshot,
    load_snapshot,
    model_class_name,
    save_snapshot,
)
from recoder_dist.training.worker.optimizers import build_optimizers
from tests.damage import alter_a_tensor_byte


def make_snapshot(epoch: int = 3, seed: int = 0) -> Snapshot:
    """A snapshot of a sparse autoencoder after one Adam step, so optimizer states exist."""
    torch.manual_seed(seed)
    model = DynamicAutoencoder([8], is_constrained=True, sparse=True)
    model.init_model(num_items=12)
    opts = build_optimizers(model, "adam", lr=0.01, weight_decay=0.1)
    model(torch.rand(2, 12)).sum().backward()
    opts.step()
    return Snapshot(
        model_class=model_class_name(model),
        model_params=model.model_params(),
        model_state=model.state_dict(),
        num_items=12,
        num_users=None,
        epoch=epoch,
        optimizer_type="adam",
        optimizer_state=opts.state_dict(),
        loss="mse",
        loss_params={"confidence": 2.5},
    )


def assert_same(a, b, where="snapshot"):
    """Deep equality of nested dicts/lists with tensors compared exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


def test_round_trip(tmp_path):
    """Every field comes back equal, tensors bit for bit."""
    original = make_snapshot()
    path = tmp_path / "deep" / "folder" / "model.pt"  # missing folders are created
    assert save_snapshot(original, path) == str(path)
    loaded = load_snapshot(path)
    assert isinstance(loaded, Snapshot)
    for f in fields(Snapshot):
        assert_same(getattr(original, f.name), getattr(loaded, f.name), f.name)
    assert loaded.model_class == "recoder_dist.nn.autoencoder.DynamicAutoencoder"
    assert loaded.model_params["hidden_layers"] == [8]
    assert loaded.optimizer_state["sparse"]["state"]  # SparseAdam moments survived


def test_round_trip_restores_a_working_model(tmp_path):
    """A model rebuilt from the loaded snapshot computes what the saved one did."""
    original = make_snapshot()
    save_snapshot(original, tmp_path / "m.pt")
    loaded = load_snapshot(tmp_path / "m.pt")
    models = []
    for snap in (original, loaded):
        model = DynamicAutoencoder(**snap.model_params)
        model.init_model(num_items=snap.num_items)
        model.load_state_dict(snap.model_state)
        models.append(model.eval())
    x = torch.rand(3, 12)
    with torch.no_grad():
        assert torch.equal(models[0](x), models[1](x))


def test_defaults_round_trip(tmp_path):
    """A minimal snapshot (default optional fields) round-trips too."""
    snap = Snapshot("m.C", {}, {"w": torch.arange(3)}, None, 7, epoch=0)
    save_snapshot(snap, tmp_path / "s.pt")
    loaded = load_snapshot(str(tmp_path / "s.pt"))
    for f in fields(Snapshot):
        assert_same(getattr(snap, f.name), getattr(loaded, f.name), f.name)


def test_overwrite_replaces_previous(tmp_path):
    """Saving again at the same path replaces the file; no temporary file is left."""
    path = tmp_path / "s.pt"
    save_snapshot(make_snapshot(epoch=1), path)
    save_snapshot(make_snapshot(epoch=2, seed=1), path)
    assert load_snapshot(path).epoch == 2
    assert os.listdir(tmp_path) == ["s.pt"]


def test_missing_file(tmp_path):
    """No file: FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_snapshot(tmp_path / "nope.pt")


def test_directory_is_not_a_snapshot(tmp_path):
    """A folder at the path is reported as a missing snapshot file."""
    with pytest.raises(FileNotFoundError, match="no snapshot file"):
        load_snapshot(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(bytes(range(256)) * 3, id="byte_ramp"),
        pytest.param(b"", id="empty"),
        pytest.param(b"PK\x03\x04 truncated zip", id="zip_header"),
        pytest.param(b"not a snapshot at all", id="text"),
        pytest.param(b"\x80\x02}q\x00(X\x01\x00\x00\x00a", id="truncated_pickle"),
    ],
)
def test_garbage_file_is_value_error(tmp_path, content):
    """A file of arbitrary bytes raises ValueError saying it is not a readable snapshot."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.pt is not a readable snapshot"):
        load_snapshot(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"a", id="append_on_empty_stack"),  # IndexError: pop from empty list
        pytest.param(b"h\x05", id="get_missing_memo"),  # KeyError: 5
    ],
)
def test_pickle_opcode_garbage_is_value_error(tmp_path, content):
    """Bytes that happen to start with pickle opcodes must also raise ValueError."""
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable snapshot"):
        load_snapshot(path)


def test_dict_without_format_marker(tmp_path):
    """A valid torch.save of a plain dict is refused: it is not a recoder_dist snapshot."""
    path = tmp_path / "plain.pt"
    torch.save({"version": VERSION, "model_state": {"w": torch.ones(2)}}, path)
    with pytest.raises(ValueError, match="not a recoder_dist snapshot"):
        load_snapshot(path)


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.ones(2), {"format": "other", "version": 1}])
def test_other_torch_files(tmp_path, payload):
    """Lists, bare tensors and dicts with a foreign marker are refused."""
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="not a recoder_dist snapshot"):
        load_snapshot(path)


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_wrong_version(tmp_path, version):
    """A snapshot of another format version raises ValueError naming both versions."""
    path = tmp_path / "future.pt"
    payload = {"format": FORMAT, "version": version, **make_snapshot().__dict__}
    if version is None:
        del payload["version"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=rf"version {version}.*reads version {VERSION}"):
        load_snapshot(path)


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("writer", ["pickle", "torch", "torch_in_snapshot"])
def test_pickled_code_is_refused_and_not_run(tmp_path, writer):
    """A file that runs code when unpickled raises ValueError, and the code does not run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(Exploit(str(marker)), f, protocol=2)
    elif writer == "torch":
        torch.save(Exploit(str(marker)), path)
    else:
        payload = {"format": FORMAT, "version": VERSION, **make_snapshot().__dict__}
        payload["loss_params"] = {"x": Exploit(str(marker))}
        torch.save(payload, path)
    # Control: the exploit works when unpickled without protection.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Exploit(str(control))))
    assert control.exists()

    with pytest.raises(ValueError, match="evil.pt is not a readable snapshot"):
        load_snapshot(path)
    assert not marker.exists()


class PartialWriteError(OSError):
    pass


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    """torch.save dying halfway leaves the previous snapshot loadable and no temporary file."""
    path = tmp_path / "model.pt"
    previous = make_snapshot(epoch=4)
    save_snapshot(previous, path)
    previous_bytes = path.read_bytes()
    written = []

    def dying_save(obj, f, *args, **kwargs):
        f.write(previous_bytes[: len(previous_bytes) // 2])
        written.append(f.name if hasattr(f, "name") else f)
        raise PartialWriteError("disk full")

    monkeypatch.setattr(snapshot_module.torch, "save", dying_save)
    with pytest.raises(PartialWriteError, match="disk full"):
        save_snapshot(make_snapshot(epoch=5, seed=1), path)
    monkeypatch.undo()

    assert written, "the patched torch.save was not used"
    assert path.read_bytes() == previous_bytes
    loaded = load_snapshot(path)
    assert loaded.epoch == 4
    assert_same(previous.model_state, loaded.model_state, "model_state")
    assert os.listdir(tmp_path) == ["model.pt"]


def test_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A KeyboardInterrupt during the write also cleans up, and no file appears at the path."""

    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshot_module.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_snapshot(make_snapshot(), tmp_path / "model.pt")
    assert os.listdir(tmp_path) == []


def test_an_altered_tensor_is_refused_with_the_files_name(tmp_path):
    """A flipped byte in a tensor loads silently with torch.load; the snapshot's checksum
    catches it."""
    path = save_snapshot(make_snapshot(), str(tmp_path / "s.pt"))
    load_snapshot(path)  # whole: reads
    alter_a_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch itself reads the damaged file
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        load_snapshot(path)


def test_a_snapshot_without_a_checksum_still_loads(tmp_path):
    """Files written before checksums load as they are."""
    path = str(tmp_path / "old.pt")
    payload = torch.load(save_snapshot(make_snapshot(), path), weights_only=True)
    del payload["checksum"]
    torch.save(payload, path)
    assert_same(load_snapshot(path).model_state, make_snapshot().model_state)
