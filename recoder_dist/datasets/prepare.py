"""From an event table to evaluation splits on disk: Parquet user rows and JSON id maps.

``prepare`` binarizes the events (optionally keeping only values above a threshold, as
Mult-VAE keeps ratings > 3.5), keeps users with at least ``min_items`` items, maps ids to
``0..n-1`` in sorted order (so the result depends on the set of events, not on their order),
splits, and writes::

    train-T-00000.parquet ...        the training users' rows
    validation-T-00000.parquet ...   validation users: input and target items (if any)
    test-T-00000.parquet ...         test users: input and target items
    user_id_map-T.json  item_id_map-T.json
    split.json

(``T`` a token of the write). The Parquet files are ``parquet_rows``' user rows, which the
cluster reads (:func:`open_prepared` and ``Recoder.train``); an evaluation part holds the users
that have target items. ``split.json``, written last and atomically, lists the files and records
the configuration and sizes; :func:`load_prepared` reads everything into memory.

``prepare`` holds the events in this process; ``prepare_on_cluster`` (``cluster_prepare``)
builds the same files from event tables that the cluster reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recoder_dist import storage
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.data.parquet_rows import UserRowFiles, write_user_rows
from recoder_dist.data.ray_dataset import user_rows_table
from recoder_dist.datasets.splits import (
    StrongSplit,
    WeakSplit,
    strong_generalization_split,
    weak_generalization_split,
)
from recoder_dist.utils import dataframe_to_csr_matrix, load_id_map, save_id_map

_FORMAT = "recoder_dist.prepared"
_VERSION = 2


@dataclass(frozen=True)
class StrongSplitConfig:
    """Mult-VAE's held-out users: ``num_val_users`` and ``num_test_users`` users whose items are
    split ``1 - target_fraction`` / ``target_fraction`` into input and target.
    ``drop_unseen_items`` removes items that no training user has (from the held-out users'
    items, before their split, and from the columns)."""

    num_val_users: int
    num_test_users: int
    target_fraction: float = 0.2
    min_items: int = 5
    seed: int = 0
    drop_unseen_items: bool = True

    kind = "strong"


@dataclass(frozen=True)
class WeakSplitConfig:
    """Held-out items of every user: ``target_fraction`` of each user's items are test items,
    ``val_fraction`` validation items, the rest training items."""

    target_fraction: float = 0.2
    val_fraction: float = 0.0
    min_items: int = 5
    seed: int = 0

    kind = "weak"


@dataclass(frozen=True)
class Prepared:
    """A split and the maps from the original ids to its rows and columns."""

    split: StrongSplit | WeakSplit
    user_id_map: dict
    item_id_map: dict


_CONFIGS = {config.kind: config for config in (StrongSplitConfig, WeakSplitConfig)}


def prepare(
    events: pd.DataFrame,
    out_dir: str | os.PathLike,
    split: StrongSplitConfig | WeakSplitConfig,
    *,
    positive_above: float | None = None,
) -> Prepared:
    """Builds the split of ``events`` and writes it to ``out_dir``.

    Args:
        events: columns ``user``, ``item``, ``value`` (what the loaders return).
        out_dir: the folder to write (created if needed; files of an earlier split replaced).
        split: a :class:`StrongSplitConfig` or a :class:`WeakSplitConfig`.
        positive_above: keep only events whose value is above this (3.5 for MovieLens
            ratings, as Mult-VAE); None keeps every event. Kept events become 1.

    Returns:
        What was written, as :func:`load_prepared` reads it back.
    """
    if type(split) not in _CONFIGS.values():
        raise TypeError(f"split must be a StrongSplitConfig or WeakSplitConfig, got {split!r}")
    missing = {"user", "item", "value"} - set(events.columns)
    if missing:
        raise ValueError(f"events lack the columns {sorted(missing)} (have {list(events.columns)})")
    matrix, item_id_map, user_id_map = _binary_matrix(events, positive_above, split.min_items)

    if isinstance(split, StrongSplitConfig):
        result = strong_generalization_split(
            matrix,
            num_val_users=split.num_val_users,
            num_test_users=split.num_test_users,
            target_fraction=split.target_fraction,
            min_items=split.min_items,
            seed=split.seed,
            drop_unseen_items=split.drop_unseen_items,
        )
        if split.drop_unseen_items:
            result, item_id_map = _training_items_only(result, item_id_map)
    else:
        result = weak_generalization_split(
            matrix,
            target_fraction=split.target_fraction,
            val_fraction=split.val_fraction,
            min_items=split.min_items,
            seed=split.seed,
        )
    _write(storage.normalized(out_dir), split, positive_above, result, user_id_map, item_id_map)
    return Prepared(result, user_id_map, item_id_map)


@dataclass(frozen=True)
class PreparedFiles:
    """What ``split.json`` says of a prepared split: its parts as Parquet user rows (read by
    the cluster), and where the id maps are. Nothing else is read."""

    location: str
    meta: dict
    train: UserRowFiles
    validation: UserRowFiles | None
    test: UserRowFiles

    def id_map_path(self, kind: str) -> str:
        return storage.join(self.location, self.meta["id_maps"][kind])


def open_prepared(location: str | os.PathLike) -> PreparedFiles:
    """Reads the ``split.json`` of a split written by :func:`prepare` (a folder or a URI).

    Raises:
        FileNotFoundError: no ``split.json`` there.
        ValueError: it was not written by this version of ``prepare``.
    """
    location = storage.normalized(location)
    meta_path = storage.join(location, "split.json")
    if not storage.is_file(meta_path):
        raise FileNotFoundError(f"{location} holds no split.json: not written by prepare")
    with storage.local_copy(meta_path) as local:
        try:
            meta = json.loads(Path(local).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{meta_path} was not written by prepare")
    if meta.get("version") != _VERSION:
        raise ValueError(
            f"{meta_path} is of version {meta.get('version')} of prepare's format (this "
            f"version reads {_VERSION}, user rows in Parquet): run prepare again"
        )
    parts = {
        name: None if described is None else UserRowFiles.described(location, described)
        for name, described in meta["parts"].items()
    }
    return PreparedFiles(location, meta, parts["train"], parts["validation"], parts["test"])


def load_prepared(location: str | os.PathLike) -> Prepared:
    """Reads a split written by :func:`prepare` into memory, from a folder or a URI."""
    files = open_prepared(location)
    parts = {
        name: None if part is None else part.to_dataset()
        for name, part in (
            ("train", files.train),
            ("validation", files.validation),
            ("test", files.test),
        )
    }
    split = StrongSplit(**parts) if files.meta["split"] == "strong" else WeakSplit(**parts)
    maps = {}
    for kind in ("user", "item"):
        with storage.local_copy(files.id_map_path(kind)) as local:
            maps[kind] = load_id_map(local)
    if (len(maps["user"]), len(maps["item"])) != (files.train.num_users, files.train.num_items):
        raise ValueError(f"{files.location}: the id maps do not match the user rows' sizes")
    return Prepared(split, maps["user"], maps["item"])


def _binary_matrix(events: pd.DataFrame, positive_above, min_items: int):
    positives = events if positive_above is None else events[events["value"] > positive_above]
    pairs = positives[["user", "item"]].drop_duplicates()
    per_user = pairs["user"].map(pairs["user"].value_counts())
    pairs = pairs[per_user.to_numpy() >= min_items].sort_values(["user", "item"])
    if pairs.empty:
        raise ValueError(f"no user has {min_items} or more positive events")
    return dataframe_to_csr_matrix(pairs.assign(value=1.0), "user", "item", "value")


def _training_items_only(split: StrongSplit, item_id_map: dict):
    """The split restricted to the columns of items that training users have."""
    seen = np.flatnonzero(split.train.interactions.getnnz(axis=0))
    ids = [None] * len(item_id_map)
    for raw, index in item_id_map.items():
        ids[index] = raw

    def columns(dataset: RecommendationDataset) -> RecommendationDataset:
        target = None if dataset.target is None else dataset.target[:, seen]
        return RecommendationDataset(dataset.interactions[:, seen], target)

    compact = StrongSplit(*(columns(part) for part in (split.train, split.validation, split.test)))
    return compact, {ids[index]: new for new, index in enumerate(seen)}


def _write(location: str, config, positive_above, split, user_id_map, item_id_map) -> None:
    def write_files(local: str, token: str) -> dict:
        parts = {}
        for name, part in (
            ("train", split.train),
            ("validation", split.validation),
            ("test", split.test),
        ):
            if part is None:
                parts[name] = None
                continue
            users = part.users if part.target is None else _target_users(part)
            table = user_rows_table(part, users)
            parts[name] = write_user_rows(table, local, f"{name}-{token}", part).description()
        id_maps = write_id_maps(local, token, user_id_map, item_id_map)
        return dict(
            has_validation=split.validation is not None,
            num_users=len(user_id_map),
            num_items=len(item_id_map),
            train_users=len(split.train),
            test_users=len(split.test),
            parts=parts,
            id_maps=id_maps,
        )

    publish(location, config, positive_above, write_files)


def write_id_maps(local: str, token: str, user_id_map: dict, item_id_map: dict) -> dict:
    """Writes the id maps (JSON) into ``local``; returns ``split.json``'s ``id_maps``."""
    names = {kind: f"{kind}_id_map-{token}.json" for kind in ("user", "item")}
    save_id_map(os.path.join(local, names["user"]), user_id_map)
    save_id_map(os.path.join(local, names["item"]), item_id_map)
    return names


