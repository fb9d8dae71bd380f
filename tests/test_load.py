"""Under load: 10x ml-1m-implicit (users resampled from the real data, so the same item and
activity distribution) trains over 2 workers and evaluates, with worker memory that does not
grow like a dense users x items matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recoder_dist.baselines import Popularity, evaluate_scores
from recoder_dist.datasets import strong_generalization_split
from recoder_dist.metrics import NDCG
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from tests.conftest import shared_data


def run(matrix, scale: int) -> tuple[dict, object, object]:
    """The last epoch's record of a 2-worker run on ``scale`` x the users, the trained
    Recoder and the split."""
    rng = np.random.default_rng(0)
    users = matrix[rng.integers(0, matrix.shape[0], scale * matrix.shape[0])]
    split = strong_generalization_split(users, num_val_users=0, num_test_users=600 * scale)
    recoder = Recoder(
        DynamicAutoencoder([200], "tanh", noise_prob=0.5, sparse=True),
        optimizer_type="adam",
        loss="logloss",
        num_workers=2,
        seed=0,
    )
    history = recoder.train(split.train, batch_size=500, num_epochs=2, negative_sampling=True)
    return history[-1], recoder, split


@pytest.mark.slow
def test_ten_times_ml1m_trains_and_evaluates_in_bounded_memory(ray_session):
    events = pd.read_csv(shared_data("ml-1m-implicit") / "interactions.csv")
    matrix = sp.csr_matrix((np.ones(len(events), np.float32), (events.user, events.item)))
    small, _, _ = run(matrix, 1)
    large, recoder, split = run(matrix, 10)
    results = recoder.evaluate(split.test, 100, [NDCG(k=100)])
    # A model that learned nothing about its users ranks no better than the items' popularity
    # (both measured on this split: benchmarks/RESULTS.md, "the bound of tests/test_load.py").
    popular = evaluate_scores(
        Popularity().fit(split.train.interactions).scores, split.test, [NDCG(k=100)]
    )
    assert results["eval_users"] == popular["eval_users"] == 6000
    assert results["NDCG@100"] > 1.25 * popular["NDCG@100"]
    print(
        f"worker RSS, 1x / 10x: peak {small['peak_rss_mb']:.0f} / {large['peak_rss_mb']:.0f} MB,"
        f" private {small['private_rss_mb']:.0f} / {large['private_rss_mb']:.0f} MB"
    )
    # Neither the peak (which counts the object store's pages that a worker has read its rows
    # from) nor the private memory grows like a dense 59,490 x 2,810 float32 matrix (638 MB).
    # The private memory of a multi-worker run also climbs with the steps taken (the 10x run
    # takes 10x the steps; benchmarks/RESULTS.md, "a worker's private memory"), so it cannot
    # tell a worker that keeps its share of the rows (20 MB) from that climb at this size.
    dense_mb = 10 * matrix.shape[0] * matrix.shape[1] * 4 / 2**20
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < dense_mb / 2
    assert large["private_rss_mb"] - small["private_rss_mb"] < dense_mb / 2
