"""A checksum of a file's content (nested dicts and lists of tensors and plain values), stored
in the file beside it: ``torch.load`` reads a tensor whose bytes were altered without a word
(it checks no CRC), so snapshots and checkpoint shards carry one and their readers verify it.

The digest is of the content, not of the file's bytes: it is computed from the objects before
they are saved and from the objects as loaded (memory-mapped tensors are read once), so no
file is read twice and no second copy of a tensor is made.
"""

from __future__ import annotations

import hashlib

import torch

KEY = "checksum"


def content_digest(obj) -> str:
    """SHA-256 of ``obj``: dicts (in key order), lists and tuples, tensors (dtype, shape and
    bytes; a sparse one by its coalesced indices and values) and plain values (by ``repr``)."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def with_checksum(payload: dict) -> dict:
    """``payload`` with its digest under ``"checksum"``."""
    return {**payload, KEY: content_digest(payload)}


def verify(payload: dict, where: str) -> None:
    """Checks a loaded payload against its checksum (a payload without one, written before
    checksums, is taken as it is).

    Raises:
        ValueError: the content differs from what was written (``where`` names the file).
    """
    if KEY not in payload:
        return
    content = {key: value for key, value in payload.items() if key != KEY}
    if content_digest(content) != payload[KEY]:
        raise ValueError(f"{where} is damaged: its content does not match its checksum")


def _feed(digest, obj) -> None:
    if torch.is_tensor(obj):
        tensor = obj.detach().cpu()
        if tensor.is_sparse:
            tensor = tensor.coalesce()
            digest.update(b"sparse")
            _feed(digest, tensor.indices())
            _feed(digest, tensor.values())
            return
        tensor = tensor.contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)}".encode())
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)}".encode())
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"{type(obj).__name__} {obj!r}".encode())
