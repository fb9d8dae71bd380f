"""Snapshot files: the model's hyper-parameters and weights, optimizer states and epoch.

Written atomically (see :func:`recoder_dist.storage.write_atomically`: a crash mid-write leaves
the previous file intact) to a path or a URI, with a checksum of the content
(:mod:`recoder_dist.checksum`), and read with ``torch.load(weights_only=True)``, which refuses
pickled code; the reader verifies the checksum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch

from recoder_dist import storage
from recoder_dist.checksum import verify, with_checksum

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


def save_snapshot(snapshot: Snapshot, location: str | os.PathLike) -> str:
    """Writes ``snapshot`` to ``location`` (a path or a URI, see :mod:`recoder_dist.storage`)
    atomically and returns it: a reader never sees half a file, and a crash mid-write leaves
    the previous file."""
    # The fields themselves, not asdict(snapshot): asdict deep-copies every tensor, a second
    # copy of the whole model and its optimizer states for the time of the write.
    values = {f.name: getattr(snapshot, f.name) for f in fields(snapshot)}
    payload = with_checksum({"format": FORMAT, "version": VERSION, **values})
    return storage.write_atomically(location, lambda f: torch.save(payload, f))


def copy_snapshot(source: str | os.PathLike, destination: str | os.PathLike) -> str:
    """Copies a snapshot file between two locations (paths or URIs), atomically."""
    return storage.copy(source, destination)


def load_snapshot(location: str | os.PathLike) -> Snapshot:
    """Reads a snapshot written by :func:`save_snapshot` (a path or a URI).

    Raises:
        FileNotFoundError: no file at ``location``.
        ValueError: the file is not a snapshot, is of an unknown version, holds anything but
            tensors and plain data (e.g. pickled code), or is damaged (its content does not
            match its checksum).
    """
    location = storage.normalized(location)
    if not storage.is_file(location):
        raise FileNotFoundError(f"no snapshot file at {location}")
    with storage.local_copy(location) as path:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file fails anywhere in the unpickler
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{location} is not a readable snapshot: {first_line}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{location} is not a recoder_dist snapshot")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{location} is snapshot format version {payload.get('version')}; "
            f"this recoder_dist reads version {VERSION}"
        )
    verify(payload, location)
    fields = set(Snapshot.__dataclass_fields__)
    return Snapshot(**{k: v for k, v in payload.items() if k in fields})
