"""Ranking metrics over top-k recommendation lists.

Every built-in metric is a pure function of a ``hits`` matrix (``hits[u, i]`` is True when the
i-th recommendation of user u is relevant) and the number of relevant items of each user, and
returns one value per user. Evaluation sums those values and counts users on each worker, then
all-reduces the sums: the mean over N workers is the mean over one.

recsys-recoder 0.4.0's per-list functions, :func:`average_precision`, :func:`recall`,
:func:`dcg` and :func:`ndcg` (``x`` the recommended items in order, ``y`` the relevant items),
compute the same formulas on one list; the classes' ``evaluate(x, y)`` calls them.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np

logger = logging.getLogger(__name__)


def average_precision(x, y, k: int, normalize: bool = True) -> float:
    """Average precision at ``k`` of one recommendation list, as recsys-recoder 0.4.0's.

    The sum of precision@i over the ranks i <= k of the hits, divided by ``min(k, len(y))``
    when ``normalize``, else by ``len(y)``.

    Args:
        x: the recommended items, best first (a list or 1-D array; distinct items).
        y: the relevant items (a list, set or 1-D array; distinct, at least one).
        k: the cut-off, a positive int; ``x`` may be shorter.
        normalize: divide by ``min(k, len(y))`` rather than ``len(y)``.

    Raises:
        ValueError: ``k`` is not a positive int, ``x`` or ``y`` is not 1-D or repeats an item,
            or ``y`` is empty (0.4.0 divided by zero and returned nan with a warning).
    """
    hits, num_relevant = _one_list(x, y, k, needs_relevant=True)
    return float(_average_precision_of_hits(hits, num_relevant, k, normalize)[0])


def recall(x, y, k: int, normalize: bool = True) -> float:
    """Recall at ``k`` of one recommendation list, as recsys-recoder 0.4.0's: the hits among
    the first ``k`` items of ``x``, divided by ``min(k, len(y))`` when ``normalize``, else by
    ``len(y)``. Arguments and errors as :func:`average_precision`'s."""
    hits, num_relevant = _one_list(x, y, k, needs_relevant=True)
    return float(_recall_of_hits(hits, num_relevant, k, normalize)[0])


def dcg(x, y, k: int) -> float:
    """Discounted cumulative gain at ``k`` of one recommendation list, as recsys-recoder
    0.4.0's: the sum of ``1 / log2(i + 1)`` over the ranks i <= k of the hits (binary gains).

    Arguments and errors as :func:`average_precision`'s, except that ``y`` may be empty
    (the gain is then 0).
    """
    hits, _ = _one_list(x, y, k, needs_relevant=False)
    return float(_dcg_of_hits(hits, k)[0])


def ndcg(x, y, k: int) -> float:
    """Normalized discounted cumulative gain at ``k`` of one recommendation list, as
    recsys-recoder 0.4.0's: :func:`dcg` divided by the DCG of a list with every relevant item
    on top (``min(k, len(y))`` hits). Arguments and errors as :func:`average_precision`'s."""
    hits, num_relevant = _one_list(x, y, k, needs_relevant=True)
    return float(_ndcg_of_hits(hits, num_relevant, k)[0])


class Metric:
    """A per-user ranking metric.

    Subclasses implement either ``evaluate(x, y)`` (one user: ``x`` the recommended items in
    order, ``y`` the relevant items) or, faster, ``evaluate_hits``.

    Args:
        metric_name: the name under which results are reported.
        k: the length of the list the metric reads (None: the whole list).
    """

    def __init__(self, metric_name: str, k: int | None = None):
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise ValueError(f"{type(self).__name__}: k must be a positive int, got {k!r}")
        self.metric_name = metric_name
        self.k = None if k is None else int(k)

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


def _recall_of_hits(hits, num_relevant, k, normalize):
    return hits[:, :k].sum(1) / _denominator(num_relevant, k, normalize)


def _dcg_of_hits(hits, k):
    hits = hits[:, :k]
    return hits @ _discounts(k)[: hits.shape[1]]


def _ndcg_of_hits(hits, num_relevant, k):
    ideal = np.concatenate([[0.0], np.cumsum(_discounts(k))])[np.minimum(num_relevant, k)]
    return _dcg_of_hits(hits, k) / ideal


def _average_precision_of_hits(hits, num_relevant, k, normalize):
    hits = hits[:, :k]
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    return (precision * hits).sum(1) / _denominator(num_relevant, k, normalize)


