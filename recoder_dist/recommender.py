"""Recommenders of items from users' histories, as recsys-recoder 0.4.0's
``recoder.recommender``: by a trained model's scores, or by item similarity."""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

from recoder_dist.data.loader import UsersInteractions
from recoder_dist.embedding import EmbeddingsIndex


class Recommender:
    """The interface of a recommender: ``recommend(users_hist)`` returns a list of recommended
    items per user."""

    def recommend(self, users_hist):
        """Recommended items for each user of ``users_hist``, best first."""
        raise NotImplementedError


class InferenceRecommender(Recommender):
    """Recommends the items that a trained model scores highest, never the user's own.

    Args:
        model: a trained :class:`recoder_dist.model.Recoder` (or any object with
            ``recommend(users_interactions, num_recommendations)``).
        num_recommendations: items per user.
    """

    def __init__(self, model, num_recommendations: int):
        if isinstance(num_recommendations, bool) or not isinstance(
            num_recommendations, numbers.Integral
        ):
            raise TypeError(f"num_recommendations must be an int, got {num_recommendations!r}")
        if num_recommendations < 1:
            raise ValueError(f"num_recommendations must be >= 1, got {num_recommendations}")
        self.model = model
        self.num_recommendations = int(num_recommendations)

    def recommend(self, users_hist) -> list[list[int]]:
        """The model's top items for each user.

        Args:
            users_hist: a :class:`UsersInteractions`, or a users x items sparse matrix.
        """
        return self.model.recommend(users_hist, self.num_recommendations)


class SimilarityRecommender(Recommender):
    """Recommends the items most similar to a user's items (Aiolli, RecSys 2013, as 0.4.0).

    The candidates are the ``n`` nearest items of each of the user's items, less the user's
    own; a candidate scores ``sum over the user's items j of ((cos(c, j) + 1) / 2) ** scale``
    over the index's embeddings, and the best ``num_recommendations`` are returned, best first
    (fewer when there are fewer candidates).

    Args:
        embeddings_index: the index that finds neighbours and holds the embeddings (e.g.
            :class:`~recoder_dist.embedding.ExactEmbeddingsIndex`).
        num_recommendations: items per user, at most.
        n: neighbours fetched per item of the user (the item itself is among them, and left
            out).
        scale: the exponent of the similarities (larger: the most similar pairs count more).
    """

    def __init__(
        self, embeddings_index: EmbeddingsIndex, num_recommendations: int, n: int = 1, scale=1
    ):
        if not isinstance(embeddings_index, EmbeddingsIndex):
            raise TypeError(
                "embeddings_index must be an EmbeddingsIndex, got "
                f"{type(embeddings_index).__name__}"
            )
        for name, value in (("num_recommendations", num_recommendations), ("n", n)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.embeddings_index = embeddings_index
        self.num_recommendations = int(num_recommendations)
        self.n = int(n)
        self.scale = scale

    def recommend(self, users_hist) -> list[np.ndarray]:
        """The most similar items for each user.

        Args:
            users_hist: the users' histories, in the index's item ids: a
                :class:`UsersInteractions` or a users x items sparse matrix (a row's columns
                are the ids: build the index with no ``id_map`` for this), or an iterable
                with one history per user, each a sequence of ids or an object with an
                ``items`` attribute (0.4.0's form).

        Returns:
            one array of recommended ids per user, best first.
        """
        return [self._recommend_one(items) for items in _histories(users_hist)]

    def _recommend_one(self, user_items: np.ndarray) -> np.ndarray:
        if len(user_items) == 0:
            return np.array([], dtype=user_items.dtype)
        pool = set()
        for item in user_items.tolist():
            pool.update(_ids(self.embeddings_index.get_nns_by_id(item, self.n)))
        pool.difference_update(user_items.tolist())
        if not pool:
            return np.array([], dtype=user_items.dtype)
        candidates = np.array(sorted(pool))
        scores = self._scores(candidates, user_items)
        # Best first; equal scores keep the ids' order (0.4.0's order among ties was arbitrary).
        order = np.argsort(-scores, kind="stable")[: self.num_recommendations]
        return candidates[order]

    def _scores(self, candidates: np.ndarray, user_items: np.ndarray) -> np.ndarray:
        index = self.embeddings_index
        pool = _unit(np.array([index.get_embedding(item) for item in candidates.tolist()]))
        history = _unit(np.array([index.get_embedding(item) for item in user_items.tolist()]))
        similarities = (pool @ history.T + 1) / 2  # cosines mapped to [0, 1]
        return np.sum(similarities**self.scale, axis=1)


def _histories(users_hist):
    if sp.issparse(users_hist):  # as InferenceRecommender takes it: row r is user r
        users_hist = UsersInteractions(np.arange(users_hist.shape[0]), users_hist)
    if isinstance(users_hist, UsersInteractions):
        rows = users_hist.user_rows()  # a canonical copy: sorted ids, no explicit zeros
        for r in range(len(rows)):
            yield rows.indices[rows.indptr[r] : rows.indptr[r + 1]]
        return
    for hist in users_hist:
        yield np.unique(np.asarray(getattr(hist, "items", hist)).reshape(-1))


def _ids(neighbours):
    """A neighbour list's ids (an index with ``include_distances`` returns a dict)."""
    return neighbours.keys() if isinstance(neighbours, dict) else neighbours


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float64).tiny)
