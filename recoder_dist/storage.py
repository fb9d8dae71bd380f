"""Where runs, snapshots and data live: a local (or NFS) path, or a URI that every node of a
cluster reaches (``s3://bucket/prefix``, ``gs://bucket/prefix``).

URIs go through pyarrow's filesystems, so S3-compatible stores work with an endpoint override,
as Ray Train accepts them too: ``s3://bucket/runs?endpoint_override=host:port&scheme=http``.
Credentials come from each node's environment (on AWS, the instance profile), never from the
driver.

Files on a URI (``exists``, ``upload``, ``local_copy``, ``copy``, ``write_atomically``, and Ray
Train's checkpoints through ``retrying_filesystem``) outlast a storage outage: each call is
retried with backoff for ``recoder_dist.retry.RETRY_SECONDS`` (120 s; the environment variable
``RECODER_DIST_STORAGE_RETRY_S`` overrides it), then fails with one error naming the URI. Data
read by Ray Data's readers (``filesystem``, ``for_ray_data``) is not: its tasks are retried by
Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from recoder_dist.retry import with_retries
from recoder_dist.retrying_fs import put_whole
from recoder_dist.retrying_fs import retrying_filesystem as _retrying


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names remote storage (``scheme://``, other than ``file://``)."""
    scheme = urlsplit(os.fspath(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def normalized(location: str | os.PathLike) -> str:
    """A URI as it is, a local path made absolute (a ``file://`` URI becomes its path)."""
    location = os.fspath(location)
    if is_uri(location):
        return location
    if location.startswith("file://"):
        location = urlsplit(location).path
    return os.path.abspath(location)


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path; a URI keeps its query (endpoint
    override, scheme) at the end."""
    location = normalized(location)
    if not is_uri(location):
        return os.path.join(location, *parts)
    split = urlsplit(location)
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit(split._replace(path=path))


def parent(location: str | os.PathLike) -> str:
    """The folder holding ``location`` (a URI keeps its query)."""
    location = normalized(location)
    if not is_uri(location):
        return os.path.dirname(location)
    split = urlsplit(location)
    return urlunsplit(split._replace(path=split.path.rstrip("/").rsplit("/", 1)[0]))


def suffixed(location: str | os.PathLike, suffix: str) -> str:
    """``location`` with ``suffix`` appended to its last path component (before a URI's
    query): ``suffixed("s3://b/run/model?scheme=http", "_epoch_3.model")`` is
    ``s3://b/run/model_epoch_3.model?scheme=http``."""
    location = normalized(location)
    if not is_uri(location):
        return location + suffix
    split = urlsplit(location)
    return urlunsplit(split._replace(path=split.path + suffix))


def with_path(location: str | os.PathLike, fs_path: str) -> str:
    """The location of ``fs_path``, a path within ``location``'s filesystem (as pyarrow and Ray
    give them: ``bucket/key`` for S3), with ``location``'s scheme and query."""
    location = normalized(location)
    if not is_uri(location):
        return fs_path
    split = urlsplit(location)
    bucket, _, key = fs_path.partition("/")
    return urlunsplit(split._replace(netloc=bucket, path="/" + key))


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path within it.

    Raises:
        ValueError: a URI that pyarrow cannot open (unknown scheme, malformed query).
    """
    location = normalized(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot open {location}: {e}") from None


def retrying_filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """As :func:`filesystem`, with a URI's filesystem retried through outages (see
    :mod:`recoder_dist.retrying_fs`): for checkpoints and snapshots, whose files go whole.

    Raises:
        ValueError: a URI that pyarrow cannot open (unknown scheme, malformed query).
    """
    fs, path = filesystem(location)
    if is_uri(location):
        fs = _retrying(normalized(location))
    return fs, path


def for_ray_data(locations: list[str]) -> tuple[pafs.FileSystem | None, list[str]]:
    """The ``filesystem`` and paths to give Ray Data's readers for files at ``locations``
    (URIs of one filesystem, or local paths). Ray resolves a list of URIs by the first one's
    filesystem and strips the scheme off the others but not their query
    (``?endpoint_override=...``), which then names no object: so the paths go as paths."""
    if not locations or not is_uri(locations[0]):
        return None, list(locations)
    fs = filesystem(locations[0])[0]
    return fs, [filesystem(location)[1] for location in locations]


def exists(location: str | os.PathLike) -> bool:
    fs, path = retrying_filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    fs, path = retrying_filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def delete(location: str | os.PathLike) -> None:
    """Deletes the file at ``location``; nothing there is not an error."""
    fs, path = retrying_filesystem(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def write_atomically(location: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
    """``write(file)`` to ``location`` so that a reader never sees half a file, and a crash
    leaves the old file (or none).

    Local: a temporary file beside it, fsync, then a rename over it. Object stores have no
    rename, but an object appears only when its upload completes: the file is written locally
    first, then uploaded in one stream.
    """
    location = normalized(location)
    if not is_uri(location):
        return _write_local_atomically(location, write)
    with tempfile.TemporaryDirectory(prefix="recoder-dist-upload-") as folder:
        local = os.path.join(folder, "file")
        with open(local, "wb") as f:
            write(f)
        upload(local, location)
    return location


def upload(local_path: str, location: str | os.PathLike) -> None:
    """Copies the local file ``local_path`` to ``location`` (atomically, see above)."""
    location = normalized(location)
    if not is_uri(location):
        _write_local_atomically(location, lambda f: _copy_from(local_path, f))
        return
    fs, path = filesystem(location)
    with open(local_path, "rb") as src:  # retried whole: see put_whole
        with_retries(lambda: put_whole(fs, path, src), location, "upload")


@contextlib.contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[str]:
    """A local path holding the file at ``location``: the file itself when local, otherwise a
    downloaded copy that is deleted when the block ends.

    Raises:
        FileNotFoundError: no file at ``location``.
    """
    location = normalized(location)
    if not is_file(location):
        raise FileNotFoundError(f"no file at {location}")
    if not is_uri(location):
        yield location
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory(prefix="recoder-dist-download-") as folder:
        local = os.path.join(folder, os.path.basename(path) or "file")

        def get():  # again from the start at each try
            with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)

        with_retries(get, location, "download")
        yield local


def copy(source: str | os.PathLike, destination: str | os.PathLike) -> str:
    """Copies a file between any two locations, atomically at the destination. Within one
    object store (the same scheme and query: bucket to bucket on one endpoint) the store copies
    the object itself (S3's CopyObject: no bytes through this machine, and the new object
    appears whole); otherwise through a local file.

    Raises:
        FileNotFoundError: no file at ``source``.
    """
    source, destination = normalized(source), normalized(destination)
    if _one_store(source, destination):
        if not is_file(source):
            raise FileNotFoundError(f"no file at {source}")
        fs, path = retrying_filesystem(source)
        fs.copy_file(path, filesystem(destination)[1])
        return destination
    with local_copy(source) as local:
        upload(local, destination)
    return destination


def _one_store(a: str, b: str) -> bool:
    if not (is_uri(a) and is_uri(b)):
        return False
    a, b = urlsplit(a), urlsplit(b)
    return a.scheme == b.scheme and a.query == b.query


def _write_local_atomically(path: str, write: Callable[[BinaryIO], None]) -> str:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".recoder-dist-", suffix=".tmp")
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


def _copy_from(local_path: str, destination: BinaryIO) -> None:
    with open(local_path, "rb") as src:
        shutil.copyfileobj(src, destination, length=1 << 22)
