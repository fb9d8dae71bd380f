"""Ranking metrics against hand-worked values and a naive per-user loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from recoder_dist.metrics import (
    NDCG,
    AveragePrecision,
    Metric,
    Recall,
    average_precision,
    dcg,
    ndcg,
    recall,
)

L3 = math.log2(3)  # 1 / L3 is the discount of rank 2


def naive_recall(x, y, k, normalize):
    """Hits among the first k, over min(k, |y|) or |y|."""
    hits = sum(1 for item in x[:k] if item in y)
    return hits / (min(k, len(y)) if normalize else len(y))


def naive_ndcg(x, y, k):
    """Sum of 1/log2(rank+1) over hits, over the same sum for a perfect list."""
    dcg = sum(1 / math.log2(i + 2) for i, item in enumerate(x[:k]) if item in y)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(y))))
    return dcg / ideal


def naive_ap(x, y, k, normalize):
    """Sum of precision@rank at each hit in the first k, over min(k, |y|) or |y|."""
    total, hits = 0.0, 0
    for i, item in enumerate(x[:k]):
        if item in y:
            hits += 1
            total += hits / (i + 1)
    return total / (min(k, len(y)) if normalize else len(y))


def naive(metric, x, y):
    """The naive value of a built-in metric for one user."""
    if isinstance(metric, Recall):
        return naive_recall(x, y, metric.k, metric.normalize)
    if isinstance(metric, NDCG):
        return naive_ndcg(x, y, metric.k)
    return naive_ap(x, y, metric.k, metric.normalize)


def hits_matrix(recommended, relevant):
    """hits[u, i] = the i-th recommendation of user u is relevant, by a plain loop."""
    return np.array([[item in rel for item in recs] for recs, rel in zip(recommended, relevant)])


def random_users(num_users, list_length, num_items, seed):
    """Random distinct recommendation lists and non-empty relevant sets."""
    rng = np.random.default_rng(seed)
    recommended = np.array(
        [rng.choice(num_items, size=list_length, replace=False) for _ in range(num_users)]
    )
    relevant = [
        set(rng.choice(num_items, size=rng.integers(1, 15), replace=False).tolist())
        for _ in range(num_users)
    ]
    return recommended, relevant


# One user: x = [10, 20, 30, 40, 50], y = {20, 40, 99}; hits at ranks 2 and 4, |y| = 3.
X = [10, 20, 30, 40, 50]
Y = [20, 40, 99]
HAND_WORKED = [
    # k=2: one hit (rank 2). Recall 1/min(2,3) = 1/2, or 1/3 unnormalized.
    (Recall(2), 1 / 2),
    (Recall(2, normalize=False), 1 / 3),
    # k=5: two hits. Recall 2/min(5,3) = 2/3 either way.
    (Recall(5), 2 / 3),
    (Recall(5, normalize=False), 2 / 3),
    # k=2: DCG = 1/log2(3); ideal (2 relevant slots) = 1 + 1/log2(3).
    (NDCG(2), (1 / L3) / (1 + 1 / L3)),
    # k=5: DCG = 1/log2(3) + 1/log2(5); ideal (3 relevant) = 1 + 1/log2(3) + 1/log2(4).
    (NDCG(5), (1 / L3 + 1 / math.log2(5)) / (1 + 1 / L3 + 1 / 2)),
    # k=2: precision@2 = 1/2 at the hit; AP = 0.5/min(2,3) = 1/4, or 0.5/3 = 1/6.
    (AveragePrecision(2), 1 / 4),
    (AveragePrecision(2, normalize=False), 1 / 6),
    # k=5: precisions 1/2 (rank 2) and 2/4 (rank 4) sum to 1; AP = 1/3 either way.
    (AveragePrecision(5), 1 / 3),
    (AveragePrecision(5, normalize=False), 1 / 3),
]


@pytest.mark.parametrize(("metric", "expected"), HAND_WORKED, ids=lambda v: str(v))
def test_hand_worked(metric, expected):
    """evaluate(x, y) and evaluate_hits give the hand-computed value."""
    assert metric.evaluate(X, Y) == pytest.approx(expected, rel=1e-12)
    hits = np.array([[False, True, False, True, False]])
    assert metric.evaluate_hits(hits, np.array([3]))[0] == pytest.approx(expected, rel=1e-12)


# One relevant item at rank 3 of 4, k=4: Recall 1/min(4,1) = 1 but 1/1 = 1 unnormalized too;
# NDCG = (1/log2(4)) / 1 = 1/2; AP = (1/3) / 1 = 1/3.
FEW_RELEVANT = [(Recall(4), 1.0), (NDCG(4), 0.5), (AveragePrecision(4), 1 / 3)]


@pytest.mark.parametrize(("metric", "expected"), FEW_RELEVANT, ids=lambda v: str(v))
def test_fewer_relevant_than_k(metric, expected):
    """With |relevant| < k the ideal list has |relevant| hits."""
    assert metric.evaluate([7, 8, 9, 10], [9]) == pytest.approx(expected, rel=1e-12)


ALL_METRICS = [
    Recall(1),
    Recall(5),
    Recall(5, normalize=False),
    Recall(20),
    Recall(20, normalize=False),
    NDCG(1),
    NDCG(5),
    NDCG(20),
    AveragePrecision(1),
    AveragePrecision(5),
    AveragePrecision(5, normalize=False),
    AveragePrecision(20),
    AveragePrecision(20, normalize=False),
]


@pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
def test_perfect_and_empty_lists(metric):
    """All relevant items on top gives 1; no hit gives 0."""
    relevant = list(range(100, 100 + metric.k))
    assert metric.evaluate(relevant + [1, 2], relevant) == pytest.approx(1.0, rel=1e-12)
    assert metric.evaluate([1, 2, 3], relevant) == 0.0


@pytest.mark.parametrize("list_length", [1, 5, 10, 30])
@pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
def test_random_users_match_naive_loop(metric, list_length):
    """Vectorized evaluate_hits, evaluate_lists and evaluate equal the naive loop per user,
    for lists shorter than, equal to and longer than k."""
    recommended, relevant = random_users(200, list_length, 40, seed=list_length)
    expected = np.array([naive(metric, list(x), y) for x, y in zip(recommended, relevant)])
    hits = hits_matrix(recommended, relevant)
    num_relevant = np.array([len(y) for y in relevant])
    got = metric.evaluate_hits(hits, num_relevant)
    assert got.shape == (200,)
    assert np.allclose(got, expected, rtol=1e-12, atol=0)
    assert np.allclose(metric.evaluate_lists(recommended, relevant), expected, rtol=1e-12, atol=0)
    singles = [metric.evaluate(x, sorted(y)) for x, y in zip(recommended[:20], relevant[:20])]
    assert np.allclose(singles, expected[:20], rtol=1e-12, atol=0)


def test_normalize_changes_only_large_relevant_sets():
    """normalize=True and False agree when |relevant| <= k; beyond, they differ by |rel| / k."""
    recommended, relevant = random_users(300, 10, 40, seed=7)
    hits = hits_matrix(recommended, relevant)
    num_relevant = np.array([len(y) for y in relevant])
    small = num_relevant <= 5
    assert 0 < small.sum() < len(small)
    for cls in (Recall, AveragePrecision):
        normalized = cls(5).evaluate_hits(hits, num_relevant)
        plain = cls(5, normalize=False).evaluate_hits(hits, num_relevant)
        np.testing.assert_array_equal(normalized[small], plain[small])
        scale = num_relevant / 5  # |rel| / min(5, |rel|) when |rel| > 5
        assert np.allclose(normalized[~small], plain[~small] * scale[~small], rtol=1e-12, atol=0)


class HitRate(Metric):
    """1 when any of the first k recommendations is relevant; defines only evaluate(x, y)."""

    def __init__(self, k):
        super().__init__(f"HitRate@{k}", k)

    def evaluate(self, x, y):
        return float(any(item in set(y) for item in list(x)[: self.k]))


def test_custom_metric_via_evaluate_lists():
    """A Metric with only evaluate(x, y) works through evaluate_lists and is not vectorized."""
    metric = HitRate(3)
    assert not metric.vectorized
    recommended = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    relevant = [[4, 3], [8], [9]]  # hit at rank 3; hit only at rank 4 (past k); hit at rank 1
    np.testing.assert_array_equal(metric.evaluate_lists(recommended, relevant), [1.0, 0.0, 1.0])
    assert metric.name == str(metric) == "HitRate@3"


def test_base_metric_without_implementation():
    """A Metric defining neither method says so when evaluated."""
    metric = Metric("nothing")
    assert not metric.vectorized
    with pytest.raises(NotImplementedError, match="implements neither"):
        metric.evaluate([1], [1])


@pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
def test_builtins_are_vectorized(metric):
    """The built-in metrics define evaluate_hits."""
    assert metric.vectorized


def test_names():
    """Metric names carry the class and k."""
    assert [str(m) for m in (Recall(5), NDCG(10), AveragePrecision(3))] == [
        "Recall@5",
        "NDCG@10",
        "AveragePrecision@3",
    ]
    assert NDCG(10) == NDCG(10) and hash(NDCG(10)) == hash(NDCG(10))
    assert NDCG(10) != NDCG(5) and NDCG(10) != "NDCG@10"


@pytest.mark.parametrize("cls", [Recall, NDCG, AveragePrecision, HitRate])
@pytest.mark.parametrize("k", [0, -3, 2.5, 3.0, "5", True])
def test_bad_k(cls, k):
    """k must be a positive int: zero, negatives, bool, float and str are rejected."""
    with pytest.raises(ValueError, match="k must be a positive int"):
        cls(k)


@pytest.mark.parametrize("cls", [Recall, NDCG, AveragePrecision])
def test_builtin_k_none(cls):
    """The built-ins need a k: None is rejected up front, not at the first evaluation."""
    with pytest.raises(ValueError, match="k must be a positive int"):
        cls(None)


def test_normalizations_have_distinct_names():
    """Both Recall normalizations can be evaluated side by side: results are keyed by name."""
    assert Recall(5, normalize=False).name == "Recall@5/relevant"
    assert AveragePrecision(5, normalize=False).name == "AveragePrecision@5/relevant"
    assert Recall(5) != Recall(5, normalize=False)


# ------------------------------------------------ recsys-recoder 0.4.0's per-list functions

FUNCTIONS_HAND_WORKED = [
    # The same user as HAND_WORKED: x = [10, 20, 30, 40, 50], y = [20, 40, 99].
    (lambda x, y: recall(x, y, 2), 1 / 2),
    (lambda x, y: recall(x, y, 2, normalize=False), 1 / 3),
    (lambda x, y: recall(x, y, 5), 2 / 3),
    (lambda x, y: average_precision(x, y, 2), 1 / 4),
    (lambda x, y: average_precision(x, y, 2, normalize=False), 1 / 6),
    (lambda x, y: average_precision(x, y, 5), 1 / 3),
    # DCG@2 = 1/log2(3); DCG@5 = 1/log2(3) + 1/log2(5).
    (lambda x, y: dcg(x, y, 2), 1 / L3),
    (lambda x, y: dcg(x, y, 5), 1 / L3 + 1 / math.log2(5)),
    (lambda x, y: ndcg(x, y, 2), (1 / L3) / (1 + 1 / L3)),
    (lambda x, y: ndcg(x, y, 5), (1 / L3 + 1 / math.log2(5)) / (1 + 1 / L3 + 1 / 2)),
    # k past the list's end: the list is read whole, the normalization still uses k.
    (lambda x, y: recall(x[:3], y, 10), 1 / 3),
    (lambda x, y: ndcg(x[:3], y, 10), (1 / L3) / (1 + 1 / L3 + 1 / 2)),
]


@pytest.mark.parametrize("as_array", [False, True], ids=["lists", "arrays"])
@pytest.mark.parametrize(("function", "expected"), FUNCTIONS_HAND_WORKED)
def test_functions_hand_worked(function, expected, as_array):
    """The per-list functions give the hand-computed values, on lists and numpy arrays."""
    x, y = (np.array(X), np.array(Y)) if as_array else (X, Y)
    got = function(x, y)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12)


def test_functions_on_empty_and_missing_hits():
    """An empty recommendation list, or one without hits, scores 0; dcg of an empty y is 0."""
    for function in (recall, average_precision, dcg, ndcg):
        assert function([], [1, 2], 5) == 0.0
        assert function([3, 4], [1, 2], 5) == 0.0
    assert dcg([1, 2], [], 5) == 0.0


@pytest.mark.parametrize("function", [recall, average_precision, ndcg])
def test_functions_refuse_empty_relevant(function):
    """0.4.0 divided by zero for a user without relevant items (nan and a warning): refused."""
    with pytest.raises(ValueError, match="y is empty"):
        function([1, 2, 3], [], 3)
    metric_class = {recall: Recall, average_precision: AveragePrecision, ndcg: NDCG}[function]
    with pytest.raises(ValueError, match="y is empty"):
        metric_class(3).evaluate([1, 2, 3], [])


@pytest.mark.parametrize("function", [recall, average_precision, dcg, ndcg])
def test_functions_refuse_bad_input(function):
    """Repeated items (0.4.0's np.isin(assume_unique=True) is undefined on them), lists that
    are not 1-D, and a k that is not a positive int raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="x repeats items"):
        function([1, 2, 1], [1], 3)
    with pytest.raises(ValueError, match="y repeats items"):
        function([1, 2], [1, 1], 3)
    with pytest.raises(ValueError, match="x must be a 1-D list"):
        function([[1, 2]], [1], 3)
    for k in (0, -1, 2.0, True, None, "3"):
        with pytest.raises(ValueError, match="k must be a positive int"):
            function([1, 2], [1], k)
    assert function([1, 2], [1], np.int64(2)) == function([1, 2], [1], 2)


