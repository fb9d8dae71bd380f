"""A pyarrow filesystem over a URI's own (S3, GCS, ...) whose every call is retried through an
outage (:mod:`recoder_dist.retry`): given to Ray Train as the run's ``storage_filesystem``, it
carries Ray's own checkpoint uploads, its run-state writes and its downloads, as well as ours.

Files go whole, so that a retry repeats a whole transfer and never continues a broken one: a
file opened for writing is written to a local temporary file and uploaded when it is closed
(an object store shows an object only once its upload completes, so a reader sees the old
object, or none, until then); a file opened for reading is downloaded whole first.

The filesystem pickles as its URI alone: each process (each node) opens the store itself, with
its own credentials, as pyarrow's own S3 filesystem does.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pyarrow as pa
import pyarrow.fs as pafs

from recoder_dist.retry import with_retries

_CHUNK = 1 << 22


def retrying_filesystem(location: str) -> pafs.PyFileSystem:
    """The filesystem of the URI ``location`` (any path of it: the scheme and query count),
    retried. Paths within it are those of ``pafs.FileSystem.from_uri(location)``."""
    return pafs.PyFileSystem(RetryingHandler(location))


def _open_store(location: str) -> pafs.FileSystem:
    fs = pafs.FileSystem.from_uri(location)[0]
    if isinstance(fs, pafs.S3FileSystem):
        # Uploads in the calling thread, not in background tasks on Arrow's I/O pool: Ray
        # copies a checkpoint's files on that same pool (copy_files), and with as many files
        # as the pool has threads, every thread would wait in close() for a background upload
        # that no thread is left to run. The options are the filesystem's own (as it pickles).
        options = fs.__reduce__()[1][0]
        fs = pafs.S3FileSystem(**{**options, "background_writes": False})
    return fs


class RetryingHandler(pafs.FileSystemHandler):
    """The calls of :class:`pyarrow.fs.PyFileSystem`, each passed to the store's own filesystem
    and retried (see the module's docstring)."""

    def __init__(self, location: str):
        self.location = location
        self._fs = None

    def __reduce__(self):
        return type(self), (self.location,)

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = _open_store(self.location)
        return self._fs

    def _retried(self, what: str, path: str, call):
        return with_retries(call, self._uri(path), what)

    def _uri(self, path: str) -> str:
        from recoder_dist.storage import with_path  # storage imports this module

        return with_path(self.location, path)

    # --- FileSystemHandler ----------------------------------------------------------------

    def __eq__(self, other):
        return isinstance(other, RetryingHandler) and other.location == self.location

    def equals(self, other) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return f"retrying-{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        first = paths[0] if paths else ""
        return self._retried("get info of", first, lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retried("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._retried("create folder", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._retried("delete folder", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retried(
            "delete contents of",
            path,
            lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
        )

    def delete_root_dir_contents(self):
        raise OSError("recoder_dist never empties a whole store")

    def delete_file(self, path):
        self._retried("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._retried("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._retried("copy", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._downloaded(path)

    def open_input_file(self, path):
        return self._downloaded(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"{self._uri(path)}: object stores cannot append to an object")

    def _downloaded(self, path: str) -> pa.NativeFile:
        """The object at ``path``, downloaded whole (again from the start at each try) into an
        unnamed local file, opened for reading."""
        folder = tempfile.mkdtemp(prefix="recoder-dist-get-")
        local = os.path.join(folder, "object")

        def download():
            with self.fs.open_input_stream(path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, length=_CHUNK)

        try:
            self._retried("download", path, download)
            return pa.OSFile(local, mode="r")  # still readable once unlinked (POSIX)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


class _UploadOnClose:
    """A file-like object for ``pa.PythonFile``: writes go to a local temporary file, which
    ``close`` uploads whole (again from the start at each try)."""

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        self._handler, self._path, self._metadata = handler, path, metadata
        self._file = tempfile.TemporaryFile(prefix="recoder-dist-put-")  # noqa: SIM115 (closed in close)
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._handler._retried("upload", self._path, self._upload)
        finally:
            self._file.close()

    def _upload(self) -> None:
        put_whole(self._handler.fs, self._path, self._file, self._metadata)


def put_whole(fs: pafs.FileSystem, path: str, source, metadata=None) -> None:
    """Uploads the local file object ``source`` (from its start) to ``path`` of ``fs``, and
    checks the object's size: one try, for :func:`recoder_dist.retry.with_retries`.

    Raises:
        ConnectionError: the object is shorter or longer than the file (a transient error:
            uploaded again, it is replaced).
    """
    size = source.seek(0, os.SEEK_END)
    source.seek(0)
    with fs.open_output_stream(path, metadata=metadata) as dst:
        shutil.copyfileobj(source, dst, length=_CHUNK)
    # pyarrow's S3 stream has no abort: a stream closed after a failed part completes the
    # upload with the parts it has. Such an object differs in size from the file; uploaded
    # again, it is replaced (and a reader in between fails the checkpoint's checksum).
    stored = fs.get_file_info(path).size
    if stored != size:
        raise ConnectionError(f"uploaded {stored} bytes of {size}")
