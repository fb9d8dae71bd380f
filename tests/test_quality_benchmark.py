"""benchmarks/quality.py's per-user metric (``--splits``' paired comparison) against each
user's list sorted by hand and ``Metric.evaluate``, and against ``evaluate_scores``' mean."""

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recoder_dist.baselines import evaluate_scores
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import per_user  # noqa: E402


def _dataset(seed: int) -> tuple[RecommendationDataset, np.ndarray]:
    generator = np.random.default_rng(seed)
    users, items = 40, 30
    inputs = sp.random(users, items, density=0.2, format="csr", random_state=seed)
    targets = sp.random(users, items, density=0.15, format="csr", random_state=seed + 1)
    targets = targets - targets.multiply(inputs > 0)  # no target item among the input's
    targets.eliminate_zeros()
    inputs.data[:] = 1.0
    targets.data[:] = 1.0
    return RecommendationDataset(inputs, targets), generator.standard_normal((users, items))


@pytest.mark.parametrize("metric", [NDCG(10), Recall(5)])
def test_per_user_values_are_each_users_metric(metric):
    dataset, scores = _dataset(0)
    users = np.flatnonzero(np.diff(dataset.target.indptr))

    def scores_of_users(rows):  # both callers score exactly these users, in this order
        return scores[users]

    values = per_user(scores_of_users, dataset, metric)
    expected = []
    for user in users:
        seen = set(dataset.interactions[user].indices)
        ranked = [i for i in np.argsort(-scores[user], kind="stable") if i not in seen]
        expected.append(metric.evaluate(ranked[: metric.k], dataset.target[user].indices))
    assert len(values) == len(users) < dataset.num_users  # users without a target: left out
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    mean = evaluate_scores(scores_of_users, dataset, [metric])[metric.name]
    assert values.mean() == pytest.approx(mean, abs=1e-12)
