"""Popularity and EASE against direct references, evaluated by the project's evaluation code."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp

from recoder_dist.baselines import EASE, Popularity, evaluate_scores
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.datasets import load_events, strong_generalization_split
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.utils import dataframe_to_csr_matrix
from tests.conftest import shared_data
from tests.ml100k import naive_ndcg


def direct_ease(dense: np.ndarray, lam: float) -> np.ndarray:
    """Steck (2019), literally: P = (X^T X + lambda I)^-1, B = I - P / diag(P), diag(B) = 0."""
    num_items = dense.shape[1]
    p = np.linalg.inv(dense.T @ dense + lam * np.eye(num_items))
    b = np.eye(num_items) - p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("lam, binary", [(0.5, True), (30.0, False)])
def test_ease_matches_a_direct_numpy_implementation(lam, binary):
    # 1,030 items: more than one 1,024-column block in the Gram and symmetrization loops.
    rng = np.random.default_rng(7)
    shape = (300, 1030)
    dense = (rng.random(shape) < 0.05) * (1.0 if binary else rng.integers(1, 5, shape))
    matrix = sp.csr_matrix(dense)
    ease = EASE(lam).fit(matrix)
    expected = direct_ease(dense, lam)
    assert np.allclose(ease.weights, expected, rtol=1e-7, atol=1e-10)
    rows = matrix[:40]
    assert np.allclose(ease.scores(rows), dense[:40] @ expected, rtol=1e-5, atol=1e-6)


def test_ease_refuses_catalogs_above_max_items():
    with pytest.raises(ValueError, match=r"max_items=100"):
        EASE(max_items=100).fit(sp.csr_matrix((3, 101)))
    # Gowalla's catalog with the default limit: refused before anything is allocated.
    with pytest.raises(ValueError, match=r"40,981 items .*~13\.4 GB"):
        EASE().fit(sp.csr_matrix((1, 40_981)))
    with pytest.raises(ValueError, match="items"):
        EASE().fit(sp.csr_matrix(np.eye(3))).scores(sp.csr_matrix((1, 4)))


# Training users' items; counted by hand: item 0 by 4 users, 1 by 1, 2 by 0, 3 by 2, 4 by 3.
TRAIN = sp.csr_matrix(
    np.array(
        [
            [1, 0, 0, 1, 5],  # a value of 5 still counts one user
            [1, 0, 0, 0, 1],
            [1, 0, 0, 1, 1],
            [2, 1, 0, 0, 0],
        ],
        dtype=np.float32,
    )
)


def test_popularity_counts_users_by_hand():
    popularity = Popularity().fit(TRAIN)
    assert popularity.counts.tolist() == [4, 1, 0, 2, 3]
    scores = popularity.scores(sp.csr_matrix((2, 5)))
    assert scores.shape == (2, 5) and (scores == [4, 1, 0, 2, 3]).all()


def test_evaluate_scores_on_a_hand_worked_example():
    # Ranking by popularity: 0, 4, 3, 1, 2; each user's own items are never recommended.
    inputs = np.zeros((3, 5))
    targets = np.zeros((3, 5))
    inputs[0, 0], targets[0, 3] = 1, 1  # top 4: 4, 3, 1, 2 -> hit at rank 2
    inputs[1, 3], targets[1, [1, 2]] = 1, 1  # top 4: 0, 4, 1, 2 -> hits at ranks 3, 4
    inputs[2, 1] = 1  # no target: not counted
    dataset = RecommendationDataset(sp.csr_matrix(inputs), sp.csr_matrix(targets))
    result = evaluate_scores(Popularity().fit(TRAIN).scores, dataset, [Recall(2), NDCG(4)])
    ndcg_0 = 1 / np.log2(3)
    ndcg_1 = (1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    assert result["eval_users"] == 2
    assert result["Recall@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert result["NDCG@4"] == pytest.approx((ndcg_0 + ndcg_1) / 2)


@functools.cache
def ml1m_split():
    events = load_events(shared_data("ml-1m-implicit") / "interactions.csv")
    matrix = dataframe_to_csr_matrix(events, "user", "item", "value")[0]
    return strong_generalization_split(matrix, num_val_users=600, num_test_users=600, seed=0)


def test_ease_and_popularity_on_ml1m_implicit():
    split = ml1m_split()
    ease = EASE(500.0).fit(split.train.interactions)
    popularity = Popularity().fit(split.train.interactions)
    metrics = [Recall(20), Recall(50), NDCG(100)]
    test = split.test

    results = evaluate_scores(ease.scores, test, metrics)
    print("EASE lambda=500, ml-1m-implicit test users:", results)
    assert results["eval_users"] == 600
    # The project's top-k/metric code agrees with a plain loop over the same scores.
    reference = naive_ndcg(lambda user: ease.scores(test.interactions[user])[0], test)
    assert results["NDCG@100"] == pytest.approx(reference, abs=1e-6)
    assert evaluate_scores(ease.scores, test, metrics, batch_size=128) == pytest.approx(results)
    # Measured: NDCG@100 0.4327, Recall@20 0.3715, Recall@50 0.4792 (Mult-VAE reports EASE
    # 0.420 NDCG@100 on ML-20M); deterministic up to floating-point ties.
    assert results["NDCG@100"] == pytest.approx(0.4327, abs=0.002)
    assert results["Recall@20"] == pytest.approx(0.3715, abs=0.002)
    assert results["Recall@50"] == pytest.approx(0.4792, abs=0.002)

    pop = evaluate_scores(popularity.scores, test, metrics)
    print("popularity, ml-1m-implicit test users:", pop)
    # Measured: NDCG@100 0.2246, Recall@20 0.1782, Recall@50 0.2515.
    assert pop["NDCG@100"] == pytest.approx(0.2246, abs=0.002)
    assert results["NDCG@100"] - pop["NDCG@100"] > 0.2
