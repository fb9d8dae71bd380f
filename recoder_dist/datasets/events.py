"""Generic event tables: one interaction per row, in CSV (with a header) or Parquet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

_PARQUET_SUFFIXES = (".parquet", ".pq")


def load_events(
    path: str | os.PathLike,
    *,
    user_col: str = "user",
    item_col: str = "item",
    value_col: str | None = None,
    timestamp_col: str | None = None,
    sep: str = ",",
    integer_ids: bool = True,
) -> pd.DataFrame:
    """Reads an event table: columns ``user``, ``item``, ``value`` (and ``timestamp``).

    Args:
        path: a CSV file with a header line, or a Parquet file (``.parquet``/``.pq``).
        user_col, item_col: the columns holding the ids.
        value_col: the column holding the strength of each event; None gives every event 1.0.
        timestamp_col: a column to keep as ``timestamp`` (copied as read).
        sep: the CSV field separator.
        integer_ids: ids must be non-negative integers (read as int64); when False, any
            non-empty string is an id.

    Raises:
        ValueError: the file cannot be read, a column is missing, or (naming the CSV line or the
            Parquet row) an id is missing or not a non-negative integer, a value is missing,
            NaN or infinite, a timestamp is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    wanted = {"user": user_col, "item": item_col}
    if value_col is not None:
        wanted["value"] = value_col
    if timestamp_col is not None:
        wanted["timestamp"] = timestamp_col
    parquet = path.suffix.lower() in _PARQUET_SUFFIXES
    table = _read_parquet(path, wanted) if parquet else _read_csv(path, wanted, sep, integer_ids)
    if table.empty:
        raise ValueError(f"{path} holds no events")

    def where(row: int) -> str:
        # Row r of a CSV is on line r + 2 (the header is line 1; quoted newlines aside).
        return f"{path}, row {row}" if parquet else f"{path}, line {row + 2}"

    out = {}
    for role in ("user", "item"):
        out[role] = _ids(table[wanted[role]], wanted[role], integer_ids, where)
    if value_col is None:
        out["value"] = np.ones(len(table), dtype=np.float32)
    else:
        values = pd.to_numeric(table[value_col], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            shown = table[value_col].iloc[row]
            raise ValueError(f"{where(row)}: {value_col} {shown!r} is not a finite number")
        out["value"] = values.astype(np.float32)
    if timestamp_col is not None:
        missing = table[timestamp_col].isna().to_numpy()
        if missing.any():
            raise ValueError(f"{where(int(np.flatnonzero(missing)[0]))}: {timestamp_col} missing")
        out["timestamp"] = table[timestamp_col].to_numpy()
    return pd.DataFrame(out)


def _read_csv(path: Path, wanted: dict, sep: str, integer_ids: bool) -> pd.DataFrame:
    columns = list(dict.fromkeys(wanted.values()))
    # String ids stay strings ("007" is not 7); integer ids are parsed by the fast path.
    dtypes = None if integer_ids else {wanted["user"]: str, wanted["item"]: str}
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns
    except (ValueError, UnicodeDecodeError) as e:  # EmptyDataError is a ValueError
        raise ValueError(f"{path} is not a CSV file with a header: {e}") from None
    _check_columns(path, columns, header)
    try:
        # Every column is read: with ``usecols`` pandas would not notice a line with extra fields.
        table = pd.read_csv(path, sep=sep, dtype=dtypes, skip_blank_lines=False)
        return table[columns]
    except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError names the line
        raise ValueError(f"{path} is not a valid CSV file: {e}") from None


def _read_parquet(path: Path, wanted: dict) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        columns = list(dict.fromkeys(wanted.values()))
        _check_columns(path, columns, schema.names)
        return pq.read_table(path, columns=columns).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file: {e}") from None


def _check_columns(path: Path, columns: list, available) -> None:
    missing = [c for c in columns if c not in set(available)]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} (columns: {list(available)})")


def _ids(column: pd.Series, name: str, integer_ids: bool, where) -> np.ndarray:
    missing = column.isna().to_numpy()
    if not integer_ids:
        text = column.astype(str)
        missing = missing | (text.str.len().to_numpy() == 0)
        if missing.any():
            raise ValueError(f"{where(int(np.flatnonzero(missing)[0]))}: {name} is missing")
        return text.to_numpy(dtype=object)
    if pd.api.types.is_integer_dtype(column.dtype):
        numbers = column.to_numpy(np.int64)
        bad = numbers < 0
    else:
        parsed = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(parsed) | (parsed < 0) | (np.mod(parsed, 1) != 0)
        numbers = np.where(bad, 0, parsed).astype(np.int64)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        shown = column.iloc[row]
        reason = "missing" if missing[row] else f"{shown!r} is not a non-negative integer"
        raise ValueError(f"{where(row)}: {name} {reason}")
    return numbers