def _one_list(x, y, k, needs_relevant: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``1 x len(x)`` hits matrix of one list and its number of relevant items.

    0.4.0 matched items with ``np.isin(x, y, assume_unique=True)``, whose answer is undefined
    when either side repeats an item, and counted ``len(y)`` relevant items duplicates
    included: repeated items are refused rather than given a meaning.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    x, y = _item_list(x, "x"), _item_list(y, "y")
    if needs_relevant and not y:
        raise ValueError("y is empty: the metric is undefined for a user without relevant items")
    relevant = set(y)
    hits = np.array([[item in relevant for item in x]], dtype=bool).reshape(1, len(x))
    return hits, np.array([len(relevant)])


def _item_list(items, name: str) -> list:
    if isinstance(items, (set, frozenset)):
        items = list(items)  # np.asarray would make a 0-d object array of the set
    array = np.asarray(items)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of items, got shape {array.shape}")
    items = array.tolist()
    if len(set(items)) != len(items):
        raise ValueError(f"{name} repeats items; recommended and relevant items must be distinct")
    return items


class Recall(Metric):
    """Relevant items in the top k, divided by ``min(k, |relevant|)`` when ``normalize``
    (Mult-VAE; named ``Recall@k``) or by ``|relevant|`` (LightGCN; ``Recall@k/relevant``).
    ``evaluate(x, y)`` is :func:`recall`."""

    def __init__(self, k: int, normalize: bool = True):
        super().__init__(f"Recall@{k}" + ("" if normalize else "/relevant"), _required_k(k))
        self.normalize = normalize

    def evaluate(self, x, y) -> float:
        return recall(x, y, self.k, self.normalize)

    def evaluate_hits(self, hits, num_relevant):
        return _recall_of_hits(hits, num_relevant, self.k, self.normalize)


class NDCG(Metric):
    """Normalized discounted cumulative gain at k, binary gains and log2 discounts.
    ``evaluate(x, y)`` is :func:`ndcg`."""

    def __init__(self, k: int):
        super().__init__(f"NDCG@{k}", _required_k(k))

    def evaluate(self, x, y) -> float:
        return ndcg(x, y, self.k)

    def evaluate_hits(self, hits, num_relevant):
        return _ndcg_of_hits(hits, num_relevant, self.k)


class AveragePrecision(Metric):
    """Mean of precision@i over the ranks i of the hits in the top k, divided by
    ``min(k, |relevant|)`` when ``normalize`` (``AveragePrecision@k``), else by ``|relevant|``
    (``AveragePrecision@k/relevant``). ``evaluate(x, y)`` is :func:`average_precision`."""

    def __init__(self, k: int, normalize: bool = True):
        name = f"AveragePrecision@{k}" + ("" if normalize else "/relevant")
        super().__init__(name, _required_k(k))
        self.normalize = normalize

    def evaluate(self, x, y) -> float:
        return average_precision(x, y, self.k, self.normalize)

    def evaluate_hits(self, hits, num_relevant):
        return _average_precision_of_hits(hits, num_relevant, self.k, self.normalize)


class RecommenderEvaluator:
    """Evaluates a :class:`~recoder_dist.recommender.Recommender` on a dataset with targets, in
    this process, as 0.4.0's.

    Args:
        recommender: the recommender (``recommend(UsersInteractions)`` -> a list per user).
        metrics: the :class:`Metric` objects to compute.
    """

    def __init__(self, recommender, metrics: list[Metric]):
        if isinstance(metrics, Metric):
            raise TypeError(
                f"metrics must be a list of metrics, e.g. [{type(metrics).__name__}(...)]"
            )
        if not metrics:
            raise ValueError("metrics must be a list of at least one metric, e.g. [Recall(20)]")
        for metric in metrics:
            if not isinstance(metric, Metric):
                raise TypeError(f"metrics must be Metric objects, got {type(metric).__name__}")
        self.recommender = recommender
        self.metrics = list(metrics)

    def evaluate(self, eval_dataset, batch_size: int = 1, num_users=None, num_workers: int = 0):
        """Recommends for the dataset's users, ``batch_size`` at a time in a random order (as
        0.4.0's loader), and scores each list against the user's target items.

        Args:
            eval_dataset: a RecommendationDataset with a target matrix.
            batch_size: users passed to the recommender at once.
            num_users: stop after the batch that reaches this many users (None: all).
            num_workers: accepted for 0.4.0's signature; the metrics are cheap next to the
                recommender and are computed in this process.

        Returns:
            ``{metric: [value per user]}``. Users without target items are left out (0.4.0
            recorded NaN for them).
        """
        # Imported here: the metric functions above stay plain numpy (the workers import them).
        from recoder_dist.data.loader import RecommendationDataLoader

        if getattr(eval_dataset, "target", None) is None:
            raise ValueError("eval_dataset needs a target matrix (the items to recommend)")
        if num_workers:
            logger.debug("num_workers=%s: metrics are computed in this process", num_workers)
        loader = RecommendationDataLoader(eval_dataset, batch_size=batch_size, collate_fn=_as_is)
        results = {metric: [] for metric in self.metrics}
        seen = 0
        for input, target in loader:
            recommendations = self.recommender.recommend(input)
            rows = target.user_rows()
            for r, recommended in enumerate(recommendations):
                relevant = rows.indices[rows.indptr[r] : rows.indptr[r + 1]]
                if len(relevant) == 0:
                    continue
                for metric in self.metrics:
                    results[metric].append(metric.evaluate(np.asarray(recommended), relevant))
            seen += len(target)
            if num_users is not None and seen >= num_users:
                break
        return results


def _as_is(users_interactions):
    return users_interactions
