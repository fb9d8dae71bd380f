"""``prepare_on_cluster``: the split that Ray Data builds from event files equals the rule
worked out by a plain loop over the events, does not depend on how the events are split into
files or ordered, and bad input is named with its file."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recoder_dist.cli import main
from recoder_dist.datasets import StrongSplitConfig, WeakSplitConfig, load_prepared
from recoder_dist.datasets.cluster_prepare import draw_keys, prepare_on_cluster
from tests.conftest import shared_data
from tests.test_splits import raw_pairs

MASK = (1 << 64) - 1


def mix(x: int) -> int:
    """splitmix64's finalizer in Python integers: the reference for ``draw_keys``."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def key(seed: int, *ids: int) -> int:
    k = mix(seed)
    for i in ids:
        k = mix(k ^ i)
    return k


def naive_split(events: pd.DataFrame, config, positive_above=None) -> dict:
    """The documented rule, one user and one item at a time: part -> set of (user, item) in
    the original ids, as ``raw_pairs`` gives them."""
    items_of = defaultdict(set)
    for user, item, value in zip(events.user, events.item, events.value):
        if positive_above is None or value > positive_above:
            items_of[int(user)].add(int(item))
    users = sorted(u for u, items in items_of.items() if len(items) >= config.min_items)
    part_of = dict.fromkeys(users, "train")
    if isinstance(config, StrongSplitConfig):
        order = sorted(range(len(users)), key=lambda u: (key(config.seed, u), u))
        for u in order[: config.num_test_users]:
            part_of[users[u]] = "test"
        for u in order[config.num_test_users : config.num_test_users + config.num_val_users]:
            part_of[users[u]] = "validation"
    catalog = {i for u in users for i in items_of[u]}
    if isinstance(config, StrongSplitConfig) and config.drop_unseen_items:
        catalog = {i for u in users if part_of[u] == "train" for i in items_of[u]}
    item_index = {item: index for index, item in enumerate(sorted(catalog))}
    pairs = defaultdict(set)
    for index, user in enumerate(users):
        items = sorted(i for i in items_of[user] if i in item_index)
        ranked = sorted(
            items, key=lambda i: (key(config.seed, index, item_index[i]), item_index[i])
        )
        n = len(ranked)
        if isinstance(config, StrongSplitConfig):
            if part_of[user] == "train":
                pairs["train"] |= {(user, i) for i in items}
                continue
            cut = math.floor(config.target_fraction * n)
            if cut:  # an evaluation part holds the users with target items
                pairs[f"{part_of[user]}_input"] |= {(user, i) for i in ranked[cut:]}
                pairs[f"{part_of[user]}_target"] |= {(user, i) for i in ranked[:cut]}
        else:
            num_test = math.floor(config.target_fraction * n)
            num_val = math.floor(config.val_fraction * n)
            test, val, train = (
                ranked[:num_test],
                ranked[num_test : num_test + num_val],
                ranked[num_test + num_val :],
            )
            pairs["train"] |= {(user, i) for i in train}
            if config.val_fraction > 0 and val:
                pairs["validation_input"] |= {(user, i) for i in train}
                pairs["validation_target"] |= {(user, i) for i in val}
            if test:
                pairs["test_input"] |= {(user, i) for i in train + val}
                pairs["test_target"] |= {(user, i) for i in test}
    return dict(pairs), users, sorted(catalog)


def ml_latest_small() -> pd.DataFrame:
    ratings = pd.read_csv(shared_data("ml-latest-small") / "ratings.csv")
    return ratings.rename(columns={"userId": "user", "movieId": "item", "rating": "value"})


def test_draw_keys_is_splitmix64():
    ids = [0, 1, 2, 12345, (1 << 63) + 7]
    drawn = draw_keys(42, [0, 1, 2, 12345, 7], [3, 4, 5, 6, (1 << 62)])
    assert drawn.tolist() == [
        key(42, u, i) for u, i in zip([0, 1, 2, 12345, 7], [3, 4, 5, 6, 1 << 62])
    ]
    assert draw_keys(-1, ids[:4]).tolist() == [key(MASK, u) for u in ids[:4]]


@pytest.mark.parametrize(
    "config",
    [
        StrongSplitConfig(num_val_users=50, num_test_users=60, seed=3),
        WeakSplitConfig(val_fraction=0.1, seed=1),
    ],
    ids=["strong", "weak"],
)
def test_the_cluster_split_is_the_rule(ray_session, tmp_path, config):
    events = ml_latest_small()
    source = tmp_path / "ratings.csv"
    events.rename(columns={"user": "userId", "item": "movieId", "value": "rating"}).to_csv(
        source, index=False
    )
    files = prepare_on_cluster(
        source,
        tmp_path / "split",
        config,
        user_col="userId",
        item_col="movieId",
        value_col="rating",
        positive_above=3.5,
    )
    expected, users, items = naive_split(events, config, positive_above=3.5)
    prepared = load_prepared(tmp_path / "split")
    assert list(prepared.user_id_map) == users and list(prepared.item_id_map) == items
    pairs = raw_pairs(prepared.split, prepared.user_id_map, prepared.item_id_map)
    assert pairs == {name: expected.get(name, set()) for name in pairs}
    assert set(expected) <= set(pairs)
    assert files.meta["num_users"] == len(users) and files.meta["num_items"] == len(items)
    assert files.train.num_interactions == len(expected["train"])


