"""Snapshot files: the model's hyper-parameters and weights, optimizer states and epoch.

Written atomically (see :func:`recoder_dist.storage.write_atomically`: a crash mid-write leaves
the previous file intact) to a path or a URI, with a checksum of the content
(:mod:`recoder_dist.checksum`), and read with ``torch.load(weights_only=True)``, which refuses
pickled code; the reader verifies the checksum.
"""

from __future__ import annotations

import glob
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


def snapshot_prefix(prefix: str | os.PathLike) -> str:
    """``prefix`` normalized (``storage.normalized``), keeping a final separator: snapshots are
    named by appending to it (``epoch_file``), as recsys-recoder 0.4.0 names them, so that
    ``"models/"`` names files in the folder ``models``."""
    text = os.fspath(prefix)
    normal = storage.normalized(text)
    if not storage.is_uri(normal) and text.endswith(("/", os.sep)):
        return os.path.join(normal, "")
    return normal


def epoch_file(prefix: str | os.PathLike, epoch: int) -> str:
    """The snapshot of ``epoch`` under ``prefix``: ``{prefix}_epoch_{epoch}.model``."""
    prefix = snapshot_prefix(prefix)
    name = f"_epoch_{epoch}.model"
    return prefix + name if prefix.endswith(os.sep) else storage.suffixed(prefix, name)


def _unreadable(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a line (torch's own advice,
    to load it with ``weights_only=False``, would run whatever code the file holds)."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        return "it holds objects other than tensors and plain data: not a recoder_dist file"
    first = text.splitlines()[0] if text else ""
    return f"not a torch file ({type(error).__name__}: {first})"


def _what_is_there(location: str) -> str:
    """For a local snapshot path that is not a file: a folder, or the prefix of snapshots
    (``train``'s ``model_checkpoint_prefix`` given in place of one of its files)."""
    if storage.is_uri(location):
        return ""
    if os.path.isdir(location):
        return ": it is a folder"
    found = sorted(glob.glob(glob.escape(location) + "_epoch_*.model"))
    if found:
        return f" (files under that prefix: {', '.join(os.path.basename(f) for f in found)})"
    return ""


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
        raise FileNotFoundError(f"no snapshot file at {location}{_what_is_there(location)}")
    with storage.local_copy(location) as path:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file fails anywhere in the unpickler
            raise ValueError(f"{location} is not a readable snapshot: {_unreadable(e)}") from None
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