def publish(location: str, config, positive_above, write_files) -> None:
    """Writes a split's files under names of their own (a fresh token), then ``split.json`` in
    one atomic write, then deletes the files of the split it replaces: a reader sees the old
    split or the new one, and a failure halfway loses nothing already there.

    ``write_files(local_folder, token)`` writes the part and id map files into a local folder
    and returns what ``split.json`` says of them: the counts, ``parts`` and ``id_maps``."""
    token = uuid.uuid4().hex[:8]
    previous = _listed_files(location)
    with tempfile.TemporaryDirectory(prefix="recoder-dist-prepare-") as local:
        described = write_files(local, token)
        if not storage.is_uri(location):
            os.makedirs(location, exist_ok=True)
        for name in sorted(os.listdir(local)):
            storage.upload(os.path.join(local, name), storage.join(location, name))
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "split": config.kind,
        "config": dataclasses.asdict(config),
        "positive_above": positive_above,
        **described,
    }
    text = json.dumps(meta, indent=1) + "\n"
    storage.write_atomically(storage.join(location, "split.json"), lambda f: f.write(text.encode()))
    for name in previous - _listed_files(location):
        storage.delete(storage.join(location, name))


def _target_users(part: RecommendationDataset):
    """The users that an evaluation part holds: those with target items."""
    return np.flatnonzero(np.diff(part.target.indptr))


def _listed_files(location: str) -> set[str]:
    """The files that the split at ``location`` consists of (none if there is none, or an
    earlier version's, whose files are left alone)."""
    try:
        files = open_prepared(location)
    except (FileNotFoundError, ValueError):
        return set()
    names = set(files.meta["id_maps"].values())
    for part in (files.train, files.validation, files.test):
        if part is not None:
            names.update(part.files)
    return names
