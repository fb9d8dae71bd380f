"""Evaluation splits: held-out users (Mult-VAE "strong generalization") and held-out items of
every user ("weak generalization").

Both draw each user's held-out items the same way: the user's items in a random order, the first
``floor(fraction * n)`` of them held out. All matrices keep the shape of the input matrix; rows of
users outside a part are empty.
"""

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


@dataclass(frozen=True)
class WeakSplit:
    """The same users everywhere, their items split into training, validation and test items.

    ``validation`` has the training items as input (None without validation items); ``test``
    has the training and validation items as input: all of a user's known history is masked.
    """

    train: RecommendationDataset
    validation: RecommendationDataset | None
    test: RecommendationDataset


def strong_generalization_split(
    matrix: sp.csr_matrix,
    *,
    num_val_users: int,
    num_test_users: int,
    target_fraction: float = 0.2,
    min_items: int = 5,
    seed: int = 0,
    drop_unseen_items: bool = False,
) -> StrongSplit:
    """Splits users (rows) of ``matrix`` into training, validation and test users.

    Users with fewer than ``min_items`` interactions are dropped. Each held-out user's items are
    split at random: ``floor(target_fraction * n)`` go to the target, the rest to the input.

    Args:
        drop_unseen_items: first remove the held-out users' interactions with items that no
            training user has (Mult-VAE does: no model trained on the training users can score
            them); ``n`` then counts the remaining items.
    """
    _check_fraction(target_fraction, "target_fraction")
    matrix = sp.csr_matrix(matrix)
    users = np.flatnonzero(np.diff(matrix.indptr) >= min_items)
    check_held_out_users(num_val_users, num_test_users, len(users), min_items)
    rng = np.random.default_rng(seed)
    users = rng.permutation(users)
    test_users = users[:num_test_users]
    val_users = users[num_test_users : num_test_users + num_val_users]
    train_users = users[num_test_users + num_val_users :]

    if drop_unseen_items:
        seen = np.zeros(matrix.shape[1], dtype=bool)
        seen[matrix[train_users].indices] = True
        row_of = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        keep = seen[matrix.indices] | np.isin(row_of, train_users)
        matrix = _entries(matrix, row_of, keep)

    row_of, rank, counts = _random_ranks(matrix, rng)
    is_target = rank < np.floor(target_fraction * counts[row_of])

    def held_out(selected):
        in_rows = np.isin(row_of, selected)
        return RecommendationDataset(
            _entries(matrix, row_of, in_rows & ~is_target),
            _entries(matrix, row_of, in_rows & is_target),
        )

    return StrongSplit(
        train=RecommendationDataset(_entries(matrix, row_of, np.isin(row_of, train_users))),
        validation=held_out(val_users),
        test=held_out(test_users),
    )


def weak_generalization_split(
    matrix: sp.csr_matrix,
    *,
    target_fraction: float = 0.2,
    val_fraction: float = 0.0,
    min_items: int = 5,
    seed: int = 0,
) -> WeakSplit:
    """Splits every user's items into training, validation and test items.

    Users with fewer than ``min_items`` interactions are dropped. Of a user's ``n`` items,
    ``floor(target_fraction * n)`` drawn at random are test items, the next
    ``floor(val_fraction * n)`` validation items, the rest training items.
    """
    _check_fraction(target_fraction, "target_fraction")
    if not 0 <= val_fraction < 1 or target_fraction + val_fraction >= 1:
        raise ValueError(
            f"val_fraction must be >= 0 and leave training items: {val_fraction} "
            f"(target_fraction {target_fraction})"
        )
    matrix = sp.csr_matrix(matrix)
    rng = np.random.default_rng(seed)
    row_of, rank, counts = _random_ranks(matrix, rng)
    kept = counts[row_of] >= min_items
    num_test = np.floor(target_fraction * counts[row_of])
    num_val = np.floor(val_fraction * counts[row_of])
    is_test = kept & (rank < num_test)
    is_val = kept & ~is_test & (rank < num_test + num_val)
    is_train = kept & ~is_test & ~is_val

    train = _entries(matrix, row_of, is_train)
    validation = None
    if val_fraction > 0:
        validation = RecommendationDataset(train, _entries(matrix, row_of, is_val))
    return WeakSplit(
        train=RecommendationDataset(train),
        validation=validation,
        test=RecommendationDataset(
            _entries(matrix, row_of, is_train | is_val), _entries(matrix, row_of, is_test)
        ),
    )


def check_held_out_users(num_val_users: int, num_test_users: int, num_users: int, min_items):
    """A clear error for numbers of held-out users that are negative or leave no training
    user among the ``num_users`` users with ``min_items`` or more items."""
    if num_val_users < 0 or num_test_users < 0:
        raise ValueError(
            f"numbers of held-out users must be >= 0: {num_val_users}, {num_test_users}"
        )
    if num_val_users + num_test_users >= num_users:
        raise ValueError(
            f"{num_val_users} validation + {num_test_users} test users leave no training user "
            f"among the {num_users} users with >= {min_items} items"
        )


def _check_fraction(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _random_ranks(matrix: sp.csr_matrix, rng: np.random.Generator):
    """For every stored entry: its row, its rank within the row under a random order (vectorized
    per-row shuffling), and the number of entries of each row."""
    counts = np.diff(matrix.indptr)
    row_of = np.repeat(np.arange(matrix.shape[0]), counts)
    order = np.lexsort((rng.random(matrix.nnz), row_of))
    rank = np.empty(matrix.nnz, dtype=np.int64)
    rank[order] = np.arange(matrix.nnz) - matrix.indptr[row_of[order]]
    return row_of, rank, counts


def _entries(matrix: sp.csr_matrix, row_of: np.ndarray, keep: np.ndarray) -> sp.csr_matrix:
    """The entries of ``matrix`` where ``keep`` is True, in a matrix of the same shape."""
    return sp.csr_matrix(
        (matrix.data[keep], (row_of[keep], matrix.indices[keep])), shape=matrix.shape
    )
