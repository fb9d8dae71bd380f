"""The user x item matrices that training and evaluation read."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class RecommendationDataset:
    """Users' interactions, and optionally the interactions to predict for them.

    Args:
        interactions: users x items sparse matrix (any scipy format). Rows are users, columns
            items; a value is the strength of an interaction (1 for plain implicit feedback).
        target: for evaluation, a matrix of the same shape holding each user's held-out
            interactions; the model sees ``interactions`` and is scored on ``target``.

    Raises:
        TypeError: a matrix is not a scipy sparse matrix.
        ValueError: a matrix is not 2-D, holds NaN or infinite values, or the shapes differ.
    """

    def __init__(self, interactions, target=None):
        self.interactions = _as_csr(interactions, "interactions")
        self.target = None if target is None else _as_csr(target, "target")
        if self.target is not None and self.target.shape != self.interactions.shape:
            raise ValueError(
                f"target shape {self.target.shape} differs from interactions shape "
                f"{self.interactions.shape}: both must be users x items of the same size"
            )

    @property
    def num_users(self) -> int:
        return self.interactions.shape[0]

    @property
    def num_items(self) -> int:
        return self.interactions.shape[1]

    @property
    def users(self) -> np.ndarray:
        """Users (row indices) that have at least one interaction."""
        return np.flatnonzero(np.diff(self.interactions.indptr))

    @property
    def items(self) -> np.ndarray:
        """Items (column indices) that appear in at least one interaction."""
        return np.unique(self.interactions.indices)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index):
        """recsys-recoder 0.4.0's indexing: the users of rows ``index`` (one row, or a sequence
        of rows) as ``(UsersInteractions, UsersInteractions of their targets or None)``.

        Raises:
            TypeError: an index that is not a row number or a sequence of them.
            IndexError: a row outside ``[0, num_users)``.
        """
        from recoder_dist.data.loader import UsersInteractions  # loader imports this module

        users = np.asarray(index).reshape(-1)
        if users.dtype.kind not in "iu":
            raise TypeError(f"index must be a row number or a sequence of them, got {index!r}")
        if users.size and (users.min() < 0 or users.max() >= self.num_users):
            raise IndexError(f"rows must be in [0, {self.num_users}), got {index!r}")
        inputs = UsersInteractions(users, self.interactions[users])
        if self.target is None:
            return inputs, None
        return inputs, UsersInteractions(users, self.target[users])

    def __repr__(self) -> str:
        target = "" if self.target is None else f", target nnz={self.target.nnz}"
        return (
            f"RecommendationDataset({self.num_users} users x {self.num_items} items, "
            f"nnz={self.interactions.nnz}{target})"
        )


def _as_csr(matrix, name: str) -> sp.csr_matrix:
    if not sp.issparse(matrix):
        raise TypeError(f"{name} must be a scipy sparse matrix, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D (users x items), got {matrix.ndim}-D")
    if matrix.dtype.kind == "c":
        raise TypeError(f"{name} holds complex values; interactions are real numbers")
    with np.errstate(over="ignore"):
        csr = sp.csr_matrix(matrix, dtype=np.float32, copy=True)  # sorted and summed below
    if not np.isfinite(csr.data).all():
        # Finite as given, infinite in float32: the cast overflowed (read only on failure).
        if np.isfinite(matrix.tocoo().data).all():
            raise ValueError(f"{name} holds values beyond float32's range (about 3.4e38)")
        raise ValueError(f"{name} holds NaN or infinite values")
    csr.sum_duplicates()  # also sorts the column indices of every row
    csr.eliminate_zeros()
    return csr
