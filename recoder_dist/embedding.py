"""Indexes of item embeddings for nearest-neighbour search, as recsys-recoder 0.4.0's
``recoder.embedding``.

- :class:`ExactEmbeddingsIndex`: exact cosine search by brute force (numpy, in slices); ours,
  no extra dependency; the reference that the Annoy index is checked against.
- :class:`AnnoyEmbeddingsIndex`: 0.4.0's approximate index on Spotify's Annoy, an optional
  extra (``pip install recoder-dist[annoy]``).
- :class:`MemCacheEmbeddingsIndex`: caches another index's neighbour lists in memory.

Every index is keyed by the items' original ids through ``id_map`` (original id -> row of the
embeddings; the identity when None). Similarities are cosines mapped to [0, 1]; distances, when
``include_distances``, are Annoy's angular distance ``sqrt(2 - 2 cos)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping

import numpy as np

from recoder_dist.similarity import DEFAULT_SLICE_SIZE, top_k_cosine, unit_rows

logger = logging.getLogger(__name__)

ANNOY_EXTRA = "pip install recoder-dist[annoy]"
_INDEX_FORMAT = "recoder_dist.annoy_index"


class EmbeddingsIndex:
    """The interface of an index of item embeddings (all indexes implement it)."""

    def get_embedding(self, embedding_id):
        """The embedding of item ``embedding_id``."""
        raise NotImplementedError

    def get_nns_by_id(self, embedding_id, n: int):
        """The ``n`` nearest items of item ``embedding_id`` (itself included, first)."""
        raise NotImplementedError

    def get_nns_by_embedding(self, embedding, n: int):
        """The ``n`` nearest items of a vector."""
        raise NotImplementedError

    def get_similarity(self, id1, id2) -> float:
        """The similarity of two items: ``(cos + 1) / 2``, in [0, 1]."""
        raise NotImplementedError


class _IdMapped(EmbeddingsIndex):
    """The id map and result formatting that both concrete indexes share."""

    def __init__(self, id_map: Mapping | None, include_distances: bool):
        self.id_map = None if id_map is None else dict(id_map)
        self.include_distances = include_distances
        self.inverse_id_map: dict = {}

    def _set_ids(self, num_items: int) -> None:
        if self.id_map is None:
            self.id_map = {i: i for i in range(num_items)}
        rows = sorted(self.id_map.values())
        if rows != list(range(num_items)):
            raise ValueError(f"id_map must map the ids one-to-one onto rows 0..{num_items - 1}")
        self.inverse_id_map = {row: raw for raw, row in self.id_map.items()}

    def _row(self, embedding_id: Hashable) -> int:
        try:
            return self.id_map[embedding_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown item id {embedding_id!r}") from None

    def _results(self, rows, distances):
        ids = [self.inverse_id_map[int(row)] for row in rows]
        if not self.include_distances:
            return ids
        return dict(zip(ids, (float(d) for d in distances)))


class ExactEmbeddingsIndex(_IdMapped):
    """Exact cosine nearest neighbours, by brute force over all the embeddings.

    A query scores every item (``O(items x dim)``); a batch of queries, as
    :func:`recoder_dist.similarity.top_k_cosine` runs them, is scored ``slice_size`` at a time.
    Same interface and results' form as :class:`AnnoyEmbeddingsIndex`; no ``build`` needed.

    Args:
        embeddings: ``num_items x dim`` item vectors (e.g.
            :func:`recoder_dist.similarity.item_vectors` of a trained model).
        id_map: original item id -> row of ``embeddings``; None for the identity.
        include_distances: return ``{id: angular distance}`` dicts instead of id lists.
        slice_size: queries scored at once by :meth:`get_nns_by_embeddings`.
    """

    def __init__(
        self,
        embeddings,
        id_map: Mapping | None = None,
        include_distances: bool = False,
        slice_size: int = DEFAULT_SLICE_SIZE,
    ):
        super().__init__(id_map, include_distances)
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or len(self.embeddings) == 0:
            raise ValueError(
                f"embeddings must be a non-empty num_items x dim matrix, got shape "
                f"{self.embeddings.shape}"
            )
        self.embedding_size = self.embeddings.shape[1]
        self.slice_size = slice_size
        self._units = unit_rows(self.embeddings)
        self._set_ids(len(self.embeddings))

    def build(self, index_file=None) -> None:
        """Nothing to build (kept so that code written for the Annoy index runs)."""

    def get_embedding(self, embedding_id):
        return self.embeddings[self._row(embedding_id)]

    def get_nns_by_id(self, embedding_id, n: int):
        return self.get_nns_by_embedding(self.get_embedding(embedding_id), n)

    def get_nns_by_embedding(self, embedding, n: int):
        n = self._clipped(n)
        rows, cosines = top_k_cosine(self.embeddings, np.reshape(embedding, (1, -1)), n)
        return self._results(rows[0], _angular(cosines[0]))

    def get_nns_by_embeddings(self, embeddings, n: int):
        """:meth:`get_nns_by_embedding` for many vectors at once (one result per row)."""
        n = self._clipped(n)
        rows, cosines = top_k_cosine(
            self.embeddings, np.asarray(embeddings), n, slice_size=self.slice_size
        )
        return [self._results(r, _angular(c)) for r, c in zip(rows, cosines)]

    def get_similarity(self, id1, id2) -> float:
        cosine = float(self._units[self._row(id1)] @ self._units[self._row(id2)])
        return (cosine + 1) / 2

    def _clipped(self, n: int) -> int:
        # Annoy returns every item when asked for more; do the same.
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return min(int(n), len(self.embeddings))


class AnnoyEmbeddingsIndex(_IdMapped):
    """Approximate cosine nearest neighbours with Annoy (angular metric), as 0.4.0's.

    Needs the ``annoy`` package (``pip install recoder-dist[annoy]``): constructing the index
    works without it, ``build`` and ``load`` raise an ImportError that says so.

    Args:
        embeddings: ``num_items x dim`` item vectors; needed to ``build``, not to ``load``.
        id_map: original item id -> row of ``embeddings``; None for the identity.
        n_trees: Annoy's number of trees (more: better recall, larger index).
        search_k: Annoy's nodes inspected per query (-1: Annoy's default, ``n_trees x n``).
        include_distances: return ``{id: angular distance}`` dicts instead of id lists.
    """

    def __init__(
        self,
        embeddings=None,
        id_map: Mapping | None = None,
        n_trees: int = 10,
        search_k: int = -1,
        include_distances: bool = False,
    ):
        super().__init__(id_map, include_distances)
        self.embeddings = embeddings
        self.n_trees = n_trees
        self.search_k = search_k
        self.index = None

    def build(self, index_file: str | os.PathLike | None = None) -> None:
        """Builds the index over ``embeddings``, and saves it when ``index_file`` is given: the
        ids and sizes there (JSON), the Annoy trees in ``index_file + '.embeddings'``.

        (0.4.0 pickled the ids; its index files are not read here: build the index again.)
        """
        annoy = _import_annoy()
        if self.embeddings is None:
            raise ValueError("AnnoyEmbeddingsIndex.build needs the embeddings")
        embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise ValueError(f"embeddings must be a non-empty matrix, got {embeddings.shape}")
        self.embedding_size = embeddings.shape[1]
        self._set_ids(len(embeddings))
        self.index = annoy.AnnoyIndex(self.embedding_size, "angular")
        for row, vector in enumerate(embeddings):  # Annoy takes one item at a time
            self.index.add_item(row, vector)
        self.index.build(self.n_trees)
        if index_file:
            self.index.save(f"{index_file}.embeddings")
            ids = [self.inverse_id_map[row] for row in range(len(embeddings))]
            with open(index_file, "w") as f:
                json.dump(
                    {"format": _INDEX_FORMAT, "embedding_size": self.embedding_size, "ids": ids},
                    f,
                )

    def load(self, index_file: str | os.PathLike) -> None:
        """Loads an index that :meth:`build` saved."""
        annoy = _import_annoy()
        logger.info("loading the embeddings index %s", index_file)
        try:
            with open(index_file, encoding="utf-8") as f:
                state = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict) or state.get("format") != _INDEX_FORMAT:
            raise ValueError(
                f"{index_file} is not an index file written by AnnoyEmbeddingsIndex.build "
                "(recsys-recoder 0.4.0's pickled files are not read: build the index again)"
            )
        self.embedding_size = int(state["embedding_size"])
        self.id_map = {raw: row for row, raw in enumerate(state["ids"])}
        self._set_ids(len(state["ids"]))
        self.index = annoy.AnnoyIndex(self.embedding_size, "angular")
        self.index.load(f"{index_file}.embeddings")

    def get_embedding(self, embedding_id):
        return self._built().get_item_vector(self._row(embedding_id))

    def get_nns_by_id(self, embedding_id, n: int):
        rows, distances = self._built().get_nns_by_item(
            self._row(embedding_id), n, search_k=self.search_k, include_distances=True
        )
        return self._results(rows, distances)

    def get_nns_by_embedding(self, embedding, n: int):
        rows, distances = self._built().get_nns_by_vector(
            embedding, n, search_k=self.search_k, include_distances=True
        )
        return self._results(rows, distances)

    def get_similarity(self, id1, id2) -> float:
        distance = self._built().get_distance(self._row(id1), self._row(id2))
        return (1 - distance**2 / 2 + 1) / 2  # angular distance -> cosine -> [0, 1]

    def _built(self):
        if self.index is None:
            raise ValueError("the index is empty: call build() or load() first")
        return self.index


class MemCacheEmbeddingsIndex(EmbeddingsIndex):
    """Caches the neighbour lists of another index in memory (per item and ``n``; 0.4.0
    cached per item only, returning the first ``n``'s list for any later ``n``).

    Args:
        embedding_index: the index asked on a cache miss.
    """

    def __init__(self, embedding_index: EmbeddingsIndex):
        if not isinstance(embedding_index, EmbeddingsIndex):
            raise TypeError(
                f"embedding_index must be an EmbeddingsIndex, got {type(embedding_index).__name__}"
            )
        self.embedding_index = embedding_index
        self._nns_cache: dict = {}

    def get_embedding(self, embedding_id):
        return self.embedding_index.get_embedding(embedding_id)

    def get_nns_by_embedding(self, embedding, n: int):
        return self.embedding_index.get_nns_by_embedding(embedding, n)

    def get_nns_by_id(self, embedding_id, n: int):
        key = (embedding_id, n)
        if key not in self._nns_cache:
            self._nns_cache[key] = self.embedding_index.get_nns_by_id(embedding_id, n)
        return self._nns_cache[key]

    def get_similarity(self, id1, id2) -> float:
        return self.embedding_index.get_similarity(id1, id2)


def _angular(cosines: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(2 - 2 * np.asarray(cosines, dtype=np.float64), 0))


def _import_annoy():
    try:
        import annoy
    except ImportError as e:
        raise ImportError(
            f"AnnoyEmbeddingsIndex needs the annoy package, an optional extra: {ANNOY_EXTRA}"
        ) from e
    return annoy
