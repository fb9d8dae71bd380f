"""MovieLens ratings: 100K (``u.data``), 1M (``ratings.dat``), 20M, 25M and latest
(``ratings.csv``), read from a local folder or downloaded once into the cache folder.

Every loader returns a DataFrame with columns ``user``, ``item``, ``value`` (the rating),
``rating`` and ``timestamp``, one row per rating, ids as in the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recoder_dist.datasets._parsing import check_count, read_delimited
from recoder_dist.datasets.download import Digest, DownloadError, fetch_zip_member, verify

_COLUMNS = {"user": "id", "item": "id", "rating": "float", "timestamp": "int"}


def read_ml100k_ratings(path: str | os.PathLike) -> pd.DataFrame:
    """``u.data``: ``user \\t item \\t rating \\t timestamp``, no header."""
    return _frame(read_delimited(path, sep="\t", columns=_COLUMNS))


def read_ml1m_ratings(path: str | os.PathLike) -> pd.DataFrame:
    """``ratings.dat`` of MovieLens 1M (and 10M): ``user::item::rating::timestamp``."""
    return _frame(read_delimited(path, sep="::", columns=_COLUMNS))


def read_ratings_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``ratings.csv`` of MovieLens 20M, 25M, 32M, latest and latest-small:
    ``userId,movieId,rating,timestamp`` with that header."""
    header = ("userId", "movieId", "rating", "timestamp")
    return _frame(read_delimited(path, sep=",", columns=_COLUMNS, header=header))


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    rating = df["rating"].to_numpy(dtype=np.float32)
    return pd.DataFrame(
        {
            "user": df["user"].to_numpy(np.int64),
            "item": df["item"].to_numpy(np.int64),
            "value": rating,
            "rating": rating.copy(),
            "timestamp": df["timestamp"].to_numpy(np.int64),
        }
    )


@dataclass(frozen=True)
class MovieLensRelease:
    """Where a release's ratings are, how to read them, and how to recognize them.

    Attributes:
        url: the official zip.
        member: the ratings file inside the zip.
        sha256: digest of ``member``; None where we know none. It also checks a local copy.
        num_ratings: the number of ratings GroupLens publishes; None for releases that change.
        read: the parser of ``member``.
        archive_digest: digest of the zip as GroupLens publishes it (MD5); None where none is
            published. A download needs this or ``sha256``.
    """

    url: str
    member: str
    sha256: str | None
    num_ratings: int | None
    read: Callable[[str | os.PathLike], pd.DataFrame]
    archive_digest: Digest | None = None


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"

# Digests: ml-100k's u.data and ml-latest-small's ratings.csv are those of the copies in
# ../shared/data, which are the official files (ml-latest-small of 2018-09-26, unchanged since).
# ml-1m, ml-20m and ml-25m: the MD5 that GroupLens publishes for each zip; there is no trusted
# copy of their ratings files to take a SHA-256 from, so a local copy (data_dir) is checked by
# its number of ratings only. ml-latest: none, GroupLens regenerates it over time, so a download
# needs sha256=...
RELEASES: dict[str, MovieLensRelease] = {
    "ml-100k": MovieLensRelease(
        f"{_GROUPLENS}/ml-100k.zip",
        "ml-100k/u.data",
        "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        100_000,
        read_ml100k_ratings,
    ),
    "ml-1m": MovieLensRelease(
        f"{_GROUPLENS}/ml-1m.zip",
        "ml-1m/ratings.dat",
        None,
        1_000_209,
        read_ml1m_ratings,
        archive_digest=Digest("md5", "c4d9eecfca2ab87c1945afe126590906"),
    ),
    "ml-20m": MovieLensRelease(
        f"{_GROUPLENS}/ml-20m.zip",
        "ml-20m/ratings.csv",
        None,
        20_000_263,
        read_ratings_csv,
        archive_digest=Digest("md5", "cd245b17a1ae2cc31bb14903e1204af3"),
    ),
    "ml-25m": MovieLensRelease(
        f"{_GROUPLENS}/ml-25m.zip",
        "ml-25m/ratings.csv",
        None,
        25_000_095,
        read_ratings_csv,
        archive_digest=Digest("md5", "6b51fb2759a8657d3bfcbfc42b592ada"),
    ),
    "ml-latest-small": MovieLensRelease(
        f"{_GROUPLENS}/ml-latest-small.zip",
        "ml-latest-small/ratings.csv",
        "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
        100_836,
        read_ratings_csv,
    ),
    "ml-latest": MovieLensRelease(
        f"{_GROUPLENS}/ml-latest.zip", "ml-latest/ratings.csv", None, None, read_ratings_csv
    ),
}

