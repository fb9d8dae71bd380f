"""Closed-form baselines, popularity and EASE, scored by the project's own evaluation code.

Each baseline has ``fit(matrix)`` (users x items, the training users) and
``scores(rows) -> np.ndarray`` (one row of item scores per row of a users x items CSR input).
:func:`evaluate_scores` runs any such scorer through the same top-k and metric code as
``Recoder.evaluate`` (``recoder_dist.training.evaluation.scoring.metric_sums``), so the numbers
compare.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from recoder_dist.data.collator import UserRows
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.metrics import Metric
from recoder_dist.training.evaluation.scoring import check_metrics, metric_sums


class Popularity:
    """Scores every item by the number of training users that have it, for every user."""

    def fit(self, matrix) -> Popularity:
        matrix = _binary(matrix)
        self.counts = np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()
        return self

    def scores(self, rows) -> np.ndarray:
        rows = _csr(rows, len(self.counts))
        return np.tile(self.counts.astype(np.float32), (rows.shape[0], 1))


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck, WWW 2019): an item-item matrix ``B`` with
    ``B = I - P / diag(P)``, ``P = (X^T X + lambda I)^-1``, ``diag(B) = 0``; a user's scores are
    ``x B``.

    Memory: one dense float64 items x items matrix, inverted in place (8 * items^2 bytes: 2,810
    items 63 MB, 20,000 items 3.2 GB, Gowalla's 40,981 items 13.4 GB), plus, while ``X^T X`` is
    built, a slab of 1,024 of its columns (at most 20 * 1,024 * items bytes). Time grows as
    items^3. ``fit`` refuses more than ``max_items`` items.

    Args:
        lam: the L2 regularization lambda (Steck: 500 on ML-20M, 200 on Netflix).
        max_items: the largest catalog ``fit`` accepts.
    """

    def __init__(self, lam: float = 500.0, *, max_items: int = 25_000):
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        self.lam = float(lam)
        self.max_items = max_items

    def fit(self, matrix) -> EASE:
        """Fits ``B`` on a users x items matrix (values as given; 0/1 for implicit feedback)."""
        matrix = _csr(matrix)
        num_items = matrix.shape[1]
        if num_items > self.max_items:
            gigabytes = 8 * num_items**2 / 1e9
            raise ValueError(
                f"EASE on {num_items:,} items needs a dense {num_items:,} x {num_items:,} "
                f"inverse (~{gigabytes:.1f} GB): above max_items={self.max_items:,}; raise "
                "max_items if the machine has the memory"
            )
        gram = _gram(matrix.astype(np.float64))
        gram[np.diag_indices(num_items)] += self.lam
        # X^T X + lambda I is symmetric positive definite: Cholesky, then its inverse, in place.
        # LAPACK wants Fortran order; the transpose of the C-ordered array is that (no copy),
        # and it is the same matrix. potri fills only the upper triangle of that view.
        factor, info = scipy.linalg.lapack.dpotrf(gram.T, lower=False, overwrite_a=True)
        if info != 0:
            raise ValueError(f"X^T X + lambda I is not positive definite (LAPACK info {info})")
        inverse, info = scipy.linalg.lapack.dpotri(factor, lower=False, overwrite_c=True)
        if info != 0:
            raise ValueError(f"inverting X^T X + lambda I failed (LAPACK info {info})")
        inverse = inverse.T  # back to the C-ordered buffer, whose lower triangle holds P
        _fill_upper_from_lower(inverse)
        diagonal = np.diag(inverse).copy()
        inverse /= -diagonal  # B[i, j] = -P[i, j] / P[j, j]
        np.fill_diagonal(inverse, 0.0)
        self.weights = inverse
        return self

    def scores(self, rows) -> np.ndarray:
        rows = _csr(rows, self.weights.shape[0])
        return np.asarray(rows @ self.weights, dtype=np.float32)


