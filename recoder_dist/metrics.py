"""Ranking metrics over top-k recommendation lists.

Every built-in metric is a pure function of a ``hits`` matrix (``hits[u, i]`` is True when the
i-th recommendation of user u is relevant) and the number of relevant items of each user, and
returns one value per user. Evaluation sums those values and counts users on each worker, then
all-reduces the sums: the mean over N workers is the mean over one.
"""

from __future__ import annotations

import numpy as np


class Metric:
    """A per-user ranking metric.

    Subclasses implement either ``evaluate(x, y)`` (one user: ``x`` the recommended items in
    order, ``y`` the relevant items) or, faster, ``evaluate_hits``.

    Args:
        metric_name: the name under which results are reported.
        k: the length of the list the metric reads (None: the whole list).
    """

    def __init__(self, metric_name: str, k: int | None = None):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{type(self).__name__}: k must be a positive int, got {k!r}")
        self.metric_name = metric_name
        self.k = k

    @property
    def name(self) -> str:
        return self.metric_name

    def __str__(self) -> str:
        return self.metric_name

    __repr__ = __str__

    def __hash__(self) -> int:
        return hash(self.metric_name)

    def __eq__(self, other) -> bool:
        return isinstance(other, Metric) and other.metric_name == self.metric_name

    def evaluate(self, x, y) -> float:
        """The metric for one user: ``x`` recommended items (in order), ``y`` relevant items."""
        x = list(x)
        relevant = set(np.asarray(y).tolist())
        hits = np.array([[item in relevant for item in x]], dtype=bool)
        return float(self.evaluate_hits(hits, np.array([len(relevant)]))[0])

    def evaluate_hits(self, hits: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
        """Per-user values from a ``users x list_length`` boolean hits matrix."""
        raise NotImplementedError(f"{type(self).__name__} implements neither evaluate method")

    def evaluate_lists(self, recommended: np.ndarray, relevant: list) -> np.ndarray:
        """Per-user values from recommendation lists; used for metrics that only define
        ``evaluate(x, y)``."""
        return np.array([self.evaluate(x, y) for x, y in zip(recommended, relevant)])

    @property
    def vectorized(self) -> bool:
        return type(self).evaluate_hits is not Metric.evaluate_hits


def _discounts(length: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, length + 2))


def _required_k(k) -> int:
    if k is None:
        raise ValueError("k must be a positive int, got None")
    return k


def _denominator(num_relevant: np.ndarray, k: int, normalize: bool) -> np.ndarray:
    return np.minimum(num_relevant, k) if normalize else num_relevant


class Recall(Metric):
    """Relevant items in the top k, divided by ``min(k, |relevant|)`` when ``normalize``
    (Mult-VAE; named ``Recall@k``) or by ``|relevant|`` (LightGCN; ``Recall@k/relevant``)."""

    def __init__(self, k: int, normalize: bool = True):
        super().__init__(f"Recall@{k}" + ("" if normalize else "/relevant"), _required_k(k))
        self.normalize = normalize

    def evaluate_hits(self, hits, num_relevant):
        return hits[:, : self.k].sum(1) / _denominator(num_relevant, self.k, self.normalize)


class NDCG(Metric):
    """Normalized discounted cumulative gain at k, binary gains and log2 discounts."""

    def __init__(self, k: int):
        super().__init__(f"NDCG@{k}", _required_k(k))

    def evaluate_hits(self, hits, num_relevant):
        hits = hits[:, : self.k]
        discounts = _discounts(self.k)
        dcg = hits @ discounts[: hits.shape[1]]
        ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(num_relevant, self.k)]
        return dcg / ideal


class AveragePrecision(Metric):
    """Mean of precision@i over the ranks i of the hits in the top k, divided by
    ``min(k, |relevant|)`` when ``normalize`` (``AveragePrecision@k``), else by ``|relevant|``
    (``AveragePrecision@k/relevant``)."""

    def __init__(self, k: int, normalize: bool = True):
        name = f"AveragePrecision@{k}" + ("" if normalize else "/relevant")
        super().__init__(name, _required_k(k))
        self.normalize = normalize

    def evaluate_hits(self, hits, num_relevant):
        hits = hits[:, : self.k]
        precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
        return (precision * hits).sum(1) / _denominator(num_relevant, self.k, self.normalize)
