"""Fetching public datasets into a cache folder, verified by SHA-256."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$RECODER_DIST_CACHE``, else ``$XDG_CACHE_HOME/recoder_dist``, else ``~/.cache/...``."""
    if os.environ.get("RECODER_DIST_CACHE"):
        return Path(os.environ["RECODER_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recoder_dist"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | os.PathLike, sha256: str) -> Path:
    """Returns ``path`` if its SHA-256 is ``sha256``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file differs (corrupt, truncated or another version).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    actual = sha256_of(path)
    if actual != sha256.lower():
        raise ValueError(f"{path} has SHA-256 {actual}, expected {sha256}: corrupt or truncated")
    return path


def require_digest(sha256: str | None, what: str) -> str:
    """``sha256`` as a lowercase hex digest; refuses a missing or malformed one.

    Downloads are never trusted without a pinned digest: where none is known for a file, the
    caller must pass one (for example the digest of a copy checked by other means).
    """
    if not sha256:
        raise ValueError(
            f"no SHA-256 is pinned for {what}: pass sha256=<hex digest of the file you trust>; "
            "downloads are never used unverified"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()


def fetch_file(url: str, sha256: str | None, target: str | os.PathLike) -> Path:
    """Downloads ``url`` to ``target`` (once) and returns it, checked by SHA-256.

    A cached ``target`` with the right digest is returned without any network access; one with
    another digest is downloaded again. Nothing is left at ``target`` when the download's digest
    differs.

    Raises:
        ValueError: no digest given, or the download's digest differs.
    """
    sha256 = require_digest(sha256, url)
    target = Path(target)
    if _cached(target, sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        download = _download(url, Path(tmp) / "download")
        _verify_download(download, sha256, url)
        os.replace(download, target)
    return target


def fetch_zip_member(
    url: str, member: str, sha256: str | None, folder: str | os.PathLike | None = None
) -> Path:
    """Downloads the zip at ``url`` (once) and returns its ``member``, checked by SHA-256.

    The member is extracted to ``folder / member`` (default folder: :func:`cache_dir`); a cached
    copy with the right digest is returned without any network access, one whose digest no
    longer matches is downloaded again.

    Raises:
        ValueError: no digest given, the download is not a zip holding ``member``, or the
            member's digest differs.
    """
    sha256 = require_digest(sha256, f"{member} of {url}")
    folder = Path(folder or cache_dir())
    target = folder / member
    if _cached(target, sha256):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = _download(url, Path(tmp) / "download.zip")
        try:
            with zipfile.ZipFile(archive) as zf:
                extracted = Path(zf.extract(member, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{url} is not a zip holding {member}: {e}") from None
        _verify_download(extracted, sha256, f"{member} of {url}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, target)
    return target


def _cached(target: Path, sha256: str) -> bool:
    if not target.is_file():
        return False
    if sha256_of(target) == sha256:
        return True
    logger.warning("%s has another SHA-256 than expected: downloading it again", target)
    return False


def _verify_download(path: Path, sha256: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != sha256:
        raise ValueError(f"refused {what}: its SHA-256 is {actual}, expected {sha256}")


def _download(url: str, path: Path) -> Path:
    logger.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    return path