@pytest.mark.parametrize("metric", ALL_METRICS, ids=str)
def test_classes_evaluate_is_the_function(metric):
    """Recall/NDCG/AveragePrecision.evaluate(x, y) are the per-list functions."""
    recommended, relevant = random_users(30, 10, 40, seed=3)
    for x, y in zip(recommended, relevant):
        y = sorted(y)
        if isinstance(metric, Recall):
            expected = recall(x, y, metric.k, metric.normalize)
        elif isinstance(metric, NDCG):
            expected = ndcg(x, y, metric.k)
        else:
            expected = average_precision(x, y, metric.k, metric.normalize)
        assert metric.evaluate(x, y) == expected


RECODER040 = json.loads((Path(__file__).parent / "data" / "recoder040_metrics.json").read_text())


@pytest.mark.parametrize("case", RECODER040["cases"], ids=lambda c: f"k{c['k']}-{len(c['x'])}")
def test_functions_equal_recoder040(case):
    """The functions give recsys-recoder 0.4.0's own values (tests/data/recoder040_metrics.json,
    written by tests/data/make_recoder040_fixtures.py with 0.4.0's functions), from lists and
    from arrays."""
    x, y, k = case["x"], case["y"], case["k"]
    for xs, ys in ((x, y), (np.array(x, dtype=np.int64), np.array(y, dtype=np.int64))):
        got = dict(
            average_precision=average_precision(xs, ys, k),
            average_precision_unnormalized=average_precision(xs, ys, k, normalize=False),
            recall=recall(xs, ys, k),
            recall_unnormalized=recall(xs, ys, k, normalize=False),
            dcg=dcg(xs, ys, k),
            ndcg=ndcg(xs, ys, k),
        )
        for name, value in got.items():
            assert value == pytest.approx(case[name], rel=1e-12, abs=1e-15), name


def test_recoder040_cases_cover_the_edges():
    """The stored cases include lists shorter than k, fewer relevant items than k, and misses."""
    cases = RECODER040["cases"]
    assert RECODER040["recoder_version"] == "0.4.0"
    assert any(c["k"] > len(c["x"]) for c in cases)
    assert any(len(c["y"]) < c["k"] for c in cases)
    assert any(c["recall"] == 0 for c in cases) and any(0 < c["ndcg"] < 1 for c in cases)
