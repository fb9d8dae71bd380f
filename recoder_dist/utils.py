"""Turning interaction tables into CSR matrices, keeping the id maps that go with them, and
recsys-recoder 0.4.0's two small helpers (:func:`unzip`, :func:`normalize`)."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

_ID_MAP_FORMAT = "recoder_dist.id_map"


def unzip(pairs) -> list[list]:
    """The inverse of ``zip`` as lists: ``unzip([(1, "a"), (2, "b")]) == [[1, 2], ["a", "b"]]``.

    Args:
        pairs: an iterable of equal-length tuples (or lists).

    Returns:
        one list per position of the tuples (an empty list when ``pairs`` is empty).
    """
    return [list(column) for column in zip(*pairs)]


def normalize(x, axis: int | None = None) -> np.ndarray:
    """``x`` divided by its L2 norm, as recsys-recoder 0.4.0's ``utils.normalize``.

    With ``axis=1`` each row of a matrix is scaled to unit length; with ``axis=None`` a vector
    (or a matrix, by its Frobenius norm) is. The norms are reshaped as a column, so ``axis=0``
    on a matrix only works when it is square, as in 0.4.0.

    Args:
        x: a vector or matrix (anything ``np.asarray`` takes).
        axis: the axis along which the norms are taken.

    Returns:
        a float array of ``x``'s shape (a row of zeros gives NaN, as 0.4.0's did). 0.4.0
        returned a vector as a ``1 x n`` matrix; this returns a vector.
    """
    x = np.asarray(x)
    norms = np.linalg.norm(x, axis=axis)
    if axis is None or x.ndim == 1:
        return x / norms
    return x / np.reshape(norms, (-1, 1))


def dataframe_to_csr_matrix(
    df: pd.DataFrame,
    user_col: str,
    item_col: str,
    inter_col: str,
    item_id_map: Mapping[Hashable, int] | None = None,
    user_id_map: Mapping[Hashable, int] | None = None,
) -> tuple[sp.csr_matrix, dict, dict]:
    """Builds a users x items CSR matrix from a table of interactions.

    Args:
        df: one row per interaction.
        user_col: column with the user ids (integers or strings).
        item_col: column with the item ids (integers or strings).
        inter_col: column with the interaction values (finite numbers).
        item_id_map: an existing map from item id to column index; ids missing from it are an
            error. When None, a map is built over the items of ``df`` in order of appearance.
        user_id_map: the same for users and rows.

    Returns:
        ``(matrix, item_id_map, user_id_map)``. Repeated (user, item) pairs are summed.

    Raises:
        ValueError: a column is missing, an id is missing, negative or not an integer, a value
            is NaN or infinite, or an id is absent from a given map.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    for role, col in (("user_col", user_col), ("item_col", item_col), ("inter_col", inter_col)):
        if col not in df.columns:
            raise ValueError(f"{role}={col!r} is not a column of df (columns: {list(df.columns)})")

    values = pd.to_numeric(df[inter_col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"column {inter_col!r} has {int(bad.sum())} NaN, infinite or non-numeric values "
            f"(first at row {int(np.flatnonzero(bad)[0])})"
        )

    user_ids = _checked_ids(df[user_col], user_col)
    item_ids = _checked_ids(df[item_col], item_col)
    rows, user_id_map = _index(user_ids, user_id_map, user_col)
    cols, item_id_map = _index(item_ids, item_id_map, item_col)

    shape = (_map_size(user_id_map), _map_size(item_id_map))
    matrix = sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    return matrix, dict(item_id_map), dict(user_id_map)


def _checked_ids(column: pd.Series, name: str) -> pd.Series:
    if column.isna().any():
        raise ValueError(f"column {name!r} has {int(column.isna().sum())} missing ids")
    if pd.api.types.is_float_dtype(column):
        if not np.all(np.mod(column.to_numpy(), 1) == 0):
            raise ValueError(f"column {name!r} has ids that are not integers")
        column = column.astype(np.int64)
    if pd.api.types.is_integer_dtype(column) and (column < 0).any():
        raise ValueError(
            f"column {name!r} has negative ids (first: {int(column[column < 0].iloc[0])}); "
            "negative ids usually mark missing values"
        )
    return column


def _index(ids: pd.Series, id_map: Mapping | None, name: str) -> tuple[np.ndarray, Mapping]:
    """Row/column index of every id; builds the map in order of first appearance if None."""
    if id_map is None:
        codes, uniques = pd.factorize(ids)
        return codes.astype(np.int64), {_plain(raw): i for i, raw in enumerate(uniques)}
    mapped = ids.map(id_map)  # hashed lookup; absent ids become NaN
    unknown = mapped.isna().to_numpy()
    if unknown.any():
        examples = list(pd.unique(ids[unknown]))[:5]
        raise ValueError(
            f"{int(unknown.sum())} rows of column {name!r} have ids absent from the given id map "
            f"(e.g. {examples})"
        )
    return mapped.to_numpy(dtype=np.int64), id_map


def _map_size(id_map: Mapping) -> int:
    return max(id_map.values(), default=-1) + 1


def _plain(raw):
    """numpy scalars -> Python scalars, so maps built here match maps loaded from JSON."""
    return raw.item() if isinstance(raw, np.generic) else raw


def save_id_map(path: str | os.PathLike, id_map: Mapping[Hashable, int]) -> None:
    """Writes an id map as JSON (never pickle), atomically.

    Only integer and string ids are supported; the map must be a bijection onto 0..n-1.
    """
    ids = [None] * len(id_map)
    for raw, index in id_map.items():
        raw = _plain(raw)
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise TypeError(f"id {raw!r} is a {type(raw).__name__}; only int and str ids are saved")
        if not 0 <= index < len(ids) or ids[index] is not None:
            raise ValueError(f"id map is not a bijection onto 0..{len(ids) - 1} (index {index})")
        ids[index] = raw
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": _ID_MAP_FORMAT, "version": 1, "ids": ids}, f)
    os.replace(tmp, path)


def load_id_map(path: str | os.PathLike) -> dict:
    """Reads an id map written by :func:`save_id_map`."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not an id map file: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != _ID_MAP_FORMAT:
        raise ValueError(f"{path} is not an id map file written by save_id_map")
    ids = payload.get("ids")
    if not isinstance(ids, list):
        raise ValueError(f"{path} is not a valid id map: 'ids' is not a list")
    id_map = {raw: index for index, raw in enumerate(ids)}
    if len(id_map) != len(ids):
        raise ValueError(f"{path} is not a valid id map: some ids repeat")
    return id_map
