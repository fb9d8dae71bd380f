"""Fetching public datasets into a cache folder, verified by a pinned digest.

A digest is SHA-256 unless the publisher gives only another one: GroupLens publishes the MD5 of
its MovieLens zips, which is then what the archive is checked against (:class:`Digest`).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_HEX_LENGTHS = {"sha256": 64, "md5": 32}


@dataclass(frozen=True)
class Digest:
    """The digest a file must have: ``algorithm`` (``"sha256"`` or ``"md5"``) and its hex value.

    MD5 is accepted only because some publishers (GroupLens) give nothing else; it still catches
    a truncated, corrupt or replaced download, which is what the check is for.

    Raises:
        ValueError: an unknown algorithm, or a value that is not that many hex digits.
    """

    algorithm: str
    hexdigest: str

    def __post_init__(self):
        if self.algorithm not in _HEX_LENGTHS:
            raise ValueError(
                f"unknown digest algorithm {self.algorithm!r}; known: {sorted(_HEX_LENGTHS)}"
            )
        length = _HEX_LENGTHS[self.algorithm]
        pattern = rf"[0-9a-fA-F]{{{length}}}"
        if not isinstance(self.hexdigest, str) or not re.fullmatch(pattern, self.hexdigest):
            raise ValueError(
                f"{self.algorithm} must be {length} hex digits, got {self.hexdigest!r}"
            )
        object.__setattr__(self, "hexdigest", self.hexdigest.lower())

    @property
    def name(self) -> str:
        """``"SHA-256"`` or ``"MD5"``, for messages."""
        return {"sha256": "SHA-256", "md5": "MD5"}[self.algorithm]

    def of(self, path: str | os.PathLike) -> str:
        """The hex digest of the file at ``path`` under this digest's algorithm."""
        return file_digest(path, self.algorithm)


class DownloadError(ConnectionError):
    """A download that failed before its digest could be checked: no network, DNS failure,
    timeout, refused connection or an HTTP error. The message names the URL and what to do
    instead (``fix``), since the usual cause is a machine without a network."""

    def __init__(self, url: str, reason: str, fix: str):
        super().__init__(f"could not download {url} ({reason}); {fix}")
        self.url, self.reason, self.fix = url, reason, fix


