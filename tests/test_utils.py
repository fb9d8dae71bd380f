"""Interaction tables to CSR matrices, and the JSON id maps, against naive references."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest

from recoder_dist.utils import dataframe_to_csr_matrix, load_id_map, save_id_map


def naive_csr(users, items, values, user_map=None, item_map=None):
    """Dense matrix and maps by a plain loop: ids numbered by first appearance, pairs summed."""
    user_map = {} if user_map is None else dict(user_map)
    item_map = {} if item_map is None else dict(item_map)
    sums = {}
    for u, i, v in zip(users, items, values):
        row = user_map.setdefault(u, len(user_map))
        col = item_map.setdefault(i, len(item_map))
        sums[row, col] = sums.get((row, col), 0.0) + v
    dense = np.zeros((max(user_map.values()) + 1, max(item_map.values()) + 1))
    for (row, col), v in sums.items():
        dense[row, col] = v
    return dense, item_map, user_map


def frame(users, items, values):
    """A frame with columns u (users), i (items), v (values)."""
    return pd.DataFrame({"u": users, "i": items, "v": values})


def convert(df, **maps):
    """dataframe_to_csr_matrix on the u/i/v columns."""
    return dataframe_to_csr_matrix(df, "u", "i", "v", **maps)


def assert_matches_naive(df, matrix, item_map, user_map, **given):
    """The CSR matrix and maps equal the naive loop's, with plain Python id types."""
    dense, naive_items, naive_users = naive_csr(
        df["u"].tolist(),
        df["i"].tolist(),
        df["v"].tolist(),
        given.get("user_id_map"),
        given.get("item_id_map"),
    )
    assert item_map == naive_items and user_map == naive_users
    assert all(type(k) in (int, str) for k in [*item_map, *user_map])
    assert matrix.dtype == np.float32 and matrix.format == "csr"
    assert matrix.has_canonical_format
    np.testing.assert_allclose(matrix.toarray(), dense, rtol=1e-6, atol=0)


USERS_STR = ["alice", "bob", "alice", "carol", "bob", "alice"]
ITEMS_INT = [30, 10, 30, 20, 30, 10]
VALUES = [1.0, 2.0, 3.0, 4.0, 5.0, 0.5]


def test_hand_made_frame():
    """String users and int items: first-appearance maps, the (alice, 30) pair summed to 4."""
    df = frame(USERS_STR, ITEMS_INT, VALUES)
    matrix, item_map, user_map = convert(df)
    assert user_map == {"alice": 0, "bob": 1, "carol": 2}
    assert item_map == {30: 0, 10: 1, 20: 2}
    # alice: 30 -> 1 + 3, 10 -> 0.5; bob: 10 -> 2, 30 -> 5; carol: 20 -> 4.
    np.testing.assert_array_equal(matrix.toarray(), [[4, 0.5, 0], [5, 2, 0], [0, 0, 4]])
    assert matrix.nnz == 5
    assert_matches_naive(df, matrix, item_map, user_map)


@pytest.mark.parametrize(
    ("users", "items"),
    [
        ([7, 3, 7, 0, 3, 9], ["x", "y", "x", "z", "z", "y"]),
        ([7.0, 3.0, 7.0, 0.0, 3.0, 9.0], [1, 1, 2, 2, 1, 1]),
        (["a", "a", "a", "a", "a", "a"], [5, 5, 5, 5, 5, 5]),
    ],
)
def test_other_id_types(users, items):
    """Int users and str items, integral float ids (kept as ints), and one repeated pair."""
    df = frame(users, items, VALUES)
    matrix, item_map, user_map = convert(df)
    df = df.assign(u=[int(u) if isinstance(u, float) else u for u in users])
    assert_matches_naive(df, matrix, item_map, user_map)


def test_random_frame():
    """A random frame with many duplicate pairs matches the naive loop."""
    rng = np.random.default_rng(0)
    n = 500
    df = frame(
        [f"user{k}" for k in rng.integers(0, 40, n)],
        rng.integers(0, 1000, n) * 7,
        rng.integers(1, 6, n).astype(float),
    )
    matrix, item_map, user_map = convert(df)
    assert_matches_naive(df, matrix, item_map, user_map)