ML100K_URL = RELEASES["ml-100k"].url
ML100K_RATINGS_SHA256 = RELEASES["ml-100k"].sha256
DATA_DIR_ENV = "RECODER_DIST_ML100K"


def movielens_ratings_path(
    name: str, data_dir: str | os.PathLike | None = None, *, sha256: str | None = None
) -> Path:
    """The ratings file of release ``name``, verified by its digests where they are known.

    Args:
        name: a key of :data:`RELEASES` (``"ml-100k"``, ``"ml-1m"``, ``"ml-20m"``, ...).
        data_dir: a folder holding the ratings file (``u.data``, ``ratings.dat`` or
            ``ratings.csv``); when None, the official zip is downloaded once into the cache
            and checked by the pinned digest of the zip or of the ratings file.
        sha256: the SHA-256 of the ratings file to check instead of the pinned one; required to
            download a release with no pinned digest (``ml-latest``).

    Raises:
        ValueError: an unknown release, no digest to check a download by, or a digest that
            differs.
        FileNotFoundError: no ratings file in ``data_dir``.
        DownloadError: the download failed; its message says to pass ``data_dir`` instead.
    """
    if name not in RELEASES:
        raise ValueError(f"unknown MovieLens release {name!r}; known: {sorted(RELEASES)}")
    release = RELEASES[name]
    digest = sha256 or release.sha256
    if data_dir is None:
        return fetch_zip_member(
            release.url,
            release.member,
            digest,
            archive_digest=release.archive_digest,
            fix=_offline_fix(release),
        )
    path = Path(data_dir) / Path(release.member).name
    if digest:
        return verify(path, digest)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return path


def load_movielens(
    name: str, data_dir: str | os.PathLike | None = None, *, sha256: str | None = None
) -> pd.DataFrame:
    """Ratings of a MovieLens release: columns user, item, value, rating, timestamp.

    See :func:`movielens_ratings_path` for the arguments. Without a digest, a truncated local
    file is still caught by the published number of ratings (except for ``ml-latest``).

    Raises:
        ValueError: a malformed line (named), a digest or a number of ratings that differs.
        DownloadError: the download failed (no network).
    """
    return _read(name, movielens_ratings_path(name, data_dir, sha256=sha256))


def ml100k_ratings_path(data_dir: str | os.PathLike | None = None) -> Path:
    """``u.data`` of MovieLens 100K, verified by SHA-256.

    Args:
        data_dir: a folder holding ``u.data`` (default ``$RECODER_DIST_ML100K``); when neither
            is set, the official zip is downloaded once into the cache folder.

    Raises:
        DownloadError: the download failed; its message names both ways to give a local copy.
    """
    try:
        return movielens_ratings_path("ml-100k", data_dir or os.environ.get(DATA_DIR_ENV) or None)
    except DownloadError as e:
        fix = _offline_fix(RELEASES["ml-100k"], f" or set {DATA_DIR_ENV}=DIR")
        raise DownloadError(e.url, e.reason, fix) from None


def load_ml100k(data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Ratings of MovieLens 100K (100,000 rows); ``data_dir`` as in :func:`ml100k_ratings_path`."""
    return _read("ml-100k", ml100k_ratings_path(data_dir))


def _read(name: str, path: Path) -> pd.DataFrame:
    ratings = RELEASES[name].read(path)
    check_count(path, "ratings", len(ratings), RELEASES[name].num_ratings)
    return ratings


def _offline_fix(release: MovieLensRelease, alternative: str = "") -> str:
    # Worded for both the command line and Python, which name the same setting differently.
    return (
        f"without a network, unzip a copy fetched elsewhere and pass the folder holding "
        f"{Path(release.member).name} as --data-dir DIR{alternative} (data_dir= in Python)"
    )
