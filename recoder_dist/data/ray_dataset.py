"""User rows as a Ray Dataset, and back to CSR blocks on the workers.

One row per user: ``{user: int64, items: list<int32>, values: list<float32>}``, plus
``target_items``/``target_values`` for evaluation. The Arrow list columns are built straight
from the CSR arrays (offsets = indptr), with no Python loop over users.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recoder_dist.data.collator import UserRows
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.data.epoch_order import RowBlocks

# Rows per Arrow block: small enough that Ray Data can spread and reorder blocks across workers,
# large enough that per-block overhead stays negligible.
DEFAULT_ROWS_PER_BLOCK = 2048
# Rows per block of the training rows, the unit that each epoch's order permutes: small, so
# that a window of a few sampling groups mixes users of many blocks.
TRAIN_ROWS_PER_BLOCK = 256


def user_rows_table(dataset: RecommendationDataset, users: np.ndarray | None = None) -> pa.Table:
    """Arrow table of user rows (all users with interactions by default)."""
    if users is None:
        users = dataset.users
    users = np.asarray(users, dtype=np.int64)
    # position: the row's place in the table, by which evaluation assigns rows to ranks.
    columns = {"user": pa.array(users), "position": pa.array(np.arange(len(users)))}
    columns.update(_list_columns(dataset.interactions[users], ""))
    if dataset.target is not None:
        columns.update(_list_columns(dataset.target[users], "target_"))
    return pa.table(columns)


def _list_columns(csr, prefix: str) -> dict:
    offsets = csr.indptr
    list_type = pa.LargeListArray if offsets[-1] > np.iinfo(np.int32).max else pa.ListArray
    offsets = pa.array(offsets.astype(np.int64 if list_type is pa.LargeListArray else np.int32))
    return {
        f"{prefix}items": list_type.from_arrays(offsets, pa.array(csr.indices.astype(np.int32))),
        f"{prefix}values": list_type.from_arrays(offsets, pa.array(csr.data.astype(np.float32))),
    }


def to_ray_dataset(table: pa.Table, rows_per_block: int = DEFAULT_ROWS_PER_BLOCK):
    """A Ray Dataset over ``table``, in blocks of ``rows_per_block`` rows: their metadata taken
    here, where ``from_arrow`` would run a task a block for it, each asking a CPU that a Tune
    trial training in its process may hold (the trial then waits forever)."""
    import ray.data

    if table.num_rows == 0:
        raise ValueError("cannot build a Ray Dataset with no user rows")
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_blocks(blocks)


def put_blocks(table: pa.Table, rows_per_block: int) -> RowBlocks:
    """The rows of ``table`` in the object store, ``rows_per_block`` at a time: the blocks of
    ``to_ray_dataset(table, rows_per_block)``, as the ``RowBlocks`` that training reads, no
    Ray Dataset. For rows that are in this process already; files are read by the cluster
    instead."""
    import ray

    if table.num_rows == 0:
        raise ValueError("cannot put a table of no user rows")
    slices = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return RowBlocks(tuple(ray.put(s) for s in slices), tuple(s.num_rows for s in slices))


def rows_from_arrow(batch: pa.Table | pa.RecordBatch, prefix: str = "") -> UserRows:
    """The CSR block of a batch of user rows (``prefix='target_'`` for the targets)."""
    items = _combined(batch.column(f"{prefix}items"))
    values = _combined(batch.column(f"{prefix}values"))
    offsets = items.offsets.to_numpy().astype(np.int64)
    start, stop = offsets[0], offsets[-1]  # a sliced list array keeps its parent's offsets
    return UserRows(
        users=batch.column("user").to_numpy().astype(np.int64),
        indptr=offsets - start,
        indices=items.values.to_numpy()[start:stop],  # int32, read-only: the collator reads it
        values=values.values.to_numpy()[start:stop].astype(np.float32),  # a writable copy
    )


def _combined(column):
    """One Arrow array for a column, without the copy that ``combine_chunks`` makes even of a
    single chunk."""
    if not isinstance(column, pa.ChunkedArray):
        return column
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
