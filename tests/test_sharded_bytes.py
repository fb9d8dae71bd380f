"""benchmarks/sync_bytes.py's count of the sharded path's bytes against the bytes that the
implementation hands to the collectives in a real step on 3 gloo ranks (forward, backward and
the dense layers' all-reduce), counted per rank as each collective sends them off the rank:
the autoencoder's step, and MatrixFactorization's (its users' rows from their owners)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.factorization import ShardedFactorization
from tests.sharded_harness import interactions, rank_entries, run_ranks, split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sync_bytes import sharded_bytes  # noqa: E402

HIDDEN, SIZES = 6, [5, 2, 4]


def _count_collectives(world, sent):
    """Wraps the collectives that the sharded path calls, adding each call's bytes sent off the
    rank (ring all-gather and all-reduce, as the counter assumes) to ``sent[0]``."""
    originals = dist.all_gather, dist.all_to_all_single, dist.all_reduce

    def all_gather(parts, tensor, **kwargs):
        sent[0] += (world - 1) * tensor.numel() * tensor.element_size()
        return originals[0](parts, tensor, **kwargs)

    def all_to_all_single(out, tensor, output_split_sizes=None, input_split_sizes=None, **kw):
        splits = input_split_sizes or [len(tensor) // world] * world
        row = tensor[0].numel() * tensor.element_size() if len(tensor) else 0
        sent[0] += (sum(splits) - splits[dist.get_rank()]) * row
        return originals[1](out, tensor, output_split_sizes, input_split_sizes, **kw)

    def all_reduce(tensor, *args, **kwargs):
        sent[0] += 2 * (world - 1) / world * tensor.numel() * tensor.element_size()
        return originals[2](tensor, *args, **kwargs)

    dist.all_gather, dist.all_to_all_single, dist.all_reduce = (
        all_gather,
        all_to_all_single,
        all_reduce,
    )


def _count(rank, world, factorization=False):
    matrix = interactions(11, 23, 19, seed=4)
    # MF reads its users' rows: ids out of rank order, so that some are on their owner's rank
    users = np.array([7, 2, 9, 0, 4, 10, 3, 5, 1, 8, 6]) if factorization else np.arange(11)
    sent = [0.0]
    _count_collectives(world, sent)
    mine = users[split(SIZES, rank)]
    rows, items, values, num_users = rank_entries(matrix, mine)
    if factorization:
        model = ShardedFactorization(23, 11, HIDDEN)
        share, _ = model.loss(
            rows, items, values, num_users, users=torch.from_numpy(mine), loss="logloss"
        )
    else:
        model = ShardedAutoencoder(23, [HIDDEN])
        share, _ = model.loss(rows, items, values, num_users, loss="logloss")
    share.backward()
    model.all_reduce_dense_grads()
    expected = sharded_bytes(
        matrix[users], SIZES, hidden=HIDDEN, users=users if factorization else None
    )
    total = sum(expected[key][rank] for key in ("entries", "partials", "codes", "stats"))
    total += expected["small"]
    if not np.isclose(sent[0], total):
        raise AssertionError(f"rank {rank}: sent {sent[0]} bytes, the counter says {total}")


def test_counted_bytes_are_the_implementation_s():
    torch.manual_seed(0)
    run_ranks(3, _count)


def test_counted_bytes_are_the_implementation_s_for_matrix_factorization():
    torch.manual_seed(0)
    run_ranks(3, _count, True)