def test_the_split_does_not_depend_on_files_or_order(ray_session, tmp_path):
    """The same events as one CSV, and as three Parquet files in another order with repeated
    events: the same split, file for file."""
    events = pd.read_csv(shared_data("ml-1m-implicit") / "interactions.csv")
    config = StrongSplitConfig(num_val_users=300, num_test_users=300, seed=5)
    one = prepare_on_cluster(
        shared_data("ml-1m-implicit") / "interactions.csv", tmp_path / "a", config
    )
    shuffled = pd.concat([events, events.iloc[:1000]]).sample(frac=1.0, random_state=0)
    (tmp_path / "parts").mkdir()
    for number, part in enumerate(range(0, len(shuffled), 400_000)):
        table = pa.Table.from_pandas(shuffled.iloc[part : part + 400_000], preserve_index=False)
        pq.write_table(table, tmp_path / "parts" / f"events-{number}.parquet")
    other = prepare_on_cluster(tmp_path / "parts" / "events-*.parquet", tmp_path / "b", config)
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    assert a.user_id_map == b.user_id_map and a.item_id_map == b.item_id_map
    for name in ("train", "validation", "test"):
        for matrix in ("interactions", "target"):
            left = getattr(getattr(a.split, name), matrix)
            right = getattr(getattr(b.split, name), matrix)
            assert (left is None and right is None) or (left != right).nnz == 0
    assert one.train.num_rows == other.train.num_rows == len(a.split.train)
    for part in ("train", "validation", "test"):
        # The same rows, positions included (files may be cut elsewhere).
        tables = [
            pa.concat_tables(map(pq.read_table, getattr(f, part).paths)) for f in (one, other)
        ]
        assert tables[0].equals(tables[1])


def write_csv(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, error, message",
    [
        ("user,item\n1,2\n", ValueError, "no column 'value'"),
        (
            "user,item,value\n1,2,1\n1,x,1\n",
            ValueError,
            "events.csv: item 'x' is not a non-negative",
        ),
        (
            "user,item,value\n1,2,1\n-4,3,1\n",
            ValueError,
            "events.csv: user '-4' is not a non-negative",
        ),
        ("user,item,value\n1,2,1\n1,3,\n", ValueError, "events.csv: value None is not a finite"),
        ("user,item,value\n1,2,1\n", ValueError, "no user has 5 or more positive events"),
        (
            "user,item,value\n1,2,1\n10000000000000000000,3,1\n",
            ValueError,
            "events.csv: user '10000000000000000000' is larger than the largest id, 2\\*\\*63",
        ),
        (
            "user,item,value\n1,2,1\n1,3,1,9\n",
            ValueError,
            "events.csv is not a readable CSV file: CSV parse error: Expected 3 columns, got 4",
        ),
    ],
    ids=[
        "missing column",
        "text id",
        "negative id",
        "missing value",
        "too few events",
        "id beyond int64",
        "ragged row",
    ],
)
def test_bad_events_are_named(ray_session, tmp_path, text, error, message):
    source = write_csv(tmp_path, "events.csv", text)
    with pytest.raises(error, match=message):
        prepare_on_cluster(source, tmp_path / "out", WeakSplitConfig(), value_col="value")
    assert not (tmp_path / "out").exists()


def test_missing_or_mixed_input_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no event files at"):
        prepare_on_cluster(tmp_path / "nothing-*.csv", tmp_path / "out", WeakSplitConfig())
    write_csv(tmp_path, "a.csv", "user,item\n1,2\n")
    pq.write_table(pa.table({"user": [1], "item": [2]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="mix Parquet and CSV"):
        prepare_on_cluster(tmp_path, tmp_path / "out", WeakSplitConfig())
    with pytest.raises(ValueError, match="positive_above needs value_col"):
        prepare_on_cluster(
            tmp_path / "a.csv", tmp_path / "out", WeakSplitConfig(), positive_above=3
        )


@pytest.mark.slow
def test_what_spreadsheets_and_spark_write_prepares_as_a_plain_csv(ray_session, tmp_path):
    """A CSV with a byte-order mark and quoted names (Excel's "CSV UTF-8", R's write.csv),
    and a folder of Parquet parts with Spark's _SUCCESS marker beside them (the folder, or a
    glob of it): the same split as the plain CSV of the same events."""
    events = pd.DataFrame(
        [(u, (u * 3 + j) % 11) for u in range(12) for j in range(6)], columns=["user", "item"]
    )
    plain = tmp_path / "plain.csv"
    events.to_csv(plain, index=False)
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"user,item", b'"user","item"'))
    spark = tmp_path / "spark"
    spark.mkdir()
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), spark / "part-0.parquet")
    (spark / "_SUCCESS").write_bytes(b"")
    config = StrongSplitConfig(num_val_users=2, num_test_users=2, seed=1)
    splits = {
        name: load_prepared(prepare_on_cluster(source, tmp_path / name, config).location)
        for name, source in (("a", plain), ("b", excel), ("c", spark), ("d", spark / "*"))
    }
    for other in ("b", "c", "d"):
        assert splits[other].user_id_map == splits["a"].user_id_map
        train, plain_train = splits[other].split.train, splits["a"].split.train
        assert (train.interactions != plain_train.interactions).nnz == 0


def test_the_command_line_prepares_events_on_the_cluster(ray_session, tmp_path, capsys):
    source = shared_data("ml-1m-implicit") / "interactions.csv"
    argv = ["prepare", "--dataset", "events", "--input", str(source), "--output", str(tmp_path)]
    assert main([*argv, "--val-users", "100", "--test-users", "100", "--seed", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    events = pd.read_csv(source).drop_duplicates(["user", "item"])
    expected_users = int((events.groupby("user").size() >= 5).sum())
    assert printed["users"] == expected_users and printed["test_users"] == 100
    assert printed["train_users"] == expected_users - 200
    assert load_prepared(tmp_path).split.train.num_users == expected_users
