"""Runs a function on ``world`` gloo processes (torch.multiprocessing), for the sharded tests.

The function runs as ``fn(rank, world, *args)`` with the default process group initialized;
an exception in any process fails the caller with its traceback.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import scipy.sparse as sp
import torch

# An optimizer's constructor imports torch._dynamo (seconds): once here, in the parent, so that
# the forked ranks inherit it rather than each importing it.
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recoder_dist.sharded import comm
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.state import map_optimizer_rows, table_names
from recoder_dist.sharded.tables import CHUNK_ROWS


def run_ranks(world: int, fn, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` processes joined by a gloo group."""
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        # fork: the children reuse the imported torch (a spawn re-imports it, seconds each).
        mp.start_processes(
            _entry, args=(world, store, fn, args), nprocs=world, join=True, start_method="fork"
        )


def _entry(rank, world, store, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def interactions(num_users: int, num_items: int, touched: int, seed: int = 0) -> sp.csr_matrix:
    """A random binary users x items matrix whose entries fall in the first ``touched`` items
    (the rest of the catalog is never touched), every user with 1 to 5 items, rated 1-3."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for user in range(num_users):
        items = rng.choice(touched, size=rng.integers(1, 6), replace=False)
        rows += [user] * len(items)
        cols += list(items)
    values = rng.integers(1, 4, size=len(rows)).astype(np.float32)
    matrix = sp.csr_matrix((values, (rows, cols)), shape=(num_users, num_items))
    matrix.sort_indices()
    return matrix


def split(sizes: list[int], rank: int) -> slice:
    """Rank ``rank``'s users of a global batch dealt out in rank order, ``sizes`` a rank."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def rank_entries(matrix: sp.csr_matrix, users: np.ndarray):
    """``(rows, items, values, num_users)`` of the users' rows, as torch tensors."""
    block = matrix[users]
    counts = np.diff(block.indptr)
    rows = torch.from_numpy(np.repeat(np.arange(len(users)), counts).astype(np.int64))
    items = torch.from_numpy(block.indices.astype(np.int64))
    return rows, items, torch.from_numpy(block.data.astype(np.float32)), len(users)


def assert_equal_states(actual, expected, where="state") -> None:
    """Nested states (dicts of tensors and values) equal to the bit, sparse or dense."""
    if torch.is_tensor(expected):
        assert torch.equal(actual.to_dense(), expected.to_dense()), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_equal_states(actual[key], expected[key], f"{where}/{key}")
    else:
        assert actual == expected, where


# The whole state gathered from the shards by collectives: the tests' reference for what the
# shard files hold and for the sharded steps against one process (the package itself never
# gathers a model: checkpoints are written shard by shard).


@torch.no_grad()
def gather_full_rows(
    rows: torch.Tensor,
    ownership: Ownership,
    dst: int | None = 0,
    group=None,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor | None:
    """A per-item tensor (a table, or its optimizer's moments) whole, on the CPU, from every
    rank's ``rows`` under ``ownership``: on rank ``dst`` of ``group`` (every rank when None;
    None elsewhere). A collective: every rank calls it.

    The rows travel ``chunk_rows`` of a shard at a time and go to the CPU as they arrive: the
    whole table is never on a device (a GPU's collectives need device tensors), only
    ``world x chunk_rows`` of its rows."""
    rank, world = comm.rank_and_world(group)
    receives = dst in (None, rank)
    full = None
    if receives:
        full = torch.empty((ownership.num_items, *rows.shape[1:]), dtype=rows.dtype)
    longest = ownership.rows_of(0)  # gather needs equal sizes: pad to the longest shard
    for start in range(0, longest, chunk_rows):
        stop = min(start + chunk_rows, longest)
        padded = rows.new_zeros((stop - start, *rows.shape[1:]))
        mine = rows[start:stop]
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(world)] if receives else None
        if dst is None:
            dist.all_gather(parts, padded, group=group)
        else:
            dist.gather(
                padded, parts, dst=dist.get_global_rank(group, dst) if group else dst, group=group
            )
        if receives:
            for owner, part in enumerate(parts):
                count = max(0, min(ownership.rows_of(owner), stop) - start)
                # Owner's local row j is item j * world + owner.
                full[start * world + owner :: world][:count] = part[:count].cpu()
    return full


def gathered_state(model: nn.Module, dst: int | None = 0) -> dict | None:
    """The whole model's ``state_dict`` on rank ``dst`` (every rank when None; None elsewhere),
    on the CPU (see ``gather_full_rows``). A collective: every rank of the shards' group calls
    it."""
    tables = table_names(model)
    state, gathered = model.state_dict(), {}
    full = {}
    for key, value in state.items():
        if key in tables:
            table = tables[key]
            if id(table) not in gathered:  # a tied table once
                gathered[id(table)] = gather_full_rows(
                    value, table.ownership, dst, getattr(model, "group", None)
                )
            value = gathered[id(table)]
        full[key] = value
    if dst is not None and _rank(model) != dst:
        return None
    return {key: value.cpu() for key, value in full.items()}


def gathered_optimizer_state(optimizers, model: nn.Module, dst: int | None = 0) -> dict | None:
    """The whole model's optimizers' state on rank ``dst`` (every rank when None; None
    elsewhere); the per-item rows on the CPU (see ``gather_full_rows``), the rest where the
    optimizers keep it. A collective: every rank of the shards' group calls it."""
    group = getattr(model, "group", None)
    state = map_optimizer_rows(
        optimizers.state_dict(),
        optimizers,
        model,
        lambda value, table, key: gather_full_rows(value, table.ownership, dst, group),
    )
    return state if dst is None or _rank(model) == dst else None


def _rank(model: nn.Module) -> int:
    return next(iter(table_names(model).values())).rank
