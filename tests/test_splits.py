"""Strong and weak generalization splits, and ``prepare``: disjoint users, exact fold-in
proportions per user, nothing lost or invented, seeds, and the files read back."""

from __future__ import annotations

import functools
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recoder_dist.datasets import (
    StrongSplitConfig,
    WeakSplitConfig,
    load_events,
    load_movielens,
    load_prepared,
    prepare,
    strong_generalization_split,
    weak_generalization_split,
)
from recoder_dist.utils import dataframe_to_csr_matrix
from tests.conftest import shared_data


@functools.cache
def ml1m_implicit() -> sp.csr_matrix:
    events = load_events(shared_data("ml-1m-implicit") / "interactions.csv")
    return dataframe_to_csr_matrix(events, "user", "item", "value")[0]


def entries(matrix) -> set:
    coo = sp.coo_matrix(matrix)
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def row_sets(matrix) -> dict:
    """user -> set of items, for the non-empty rows."""
    matrix = sp.csr_matrix(matrix)
    return {
        u: set(matrix.indices[matrix.indptr[u] : matrix.indptr[u + 1]].tolist())
        for u in np.flatnonzero(np.diff(matrix.indptr))
    }


def strong(seed=0, **kwargs):
    kwargs = {"num_val_users": 600, "num_test_users": 600, "seed": seed, **kwargs}
    return strong_generalization_split(ml1m_implicit(), **kwargs)


def test_strong_split_users_are_disjoint_and_nothing_is_lost():
    matrix = ml1m_implicit()
    split = strong()
    train = set(row_sets(split.train.interactions))
    val, test = set(row_sets(split.validation.interactions)), set(row_sets(split.test.interactions))
    assert len(val) == len(test) == 600
    assert not (train & val or train & test or val & test)
    assert (
        set(row_sets(split.validation.target)) <= val and set(row_sets(split.test.target)) <= test
    )
    # Every user of ml-1m-implicit has >= 5 items: all of them are somewhere.
    assert train | val | test == set(range(matrix.shape[0]))
    parts = [split.train.interactions, split.validation.interactions, split.validation.target]
    parts += [split.test.interactions, split.test.target]
    assert sum(p.nnz for p in parts) == matrix.nnz
    assert set().union(*map(entries, parts)) == entries(matrix)


def test_strong_split_fold_in_is_exact_per_user():
    matrix = row_sets(ml1m_implicit())
    split = strong()
    for part in (split.validation, split.test):
        inputs, targets = row_sets(part.interactions), row_sets(part.target)
        for user, given in inputs.items():
            held = targets.get(user, set())
            assert not given & held and given | held == matrix[user]
            assert len(held) == int(np.floor(0.2 * len(matrix[user])))


def test_strong_split_is_seeded():
    a, b, c = strong(seed=0), strong(seed=0), strong(seed=1)
    for part in ("train", "validation", "test"):
        assert (getattr(a, part).interactions != getattr(b, part).interactions).nnz == 0
    assert (a.test.target != b.test.target).nnz == 0
    assert set(row_sets(a.test.interactions)) != set(row_sets(c.test.interactions))
    assert (a.test.target != c.test.target).nnz > 0


def test_strong_split_min_items_and_unseen_items():
    # Users 0-5 have items 0-5; user 6 alone has item 6 and 7, and must be held out.
    dense = np.zeros((8, 8))
    dense[:6, :6] = 1
    dense[6, [0, 1, 2, 3, 6, 7]] = 1
    dense[7, :3] = 1  # 3 items: below min_items=5, dropped
    matrix = sp.csr_matrix(dense)
    for seed in range(20):
        split = strong_generalization_split(
            matrix, num_val_users=0, num_test_users=1, seed=seed, drop_unseen_items=True
        )
        assert 7 not in row_sets(split.train.interactions)
        if 6 in row_sets(split.test.interactions):
            held = row_sets(split.test.interactions)[6] | row_sets(split.test.target).get(6, set())
            assert held == {0, 1, 2, 3}  # items 6 and 7 are not in training: removed
            assert len(row_sets(split.test.target).get(6, set())) == 0  # floor(0.2 * 4)
            break
    else:
        pytest.fail("user 6 was never the test user in 20 seeds")
    with pytest.raises(ValueError, match="leave no training user"):
        strong_generalization_split(matrix, num_val_users=3, num_test_users=4)


def test_weak_split_holds_out_items_of_every_user():
    matrix = ml1m_implicit()
    split = weak_generalization_split(matrix, target_fraction=0.2, val_fraction=0.1, seed=3)
    full, train = row_sets(matrix), row_sets(split.train.interactions)
    val, test = row_sets(split.validation.target), row_sets(split.test.target)
    assert (split.validation.interactions != split.train.interactions).nnz == 0
    test_input = row_sets(split.test.interactions)
    for user, items in full.items():
        held_test, held_val = test.get(user, set()), val.get(user, set())
        assert len(held_test) == int(np.floor(0.2 * len(items)))
        assert len(held_val) == int(np.floor(0.1 * len(items)))
        assert not held_test & test_input[user] and test_input[user] == train[user] | held_val
        assert train[user] | held_val | held_test == items and not train[user] & held_val
    again = weak_generalization_split(matrix, target_fraction=0.2, val_fraction=0.1, seed=3)
    other = weak_generalization_split(matrix, target_fraction=0.2, val_fraction=0.1, seed=4)
    assert (again.test.target != split.test.target).nnz == 0
    assert (other.test.target != split.test.target).nnz > 0


