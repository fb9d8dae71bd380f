"""MovieLens 100K: the main job's default dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from recoder_dist.datasets.download import fetch_zip_member, verify

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_RATINGS_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
DATA_DIR_ENV = "RECODER_DIST_ML100K"


def ml100k_ratings_path(data_dir: str | os.PathLike | None = None) -> Path:
    """``u.data`` of MovieLens 100K, verified by SHA-256.

    Args:
        data_dir: a folder holding ``u.data`` (default ``$RECODER_DIST_ML100K``); when neither
            is set, the official zip is downloaded once into the cache folder.
    """
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if data_dir:
        return verify(Path(data_dir) / "u.data", ML100K_RATINGS_SHA256)
    return fetch_zip_member(ML100K_URL, "ml-100k/u.data", ML100K_RATINGS_SHA256)


def load_ml100k(data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Ratings of MovieLens 100K: columns user, item, rating, timestamp (100,000 rows)."""
    return pd.read_csv(
        ml100k_ratings_path(data_dir),
        sep="\t",
        names=["user", "item", "rating", "timestamp"],
        dtype={"user": "int64", "item": "int64", "rating": "float32", "timestamp": "int64"},
    )
