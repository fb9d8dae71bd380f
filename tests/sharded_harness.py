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
