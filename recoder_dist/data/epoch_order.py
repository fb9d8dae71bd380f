"""Which training rows each rank reads in an epoch, and in what order.

The training rows are small blocks in Ray's object store (:class:`RowBlocks`). Every epoch, all
ranks draw the same permutation of the blocks from ``(seed, epoch)``, lay them end to end, and
rank ``r`` of ``W`` takes rows ``[r * N // W, (r + 1) * N // W)`` of that sequence: a different
share of the users every epoch, as even as ``streaming_split(equal=True)``'s. Each rank then
permutes its rows within windows of a few sampling groups (seeded by ``(seed, epoch, rank)``),
so that a sampling group, which decides its users' negative items, is drawn from several
blocks that change every epoch. Everything depends on the seed and the epoch only: a resumed
run reads what a run that never stopped reads.

Ray is only behind ``fetch`` (``ray.get``); the tests pass the tables themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class RowBlocks:
    """Blocks of user rows: block ``i`` is the ``rows[i]`` rows of the table at ``refs[i]``
    (an object reference, or in tests the table itself) from row ``starts[i]`` on; with
    ``starts`` None, each block is its whole table. Several blocks may share a table: a
    table of many blocks is one object (see ``UserRowFiles.row_blocks``)."""

    refs: tuple
    rows: tuple[int, ...]
    starts: tuple[int, ...] | None = None

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    def block(self, index: int, fetch: Callable[[object], pa.Table]) -> pa.Table:
        """The table of block ``index``, from ``fetch(refs[index])``."""
        table = fetch(self.refs[index])
        if self.starts is None:
            return table
        return table.slice(self.starts[index], self.rows[index])


def rank_rows(
    blocks: RowBlocks,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    fetch: Callable[[object], pa.Table],
) -> Iterator[pa.Table]:
    """The tables of rank ``rank``'s rows this epoch, in the epoch's block order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks.rows))
    total = blocks.num_rows
    start, stop = rank * total // world, (rank + 1) * total // world
    offset = 0  # where the current block begins in the epoch's sequence
    for index in order:
        rows = blocks.rows[index]
        begin, end = max(start - offset, 0), min(stop - offset, rows)
        offset += rows
        if begin < end:
            table = blocks.block(index, fetch)
            yield table if (begin, end) == (0, rows) else table.slice(begin, end - begin)
        if offset >= stop:
            return


def shuffled_groups(
    tables: Iterator[pa.Table], group_size: int, window: int, seed: Sequence[int]
) -> Iterator[pa.Table]:
    """Groups of ``group_size`` rows (the last one smaller), after permuting the rows within
    consecutive windows of about ``window`` rows."""
    rng = np.random.default_rng(list(seed))
    pending: list[pa.Table] = []
    held = 0
    carry = None
    for table in tables:
        pending.append(table)
        held += table.num_rows
        if held >= window:
            carry = yield from _emit(pending, carry, rng, group_size, final=False)
            pending, held = [], 0
    yield from _emit(pending, carry, rng, group_size, final=True)


def _emit(pending, carry, rng, group_size: int, final: bool):
    """Yields the window's full groups (and, when ``final``, the rest); returns the rows left
    over, which open the next window."""
    parts = ([carry] if carry is not None else []) + pending
    if not parts:
        return None
    window = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    window = window.take(rng.permutation(window.num_rows))
    full = window.num_rows - window.num_rows % group_size
    for start in range(0, full, group_size):
        yield window.slice(start, group_size)
    rest = window.slice(full)
    if final and rest.num_rows:
        yield rest
        return None
    return rest if rest.num_rows else None