def evaluate_scores(
    score_fn: Callable[[sp.csr_matrix], np.ndarray],
    dataset: RecommendationDataset,
    metrics: list[Metric],
    k: int | None = None,
    *,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Evaluates a scorer on ``dataset``'s users with targets, as ``Recoder.evaluate`` does.

    Args:
        score_fn: maps a users x items CSR input to a dense users x items array of scores
            (e.g. ``EASE(...).fit(train).scores``).
        dataset: inputs and targets.
        metrics: the metrics.
        k: the length of the recommendation lists (default: the largest metric k).
        batch_size: users scored at once.

    Returns:
        ``{metric name: mean over users}``, and ``eval_users``: how many users counted.
    """
    if dataset.target is None:
        raise ValueError("evaluation needs a dataset with targets")
    k = check_metrics(metrics, k)
    model = _Scorer(score_fn, dataset.num_items)
    users = np.flatnonzero(np.diff(dataset.target.indptr))
    sums, count = np.zeros(len(metrics)), 0
    for start in range(0, len(users), batch_size):
        block = users[start : start + batch_size]
        batch_sums, batch_count = metric_sums(
            model,
            UserRows.from_csr(dataset.interactions, block),
            UserRows.from_csr(dataset.target, block),
            list(metrics),
            k,
            dataset.num_items,
            torch.device("cpu"),
        )
        sums += batch_sums
        count += batch_count
    results = {
        m.name: float(sums[i] / count) if count else float("nan") for i, m in enumerate(metrics)
    }
    results["eval_users"] = count
    return results


class _Scorer(torch.nn.Module):
    """A scorer in the shape of a model: ``forward`` gets the dense input rows."""

    def __init__(self, score_fn, num_items: int):
        super().__init__()
        self.score_fn = score_fn
        self.num_items = num_items

    def forward(self, input, input_users=None, target_users=None, **_):
        scores = np.array(self.score_fn(sp.csr_matrix(input.cpu().numpy())), dtype=np.float32)
        if scores.shape != tuple(input.shape):
            raise ValueError(f"scores have shape {scores.shape}, expected {tuple(input.shape)}")
        return torch.from_numpy(scores)


def _gram(matrix: sp.csr_matrix, block: int = 1024) -> np.ndarray:
    """``X^T X`` as a dense C-ordered array, a block of columns at a time: the sparse product
    of a whole dense-ish Gram matrix would take 12 bytes per entry on top of the 8 dense ones."""
    num_items = matrix.shape[1]
    items_by_users = matrix.T.tocsr()
    columns = matrix.tocsc()
    gram = np.empty((num_items, num_items), dtype=np.float64)
    for start in range(0, num_items, block):
        stop = min(start + block, num_items)
        gram[:, start:stop] = (items_by_users @ columns[:, start:stop]).toarray()
    return gram


def _fill_upper_from_lower(square: np.ndarray, block: int = 1024) -> None:
    """Makes ``square`` symmetric from its lower triangle, in place, a block of rows at a time
    (index arrays over the whole triangle would cost more memory than the matrix)."""
    n = square.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        diagonal = square[start:stop, start:stop]
        diagonal[...] = np.tril(diagonal) + np.tril(diagonal, -1).T
        square[start:stop, stop:] = square[stop:, start:stop].T


def _csr(matrix, num_items: int | None = None) -> sp.csr_matrix:
    if not sp.issparse(matrix):
        raise TypeError(
            f"expected a scipy sparse users x items matrix, got {type(matrix).__name__}"
        )
    matrix = sp.csr_matrix(matrix)
    if num_items is not None and matrix.shape[1] != num_items:
        raise ValueError(f"rows have {matrix.shape[1]} items, the model was fit on {num_items}")
    return matrix


def _binary(matrix) -> sp.csr_matrix:
    matrix = _csr(matrix).copy()
    matrix.eliminate_zeros()
    matrix.data[:] = 1.0
    return matrix
