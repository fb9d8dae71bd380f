"""Fetching public datasets into a cache folder, verified by SHA-256."""

from __future__ import annotations

import hashlib
import logging
import os
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
    if actual != sha256:
        raise ValueError(f"{path} has SHA-256 {actual}, expected {sha256}: corrupt or truncated")
    return path


def fetch_zip_member(url: str, member: str, sha256: str, folder: Path | None = None) -> Path:
    """Downloads the zip at ``url`` (once) and returns its ``member``, checked by SHA-256.

    The member is extracted next to the cache's other files; a cached copy whose checksum
    no longer matches is downloaded again.
    """
    folder = Path(folder or cache_dir())
    target = folder / member
    if target.is_file() and sha256_of(target) == sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s", url)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = Path(tmp) / "download.zip"
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        try:
            with zipfile.ZipFile(archive) as zf:
                extracted = Path(zf.extract(member, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{url} is not a zip holding {member}: {e}") from None
        verify(extracted, sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(extracted, target)
    return target
