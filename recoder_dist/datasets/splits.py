"""Held-out-user splits (Mult-VAE "strong generalization")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recoder_dist.data.dataset import RecommendationDataset


@dataclass(frozen=True)
class StrongSplit:
    """Training users, and held-out users whose items are split into input and target."""

    train: RecommendationDataset
    validation: RecommendationDataset
    test: RecommendationDataset


def strong_generalization_split(
    matrix: sp.csr_matrix,
    *,
    num_val_users: int,
    num_test_users: int,
    target_fraction: float = 0.2,
    min_items: int = 5,
    seed: int = 0,
) -> StrongSplit:
    """Splits users (rows) of ``matrix`` into training, validation and test users.

    Users with fewer than ``min_items`` interactions are dropped. Each held-out user's items are
    split at random: ``floor(target_fraction * n)`` go to the target, the rest to the input.
    All matrices keep the shape of ``matrix``; rows of other users are empty.
    """
    matrix = sp.csr_matrix(matrix)
    counts = np.diff(matrix.indptr)
    users = np.flatnonzero(counts >= min_items)
    if num_val_users + num_test_users >= len(users):
        raise ValueError(
            f"{num_val_users} validation + {num_test_users} test users leave no training user "
            f"among the {len(users)} users with >= {min_items} items"
        )
    rng = np.random.default_rng(seed)
    users = rng.permutation(users)
    test_users = users[:num_test_users]
    val_users = users[num_test_users : num_test_users + num_val_users]
    train_users = users[num_test_users + num_val_users :]

    # Rank of every entry within its row under a random order: vectorized per-row shuffling.
    row_of = np.repeat(np.arange(matrix.shape[0]), counts)
    order = np.lexsort((rng.random(matrix.nnz), row_of))
    rank = np.empty(matrix.nnz, dtype=np.int64)
    rank[order] = np.arange(matrix.nnz) - matrix.indptr[row_of[order]]
    is_target = rank < np.floor(target_fraction * counts[row_of])

    def rows(selected, entries=None):
        keep = np.isin(row_of, selected)
        if entries is not None:
            keep &= entries
        return sp.csr_matrix(
            (matrix.data[keep], (row_of[keep], matrix.indices[keep])), shape=matrix.shape
        )

    def held_out(selected):
        return RecommendationDataset(rows(selected, ~is_target), rows(selected, is_target))

    return StrongSplit(
        train=RecommendationDataset(rows(train_users)),
        validation=held_out(val_users),
        test=held_out(test_users),
    )