def cache_dir() -> Path:
    """``$RECODER_DIST_CACHE``, else ``$XDG_CACHE_HOME/recoder_dist``, else ``~/.cache/...``."""
    if os.environ.get("RECODER_DIST_CACHE"):
        return Path(os.environ["RECODER_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recoder_dist"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of the file at ``path`` (``algorithm``: ``"sha256"`` or ``"md5"``)."""
    if algorithm not in _HEX_LENGTHS:
        raise ValueError(f"unknown digest algorithm {algorithm!r}; known: {sorted(_HEX_LENGTHS)}")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def verify(path: str | os.PathLike, digest: str | Digest) -> Path:
    """Returns ``path`` if its digest is ``digest`` (a string is a SHA-256).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file differs (corrupt, truncated or another version).
    """
    digest = as_digest(digest)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    actual = digest.of(path)
    if actual != digest.hexdigest:
        raise ValueError(
            f"{path} has {digest.name} {actual}, expected {digest.hexdigest}: corrupt or truncated"
        )
    return path


def as_digest(digest: str | Digest) -> Digest:
    """``digest`` as a :class:`Digest`; a plain string is a SHA-256."""
    return digest if isinstance(digest, Digest) else Digest("sha256", digest)


def require_digest(digest: str | Digest | None, what: str) -> Digest:
    """``digest`` as a :class:`Digest`; refuses a missing or malformed one.

    Downloads are never trusted without a pinned digest: where none is known for a file, the
    caller must pass one (for example the digest of a copy checked by other means).
    """
    if not digest:
        raise ValueError(
            f"no digest is pinned for {what}: pass sha256=<hex digest of the file you trust>; "
            "downloads are never used unverified"
        )
    return as_digest(digest)


def fetch_file(
    url: str, sha256: str | Digest | None, target: str | os.PathLike, *, fix: str | None = None
) -> Path:
    """Downloads ``url`` to ``target`` (once) and returns it, checked by its digest.

    A cached ``target`` with the right digest is returned without any network access; one with
    another digest is downloaded again. The download goes to a temporary file beside ``target``
    and is renamed only once verified, so nothing is left at ``target`` when it fails.

    Args:
        url: where the file is.
        sha256: its digest (a string is a SHA-256).
        target: where to keep it.
        fix: what the user can do instead when the download fails (see :class:`DownloadError`).

    Raises:
        ValueError: no digest given, or the download's digest differs.
        DownloadError: the download failed (no network, timeout, HTTP error).
    """
    digest = require_digest(sha256, url)
    target = Path(target)
    if _cached(target, digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        download = _download(url, Path(tmp) / "download", fix or _default_fix(url))
        _verify_download(download, digest, f"{target.name} from {url}")
        os.replace(download, target)
    return target


def fetch_zip_member(
    url: str,
    member: str,
    sha256: str | Digest | None,
    folder: str | os.PathLike | None = None,
    *,
    archive_digest: Digest | None = None,
    fix: str | None = None,
) -> Path:
    """Downloads the zip at ``url`` (once) and returns its ``member``, checked by digest.

    The member is extracted to ``folder / member`` (default folder: :func:`cache_dir`); the zip
    is deleted. At least one digest is needed: ``sha256`` of the member, ``archive_digest`` of
    the zip, or both. Where only the zip's is known, the member's SHA-256 is recorded beside it
    (``member.sha256``) once the zip has passed its check, so that a later call recognizes a good
    cached copy. A cached copy with the right digest is returned without any network access, one
    whose digest no longer matches is downloaded again. No file is left in ``folder`` when a
    download fails or is refused.

    Args:
        url: the zip.
        member: the path of the wanted file inside the zip.
        sha256: digest of ``member`` (a string is a SHA-256), or None.
        folder: where to keep the member.
        archive_digest: digest of the zip as its publisher gives it, or None.
        fix: what the user can do instead when the download fails (see :class:`DownloadError`).

    Raises:
        ValueError: no digest given, the download is not a zip holding ``member``, or a digest
            (the zip's or the member's) differs.
        DownloadError: the download failed (no network, timeout, HTTP error).
    """
    what = f"{member} of {url}"
    digest = None if sha256 is None and archive_digest else require_digest(sha256, what)
    folder = Path(folder or cache_dir())
    target = folder / member
    record = target.with_name(target.name + ".sha256")
    if _cached(target, digest or _recorded(record)):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = _download(url, Path(tmp) / "download.zip", fix or _default_fix(url))
        if archive_digest is not None:
            _verify_download(archive, archive_digest, f"{Path(url).name} from {url}")
        try:
            with zipfile.ZipFile(archive) as zf:
                extracted = Path(zf.extract(member, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{url} is not a zip holding {member}: {e}") from None
        if digest is not None:
            _verify_download(extracted, digest, what)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, target)
        if digest is None:
            record.write_text(sha256_of(target) + "\n")
    return target


def _recorded(record: Path) -> Digest | None:
    """The SHA-256 written by :func:`fetch_zip_member`; None when absent or unreadable."""
    try:
        return Digest("sha256", record.read_text().strip())
    except (OSError, ValueError):
        return None


def _cached(target: Path, digest: Digest | None) -> bool:
    if digest is None or not target.is_file():
        return False
    if digest.of(target) == digest.hexdigest:
        return True
    logger.warning("%s has another %s than expected: downloading it again", target, digest.name)
    return False


def _verify_download(path: Path, digest: Digest, what: str) -> None:
    actual = digest.of(path)
    if actual != digest.hexdigest:
        raise ValueError(
            f"refused {what}: its {digest.name} is {actual}, expected {digest.hexdigest}"
        )


def _default_fix(url: str) -> str:
    return f"without a network, fetch {url} elsewhere and pass the folder holding it as data_dir"


# What a failed download raises: URLError (DNS failure, refused connection, HTTPError), socket
# errors and timeouts (OSError), a connection cut mid-response (http.client.HTTPException).
_NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


def _download(url: str, path: Path, fix: str) -> Path:
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except _NETWORK_ERRORS as e:
        raise DownloadError(url, _reason(e), fix) from None
    size = response.headers.get("Content-Length", "")
    logger.info("downloading %s%s", url, f" ({int(size) / 1e6:.1f} MB)" if size.isdigit() else "")
    # Only reading the response is guarded: an OSError writing the file (a full disk) is not a
    # network failure and keeps its own message.
    with response, open(path, "wb") as out:
        while True:
            try:
                chunk = response.read(1 << 20)
            except _NETWORK_ERRORS as e:
                raise DownloadError(url, _reason(e), fix) from None
            if not chunk:
                return path
            out.write(chunk)


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)  # URLError wraps the socket error in .reason
    if isinstance(error, urllib.error.HTTPError) or reason is None:
        reason = error
    return str(reason) or type(reason).__name__
