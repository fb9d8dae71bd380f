"""MovieLens 100K for the tests: ratings >= 4 as implicit feedback, held-out users."""

from __future__ import annotations

import functools

import numpy as np

from recoder_dist.datasets import load_ml100k, strong_generalization_split
from recoder_dist.utils import dataframe_to_csr_matrix
from tests.conftest import shared_data


@functools.cache
def _split(seed: int):
    ratings = load_ml100k(shared_data("ml-100k"))
    positives = ratings[ratings.rating >= 4].assign(value=1.0)
    matrix, _, _ = dataframe_to_csr_matrix(positives, "user", "item", "value")
    return strong_generalization_split(matrix, num_val_users=100, num_test_users=150, seed=seed)


def ml100k_split(seed: int = 0):
    """Train users, and validation/test users with 80/20 fold-in."""
    return _split(seed)


def naive_ndcg(score_user, dataset, k: int = 100) -> float:
    """Mean NDCG@k over the users with targets, by a plain loop: an independent reference
    for the library's vectorized, distributed evaluation."""
    values = []
    for user in np.flatnonzero(np.diff(dataset.target.indptr)):
        scores = np.asarray(score_user(user), dtype=np.float64).copy()
        scores[dataset.interactions[user].indices] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        relevant = set(dataset.target[user].indices.tolist())
        dcg = sum(1 / np.log2(rank + 2) for rank, item in enumerate(top) if item in relevant)
        ideal = sum(1 / np.log2(rank + 2) for rank in range(min(k, len(relevant))))
        values.append(dcg / ideal)
    return float(np.mean(values))
