"""Snapshot files: the model's hyper-parameters and weights, optimizer states and epoch.

Written atomically (temporary file, fsync, rename) so that a crash mid-write leaves the previous
file intact, and read with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field

import torch

FORMAT = "recoder_dist.snapshot"
VERSION = 1


@dataclass
class Snapshot:
    model_class: str
    model_params: dict
    model_state: dict
    num_items: int | None
    num_users: int | None
    epoch: int
    optimizer_type: str | None = None
    optimizer_state: dict = field(default_factory=dict)
    loss: str | None = None
    loss_params: dict = field(default_factory=dict)
    seed: int | None = None  # of the data order and noise; None in files older than it


def model_class_name(model) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def save_snapshot(snapshot: Snapshot, path: str | os.PathLike) -> str:
    """Writes ``snapshot`` to ``path`` atomically and returns the path."""
    payload = {"format": FORMAT, "version": VERSION, **asdict(snapshot)}
    return _write_atomically(path, lambda f: torch.save(payload, f))


def copy_snapshot(source: str | os.PathLike, path: str | os.PathLike) -> str:
    """Copies a snapshot file to ``path`` atomically (a reader never sees half a file)."""

    def copy(f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    return _write_atomically(path, copy)


def _write_atomically(path: str | os.PathLike, write) -> str:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename over
    ``path``: a crash leaves either the old file or the new one, never half of one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".snapshot-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Reads a snapshot written by :func:`save_snapshot`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a snapshot, is of an unknown version, or holds anything but
            tensors and plain data (e.g. pickled code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no snapshot file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file fails anywhere in the unpickler
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable snapshot: {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a recoder_dist snapshot")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{path} is snapshot format version {payload.get('version')}; "
            f"this recoder_dist reads version {VERSION}"
        )
    fields = set(Snapshot.__dataclass_fields__)
    return Snapshot(**{k: v for k, v in payload.items() if k in fields})