def test_given_maps_are_honored():
    """Given maps fix rows and columns, and their largest index sets the shape."""
    item_map = {10: 3, 20: 0, 30: 1, 99: 2, 77: 4}
    user_map = {"carol": 0, "alice": 3, "bob": 1, "dave": 2}
    df = frame(USERS_STR, ITEMS_INT, VALUES)
    matrix, got_items, got_users = convert(df, item_id_map=item_map, user_id_map=user_map)
    assert got_items == item_map and got_users == user_map
    assert matrix.shape == (4, 5)
    assert_matches_naive(
        df, matrix, got_items, got_users, item_id_map=item_map, user_id_map=user_map
    )
    # alice (row 3): item 30 (col 1) -> 4, item 10 (col 3) -> 0.5.
    np.testing.assert_array_equal(matrix.toarray()[3], [0, 4, 0, 0.5, 0])


def test_one_given_map():
    """Only an item map given: users are still numbered by first appearance."""
    df = frame(USERS_STR, ITEMS_INT, VALUES)
    item_map = {20: 0, 10: 1, 30: 2}
    matrix, got_items, got_users = convert(df, item_id_map=item_map)
    assert got_users == {"alice": 0, "bob": 1, "carol": 2}
    assert_matches_naive(df, matrix, got_items, got_users, item_id_map=item_map)


@pytest.mark.parametrize(
    ("maps", "column"),
    [
        ({"item_id_map": {10: 0, 30: 1}}, "'i'"),
        ({"user_id_map": {"alice": 0, "bob": 1}}, "'u'"),
        ({"user_id_map": {"alice": 0, "bob": 1, "carol": 2}, "item_id_map": {"10": 0}}, "'i'"),
    ],
)
def test_id_absent_from_given_map(maps, column):
    """An id that is not in a given map is a ValueError naming the column."""
    with pytest.raises(ValueError, match=f"column {column} have ids absent from the given id map"):
        convert(frame(USERS_STR, ITEMS_INT, VALUES), **maps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "lots"])
def test_bad_values(bad):
    """A NaN, infinite or non-numeric value is a ValueError naming the value column and row."""
    values = [1.0, 2.0, bad, 4.0, 5.0, 6.0]
    with pytest.raises(ValueError, match=r"column 'v' has 1 NaN, infinite .* \(first at row 2\)"):
        convert(frame(USERS_STR, ITEMS_INT, values))


