"""Mini-batch negative sampling: turning groups of user rows into sparse training batches.

numpy only, no torch and no Ray, so it is tested in milliseconds against a scipy reference.

For a sampling group of users, the item set is the union of their items (``np.unique`` of the
group's column indices): every user's row is scored only on those items, so each user's
"negatives" are the items that the other users of the group touched. The group is then sliced
into ``batch_size`` training batches that share the item set; a larger group
(``num_sampling_users``) samples more negatives without making the batches larger.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserRows:
    """A CSR block of user rows: row ``r`` is user ``users[r]`` with
    ``indices[indptr[r]:indptr[r+1]]`` and the matching ``values``.

    A row's indices are sorted and distinct (``RecommendationDataset`` keeps its matrix in
    canonical CSR form); the batches built from them rely on it. ``indices`` is int64 from a
    CSR matrix, and the Arrow column's int32 (read-only) from ``rows_from_arrow``.
    """

    users: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_csr(cls, matrix, users=None) -> UserRows:
        """Rows of a scipy CSR matrix (all rows, or the rows ``users``)."""
        if users is None:
            users = np.arange(matrix.shape[0])
        else:
            users = np.asarray(users, dtype=np.int64)
            matrix = matrix[users]
        return cls(
            users=np.asarray(users, dtype=np.int64),
            indptr=matrix.indptr.astype(np.int64),
            indices=matrix.indices.astype(np.int64),
            values=matrix.data.astype(np.float32),
        )


@dataclass(frozen=True)
class SparseBatch:
    """A batch as a sparse ``shape`` matrix: entry ``(rows[j], cols[j])`` is ``values[j]``.

    Column ``c`` stands for item ``items[c]``; when ``items`` is None the columns are all items
    of the catalog in order. Entries are row-major and distinct (a coalesced COO matrix).
    """

    users: np.ndarray
    items: np.ndarray | None
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=np.float32)
        dense[self.rows, self.cols] = self.values
        return dense

    def check(self) -> None:
        """Checks the promises that the training step relies on without checking them (it
        flags the batch as a coalesced sparse tensor, and the sparse sync and SparseAdam take
        the embedding rows it touches as sorted and distinct); the tests call it, and
        ``RECODER_DIST_DEBUG=1`` makes the step call it on every batch.

        Raises:
            ValueError: naming the first promise that the batch breaks.
        """
        num_rows, num_cols = self.shape
        entries = len(self.rows)
        if len(self.users) != num_rows:
            raise ValueError(f"{len(self.users)} users for {num_rows} rows")
        if len(self.cols) != entries or len(self.values) != entries:
            raise ValueError(
                f"{entries} rows, {len(self.cols)} cols and {len(self.values)} values per entry"
            )
        if self.rows.dtype != np.int64 or self.cols.dtype != np.int64:
            raise ValueError(
                f"rows and cols must be int64, not {self.rows.dtype}/{self.cols.dtype}"
            )
        if self.items is not None:
            if len(self.items) != num_cols:
                raise ValueError(f"{len(self.items)} items for {num_cols} columns")
            if np.any(self.items[1:] <= self.items[:-1]) or np.any(self.items < 0):
                raise ValueError("the sampled items must be distinct non-negative ids, sorted")
        if entries == 0:
            return
        if self.rows[0] < 0 or self.rows[-1] >= num_rows or np.any(np.diff(self.rows) < 0):
            raise ValueError(f"entry rows must be sorted and in [0, {num_rows})")
        if self.cols.min() < 0 or self.cols.max() >= num_cols:
            raise ValueError(f"entry columns must be in [0, {num_cols})")
        same_row = self.rows[1:] == self.rows[:-1]
        if np.any(same_row & (self.cols[1:] <= self.cols[:-1])):
            raise ValueError("a row's entries must have distinct columns, in increasing order")
        if not np.all(np.isfinite(self.values)):
            raise ValueError("entry values must be finite")


class Collator:
    """Builds the training batches of one sampling group.

    Args:
        num_items: number of items of the catalog (columns when not sampling).
        batch_size: users per training batch.
        num_sampling_users: users per sampling group, a multiple of ``batch_size``; 0 means
            ``batch_size``. The caller feeds groups of this many rows (the last may be shorter).
        negative_sampling: score each row only on the items of its group; when False every row
            is scored on all items.
    """

    def __init__(
        self,
        *,
        num_items: int,
        batch_size: int,
        num_sampling_users: int = 0,
        negative_sampling: bool = True,
    ):
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_sampling_users = resolve_sampling_users(batch_size, num_sampling_users)
        self.negative_sampling = negative_sampling

    def __call__(self, group: UserRows) -> Iterator[SparseBatch]:
        if self.negative_sampling:
            # Columns are positions in the sorted union of the group's items.
            items, cols = _sampled_items(group.indices, self.num_items)
            num_cols = len(items)
        else:
            items, num_cols = None, self.num_items
            cols = group.indices.astype(np.int64, copy=False)

        for start in range(0, len(group), self.batch_size):
            stop = min(start + self.batch_size, len(group))
            lo, hi = group.indptr[start], group.indptr[stop]
            yield SparseBatch(
                users=group.users[start:stop],
                items=items,
                rows=row_numbers(group.indptr[start : stop + 1]),
                cols=cols[lo:hi],
                values=group.values[lo:hi],
                shape=(stop - start, num_cols),
            )


def _sampled_items(indices: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(indices, return_inverse=True)``: the sorted distinct items, and the position
    of each entry's item among them, both int64. An id outside ``[0, num_items)`` is a
    ValueError.
    """
    items, positions = np.unique(indices, return_inverse=True)
    if len(items) and not 0 <= items[0] <= items[-1] < num_items:
        raise ValueError(f"item ids must be in [0, num_items={num_items})")
    return items.astype(np.int64), positions.reshape(-1).astype(np.int64, copy=False)


def row_numbers(indptr: np.ndarray) -> np.ndarray:
    """The row (int64) of each entry of a CSR block, counted from ``indptr[0]`` (``indptr``
    may be a slice of a larger block's)."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def resolve_sampling_users(batch_size: int, num_sampling_users: int) -> int:
    """Validates the batch geometry and returns the effective sampling group size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_sampling_users is None or num_sampling_users == 0:
        return int(batch_size)
    if num_sampling_users < 0 or num_sampling_users % batch_size != 0:
        raise ValueError(
            f"num_sampling_users={num_sampling_users} must be a positive multiple of "
            f"batch_size={batch_size} (or 0 to mean batch_size)"
        )
    return int(num_sampling_users)


def batches_per_group(group_rows: int, batch_size: int) -> int:
    """Number of training batches that a group of ``group_rows`` rows is sliced into."""
    return -(-group_rows // batch_size)
