"""Strict reading of delimited rating files.

pandas' C parser reads the file; when it refuses it (or would silently drop fields), a plain
line-by-line pass finds the first bad line, so that the error names the file, the line and what
is wrong with it. Truncation inside the last field of a file leaves a well-formed file: only a
SHA-256 or a known number of records catches that (see :func:`check_count`).
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

# Kinds of column: "id" a non-negative integer, "int" any integer, "float" a finite number.
_INT_PATTERNS = {"id": re.compile(r"\d+(\.0*)?"), "int": re.compile(r"[+-]?\d+(\.0*)?")}


def bad_line(path, lineno: int, reason: str, text: str | None = None) -> ValueError:
    """The error for line ``lineno`` (1-based) of ``path``."""
    shown = "" if text is None else f": {text[:120]!r}"
    return ValueError(f"{path}, line {lineno}: {reason}{shown}")


def line_text(path, lineno: int) -> str:
    """Line ``lineno`` (1-based) of a text file, for error messages."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if number == lineno:
                return line.rstrip("\r\n")
    return ""


def check_count(path, what: str, actual: int, expected: int | None) -> None:
    """Refuses a file whose number of records differs from the published one."""
    if expected is not None and actual != expected:
        raise ValueError(
            f"{path} holds {actual:,} {what}, expected {expected:,}: truncated, corrupt or "
            "another version of the file"
        )


def read_delimited(
    path,
    *,
    sep: str,
    columns: Mapping[str, str],
    header: tuple[str, ...] | None = None,
) -> pd.DataFrame:
    """Reads a file with one record per line and exactly ``len(columns)`` fields.

    Args:
        path: the file.
        sep: the field separator (``"::"`` is read through the fast parser too).
        columns: name -> kind (``"id"``, ``"int"`` or ``"float"``) of each field, in order.
        header: the expected first line's fields, when the file has a header.

    Raises:
        ValueError: the file is empty, its header differs, a line has another number of
            fields, a field is not of its kind (ids: non-negative integers; floats: finite).
    """
    path = Path(path)
    skip = 0
    if header is not None:
        first = line_text(path, 1)
        if first.split(sep) != list(header):
            raise bad_line(path, 1, f"expected the header {sep.join(header)!r}", first)
        skip = 1
    source, pandas_sep = path, sep
    if len(sep) > 1:
        # The C parser takes one-character separators only (the Python engine is ~10x slower).
        # A tab already in the file becomes an extra field, which is refused below.
        source, pandas_sep = io.BytesIO(path.read_bytes().replace(sep.encode(), b"\t")), "\t"
    dtypes = {name: np.float64 if kind == "float" else np.int64 for name, kind in columns.items()}
    try:
        with warnings.catch_warnings():
            # pandas only warns when every line has more fields than names, then drops them.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                source,
                sep=pandas_sep,
                header=None,
                names=list(columns),
                dtype=dtypes,
                skiprows=skip,
                skip_blank_lines=False,  # keeps row r on line r + skip + 1
                quoting=csv.QUOTE_NONE,
                index_col=False,
                engine="c",
            )
    except (ValueError, pd.errors.ParserWarning, OverflowError) as e:
        raise _first_bad_line(path, sep, columns, skip, e) from None
    if df.empty:
        raise ValueError(f"{path} holds no records")
    for name, kind in columns.items():
        values = df[name].to_numpy()
        bad = ~np.isfinite(values) if kind == "float" else (values < 0 if kind == "id" else None)
        if bad is not None and bad.any():
            row = int(np.flatnonzero(bad)[0])
            lineno = row + skip + 1
            raise bad_line(path, lineno, f"{name} is {values[row]}", line_text(path, lineno))
    return df


def _first_bad_line(path: Path, sep: str, columns: Mapping[str, str], skip: int, error):
    """The error for the first line that breaks the format (pandas' own message if none)."""
    kinds = list(columns.items())
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip:
                continue
            text = line.rstrip("\r\n")
            fields = text.split(sep)
            if len(fields) != len(kinds):
                reason = f"expected {len(kinds)} fields separated by {sep!r}, found {len(fields)}"
                return bad_line(path, lineno, reason, text)
            for field, (name, kind) in zip(fields, kinds):
                if not _is_kind(field.strip(" "), kind):
                    reason = f"{name} {field!r} is not {_KIND_NAMES[kind]}"
                    return bad_line(path, lineno, reason, text)
    return ValueError(f"{path} cannot be parsed: {error}")


_KIND_NAMES = {"id": "a non-negative integer", "int": "an integer", "float": "a finite number"}


def _is_kind(field: str, kind: str) -> bool:
    if kind in _INT_PATTERNS:
        return _INT_PATTERNS[kind].fullmatch(field) is not None
    try:
        return bool(np.isfinite(float(field)))
    except ValueError:
        return False
