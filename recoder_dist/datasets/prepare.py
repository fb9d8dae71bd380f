"""From an event table to evaluation splits on disk: ``.npz`` matrices and JSON id maps.

``prepare`` binarizes the events (optionally keeping only values above a threshold, as
Mult-VAE keeps ratings > 3.5), keeps users with at least ``min_items`` items, maps ids to
``0..n-1`` in sorted order (so the result depends on the set of events, not on their order),
splits, and writes::

    train.npz  val_input.npz  val_target.npz  test_input.npz  test_target.npz
    user_id_map.json  item_id_map.json  split.json

(no ``val_*`` for a weak split without validation items). ``split.json`` is written last and
records the configuration and sizes; :func:`load_prepared` reads everything back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recoder_dist import storage
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.datasets.splits import (
    StrongSplit,
    WeakSplit,
    strong_generalization_split,
    weak_generalization_split,
)
from recoder_dist.utils import dataframe_to_csr_matrix, load_id_map, save_id_map

_FORMAT = "recoder_dist.prepared"


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
    if storage.is_uri(out_dir):
        # Written locally, then uploaded file by file, split.json (which marks it complete) last.
        with tempfile.TemporaryDirectory(prefix="recoder-dist-prepare-") as local:
            _write(Path(local), split, positive_above, result, user_id_map, item_id_map)
            names = sorted(os.listdir(local), key=lambda name: name == "split.json")
            for name in names:
                storage.upload(os.path.join(local, name), storage.join(out_dir, name))
    else:
        _write(Path(out_dir), split, positive_above, result, user_id_map, item_id_map)
    return Prepared(result, user_id_map, item_id_map)


def load_prepared(out_dir: str | os.PathLike) -> Prepared:
    """Reads a split written by :func:`prepare`, from a folder or a URI."""
    if storage.is_uri(out_dir):
        return _load_prepared_uri(storage.normalized(out_dir))
    out_dir = Path(out_dir)
    try:
        meta = json.loads((out_dir / "split.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{out_dir} holds no split.json: not written by prepare") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{out_dir / 'split.json'} was not written by prepare")
    user_id_map = load_id_map(out_dir / "user_id_map.json")
    item_id_map = load_id_map(out_dir / "item_id_map.json")

    def dataset(input_name, target_name=None):
        matrix = sp.load_npz(out_dir / f"{input_name}.npz")
        if matrix.shape != (len(user_id_map), len(item_id_map)):
            raise ValueError(f"{out_dir / input_name}.npz does not match the id maps' sizes")
        target = None if target_name is None else sp.load_npz(out_dir / f"{target_name}.npz")
        return RecommendationDataset(matrix, target)

    validation = dataset("val_input", "val_target") if meta["has_validation"] else None
    parts = {"train": dataset("train"), "validation": validation}
    parts["test"] = dataset("test_input", "test_target")
    split = StrongSplit(**parts) if meta["split"] == "strong" else WeakSplit(**parts)
    return Prepared(split, user_id_map, item_id_map)


def _load_prepared_uri(location: str) -> Prepared:
    """Downloads the split's files into a temporary folder and reads them there."""
    with tempfile.TemporaryDirectory(prefix="recoder-dist-prepared-") as local:
        for name in _FILES:
            source = storage.join(location, name)
            if name == "split.json" and not storage.is_file(source):
                raise FileNotFoundError(f"{location} holds no split.json: not written by prepare")
            if storage.is_file(source):
                with storage.local_copy(source) as path:
                    shutil.copyfile(path, os.path.join(local, name))
        return load_prepared(local)


_FILES = (
    "split.json",
    "user_id_map.json",
    "item_id_map.json",
    "train.npz",
    "val_input.npz",
    "val_target.npz",
    "test_input.npz",
    "test_target.npz",
)


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


def _write(out_dir: Path, config, positive_above, split, user_id_map, item_id_map) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "split.json").unlink(missing_ok=True)  # marks the folder incomplete until done
    for stale in ("val_input.npz", "val_target.npz"):
        (out_dir / stale).unlink(missing_ok=True)
    sp.save_npz(out_dir / "train.npz", split.train.interactions)
    for prefix, part in (("val", split.validation), ("test", split.test)):
        if part is not None:
            sp.save_npz(out_dir / f"{prefix}_input.npz", part.interactions)
            sp.save_npz(out_dir / f"{prefix}_target.npz", part.target)
    save_id_map(out_dir / "user_id_map.json", user_id_map)
    save_id_map(out_dir / "item_id_map.json", item_id_map)
    meta = {
        "format": _FORMAT,
        "version": 1,
        "split": config.kind,
        "config": dataclasses.asdict(config),
        "positive_above": positive_above,
        "has_validation": split.validation is not None,
        "num_users": len(user_id_map),
        "num_items": len(item_id_map),
        "train_users": len(split.train),
        "test_users": len(split.test),
    }
    (out_dir / "split.json").write_text(json.dumps(meta, indent=1) + "\n")