def test_weak_split_drops_users_below_min_items():
    dense = np.zeros((3, 10))
    dense[0, :10] = 1
    dense[1, :4] = 1
    dense[2, :5] = 1
    split = weak_generalization_split(sp.csr_matrix(dense), seed=0)
    assert split.validation is None
    assert sorted(row_sets(split.test.interactions)) == [0, 2]
    assert [len(s) for s in row_sets(split.test.target).values()] == [2, 1]
    with pytest.raises(ValueError, match="val_fraction"):
        weak_generalization_split(sp.csr_matrix(dense), target_fraction=0.5, val_fraction=0.5)


# ------------------------------------------------------------------------------ prepare


def raw_pairs(split, user_id_map, item_id_map) -> dict:
    """Each part's (user id, item id) pairs in the original ids."""
    users = {index: raw for raw, index in user_id_map.items()}
    items = {index: raw for raw, index in item_id_map.items()}
    parts = {"train": split.train.interactions}
    for name in ("validation", "test"):
        if getattr(split, name) is not None:
            parts[f"{name}_input"] = getattr(split, name).interactions
            parts[f"{name}_target"] = getattr(split, name).target
    return {name: {(users[u], items[i]) for u, i in entries(m)} for name, m in parts.items()}


def test_prepare_mult_vae_on_ml_latest_small(tmp_path):
    ratings = load_movielens("ml-latest-small", shared_data("ml-latest-small"))
    config = StrongSplitConfig(num_val_users=50, num_test_users=50, drop_unseen_items=False)
    prepared = prepare(ratings, tmp_path, config, positive_above=3.5)

    # The reference: ratings > 3.5, users with >= 5 of them (plain pandas).
    positives = ratings[ratings.rating > 3.5]
    kept = positives.groupby("user").item.transform("size") >= 5
    expected = set(zip(positives.user[kept].tolist(), positives.item[kept].tolist()))
    pairs = raw_pairs(prepared.split, prepared.user_id_map, prepared.item_id_map)
    assert set().union(*pairs.values()) == expected
    assert sum(map(len, pairs.values())) == len(expected)
    assert len(prepared.user_id_map) == positives.user[kept].nunique()

    loaded = load_prepared(tmp_path)
    assert raw_pairs(loaded.split, loaded.user_id_map, loaded.item_id_map) == pairs
    meta = json.loads((tmp_path / "split.json").read_text())
    assert meta["split"] == "strong" and meta["config"]["num_test_users"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["split.json", *listed(meta)])
    assert sorted(meta["parts"]) == ["test", "train", "validation"]
    assert [len(meta["parts"][part]["files"]) for part in ("train", "validation", "test")] == [
        1,
        1,
        1,
    ]


def listed(meta: dict) -> list[str]:
    """The files that a split.json lists."""
    names = list(meta["id_maps"].values())
    for part in meta["parts"].values():
        names += part["files"] if part else []
    return names


def test_prepare_drops_items_unseen_in_training(tmp_path):
    events = load_events(shared_data("ml-1m-implicit") / "interactions.csv")
    config = StrongSplitConfig(num_val_users=600, num_test_users=600, seed=0)
    before = prepare(events, tmp_path, config)
    users = {index: raw for raw, index in before.user_id_map.items()}
    held_out = [users[u] for u in row_sets(before.split.test.interactions)][:3]
    held_out += [users[u] for u in row_sets(before.split.validation.interactions)][:2]
    # A new item that only held-out users have: the same users are held out again (the user
    # permutation depends on the users only), and the item must vanish from every part.
    lonely = pd.DataFrame({"user": held_out, "item": 10_000, "value": 1.0})
    after = prepare(pd.concat([events, lonely], ignore_index=True), tmp_path, config)
    assert after.user_id_map == before.user_id_map and 10_000 not in after.item_id_map
    train_items = np.flatnonzero(after.split.train.interactions.getnnz(axis=0))
    assert len(after.item_id_map) == len(train_items) == after.split.train.num_items
    for name in ("validation", "test"):
        part, earlier = getattr(after.split, name), getattr(before.split, name)
        assert set(row_sets(part.interactions)) == set(row_sets(earlier.interactions))
        full = row_sets(earlier.interactions + earlier.target)
        targets = row_sets(part.target)
        for user, given in row_sets(part.interactions).items():
            held = targets.get(user, set())
            assert len(given) + len(held) == len(full[user])
            assert len(held) == int(np.floor(0.2 * len(full[user])))


def test_prepare_weak_split_reads_back(tmp_path):
    events = load_events(shared_data("ml-1m-implicit") / "interactions.csv")
    prepared = prepare(events, tmp_path, WeakSplitConfig(val_fraction=0.1, seed=1))
    loaded = load_prepared(tmp_path)
    assert loaded.user_id_map == prepared.user_id_map
    assert loaded.item_id_map == prepared.item_id_map
    for name in ("train", "validation", "test"):
        for matrix in ("interactions", "target"):
            written = getattr(getattr(prepared.split, name), matrix)
            read = getattr(getattr(loaded.split, name), matrix)
            assert (written is None and read is None) or (written != read).nnz == 0
    # Prepared again without validation: the earlier split's files go, validation's too.
    prepare(events, tmp_path, WeakSplitConfig(seed=1))
    assert load_prepared(tmp_path).split.validation is None
    meta = json.loads((tmp_path / "split.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["split.json", *listed(meta)])
    assert not any(p.name.startswith("validation") for p in tmp_path.iterdir())