@pytest.mark.parametrize(
    ("users", "items", "message"),
    [
        ([1.0, np.nan, 2.0], [1, 2, 3], "column 'u' has 1 missing ids"),
        (["a", None, "b"], [1, 2, 3], "column 'u' has 1 missing ids"),
        ([1, 2, 3], [1.0, np.nan, np.nan], "column 'i' has 2 missing ids"),
        ([1, -1, 3], [1, 2, 3], "column 'u' has negative ids"),
        ([1, 2, 3], [4, 5, -7], r"column 'i' has negative ids \(first: -7\)"),
        ([1, 2, 3], [4.0, -2.0, 1.0], "column 'i' has negative ids"),
        ([1.5, 2.0, 3.0], [1, 2, 3], "column 'u' has ids that are not integers"),
        ([1, 2, 3], [1.0, 2.0, np.inf], "column 'i' has ids that are not integers"),
    ],
)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bad_ids(users, items, message):
    """Missing, negative or non-integral ids are a ValueError naming the column."""
    with pytest.raises(ValueError, match=message):
        convert(frame(users, items, [1.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    ("cols", "message"),
    [
        (("user", "i", "v"), "user_col='user' is not a column"),
        (("u", "item", "v"), "item_col='item' is not a column"),
        (("u", "i", "rating"), "inter_col='rating' is not a column"),
    ],
)
def test_missing_column(cols, message):
    """A column that is not in the frame is a ValueError naming the argument and the column."""
    with pytest.raises(ValueError, match=message):
        dataframe_to_csr_matrix(frame([1], [2], [3.0]), *cols)


@pytest.mark.parametrize("df", [{"u": [1], "i": [2], "v": [3.0]}, np.ones((2, 3)), None])
def test_not_a_dataframe(df):
    """Anything but a DataFrame is a TypeError."""
    with pytest.raises(TypeError, match="df must be a pandas DataFrame"):
        dataframe_to_csr_matrix(df, "u", "i", "v")


ID_MAPS = [
    {},
    {"a": 0},
    {3: 0, 1: 1, 2: 2},
    {"x": 2, 5: 0, "5": 1, -4: 3, "": 4, "ünïcode": 5, 2**40: 6},
]


@pytest.mark.parametrize("id_map", ID_MAPS)
def test_id_map_round_trip(tmp_path, id_map):
    """save/load returns the same ids with the same types (int 5 and str '5' stay apart)."""
    path = tmp_path / "map.json"
    save_id_map(path, id_map)
    loaded = load_id_map(path)
    assert loaded == id_map
    assert sorted((repr(k), v) for k, v in loaded.items()) == sorted(
        (repr(k), v) for k, v in id_map.items()
    )
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_id_map_file_is_json(tmp_path):
    """The file is plain JSON listing the ids by index."""
    path = tmp_path / "map.json"
    save_id_map(str(path), {"b": 1, 7: 0})
    payload = json.loads(path.read_text())
    assert payload["ids"] == [7, "b"]


def test_numpy_ids_round_trip_as_python(tmp_path):
    """numpy int and str ids are saved as plain ints and strs."""
    path = tmp_path / "map.json"
    save_id_map(path, {np.int64(9): 0, np.str_("q"): 1})
    loaded = load_id_map(path)
    assert loaded == {9: 0, "q": 1}
    assert [type(k) for k in loaded] == [int, str]


def test_dataframe_maps_round_trip(tmp_path):
    """Maps built by dataframe_to_csr_matrix load back equal, and work as given maps."""
    df = frame(USERS_STR, ITEMS_INT, VALUES)
    matrix, item_map, user_map = convert(df)
    save_id_map(tmp_path / "items.json", item_map)
    save_id_map(tmp_path / "users.json", user_map)
    items, users = load_id_map(tmp_path / "items.json"), load_id_map(tmp_path / "users.json")
    assert items == item_map and users == user_map
    again, _, _ = convert(df, item_id_map=items, user_id_map=users)
    np.testing.assert_array_equal(again.toarray(), matrix.toarray())


@pytest.mark.parametrize("bad_id", [1.5, (1, 2), True, None, b"bytes"])
def test_unsupported_id_type(tmp_path, bad_id):
    """Ids other than int and str are a TypeError naming the id type."""
    with pytest.raises(TypeError, match="only int and str ids are saved"):
        save_id_map(tmp_path / "map.json", {"ok": 0, bad_id: 1})
    assert not (tmp_path / "map.json").exists()


@pytest.mark.parametrize("id_map", [{"a": 1}, {"a": 0, "b": 2}, {"a": -1}, {"a": 0, "b": 0}])
def test_not_a_bijection(tmp_path, id_map):
    """Indices that are not exactly 0..n-1 are a ValueError."""
    with pytest.raises(ValueError, match="not a bijection"):
        save_id_map(tmp_path / "map.json", id_map)


@pytest.mark.parametrize(
    "content",
    [
        '{"a": 1}',
        "[1, 2, 3]",
        '{"format": "something.else", "ids": [1]}',
        "not json at all",
        "",
    ],
)
def test_load_rejects_other_files(tmp_path, content):
    """JSON that is not an id map, and text that is not JSON, are a ValueError."""
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="is not an id map file"):
        load_id_map(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            pickle.dumps({"a": 0}),
            id="pickle",
        ),
        pytest.param(
            b'{"format": "recoder_dist.id_map", "version": 1}',
            id="no-ids",
        ),
        pytest.param(
            b'{"format": "recoder_dist.id_map", "version": 1, "ids": 3}',
            id="ids-not-list",
        ),
        pytest.param(
            b'{"format": "recoder_dist.id_map", "version": 1, "ids": [5, 5]}',
            id="repeated-ids",
        ),
    ],
)
def test_load_rejects_corrupt_files(tmp_path, content):
    """A binary file or a malformed id map is a ValueError saying it is not an id map."""
    path = tmp_path / "map.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="id map"):
        load_id_map(path)
