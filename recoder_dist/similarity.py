"""Exact item similarity: the nearest items by cosine over a model's item vectors.

The search runs in torch on the device given (the CPU, or a GPU where one is lent): the same
code either way. Scores are computed a slice of query rows at a time, so memory stays at
``slice_size x num_items`` floats whatever the catalog; this is the core that
:class:`~recoder_dist.embedding.ExactEmbeddingsIndex` answers from, and that a cluster-wide
"similar items" job can run on its share of the catalog (``similar_items(..., items=share)``,
then :func:`similar_items_table` for its Parquet rows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import torch

logger = logging.getLogger(__name__)

# Query rows scored at once: 1024 x 1M items is 4 GiB of float32 scores.
DEFAULT_SLICE_SIZE = 1024


def item_vectors(model) -> np.ndarray:
    """The item vectors that item similarity compares: the decoder's item embedding of a
    DynamicAutoencoder (the output layer's row for each item), the item embedding of a
    MatrixFactorization.

    Args:
        model: a model with initialized parameters, or a ``Recoder`` holding one.

    Returns:
        ``num_items x dim`` float32 array (a copy).

    Raises:
        ValueError: the model has no item vectors, or is not initialized.
    """
    model = getattr(model, "model", model)  # a Recoder holds its model in .model
    for name in ("decoder_embedding", "item_embedding"):
        table = getattr(model, name, None)
        if isinstance(table, torch.nn.Embedding):
            return table.weight.detach().cpu().float().numpy().copy()
    raise ValueError(
        f"{type(model).__name__} has no item vectors (a DynamicAutoencoder's decoder embedding "
        "or a MatrixFactorization's item embedding); is the model initialized (trained or "
        "loaded from a snapshot)?"
    )


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); a zero row stays zero, so its cosine with any
    vector is 0."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def top_k_cosine(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    slice_size: int = DEFAULT_SLICE_SIZE,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``vectors`` most similar by cosine to each query.

    Args:
        vectors: ``num_items x dim`` item vectors.
        queries: ``num_queries x dim`` query vectors.
        k: neighbours per query, at most ``num_items`` (less one with ``exclude``).
        exclude: for each query, one row of ``vectors`` never to return (e.g. the query item
            itself), or None.
        slice_size: queries scored at once.
        device: where the vectors and a slice's scores live while searching.

    Returns:
        ``(rows, similarities)``, both ``num_queries x k``: row numbers in ``vectors``, best
        first (equal cosines by the lower row number), and their cosines.

    Raises:
        ValueError: bad shapes, or ``k`` out of range.
    """
    vectors, queries = np.asarray(vectors), np.asarray(queries)
    if vectors.ndim != 2 or queries.ndim != 2 or vectors.shape[1] != queries.shape[1]:
        raise ValueError(
            f"vectors {vectors.shape} and queries {queries.shape} must be matrices of the same "
            "width"
        )
    available = len(vectors) - (exclude is not None)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(f"k={k!r} must be an int in [1, {available}] for {len(vectors)} items")
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (len(queries),):
            raise ValueError(f"exclude needs one row per query, got shape {exclude.shape}")
        if exclude.size and (exclude.min() < 0 or exclude.max() >= len(vectors)):
            raise ValueError(f"exclude's rows must be in [0, {len(vectors)})")
    if slice_size < 1:
        raise ValueError(f"slice_size must be >= 1, got {slice_size}")

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA GPU here")
    units = torch.from_numpy(unit_rows(vectors)).to(device)
    query_units = torch.from_numpy(unit_rows(queries)).to(device)
    rows = np.empty((len(queries), k), dtype=np.int64)
    sims = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), slice_size):
        stop = min(start + slice_size, len(queries))
        scores = query_units[start:stop] @ units.T  # the slice's whole memory cost
        if exclude is not None:
            excluded = torch.from_numpy(exclude[start:stop]).to(device)
            scores[torch.arange(stop - start, device=device), excluded] = -torch.inf
        top_rows, top_sims = _top_k_rows(scores, k)
        rows[start:stop], sims[start:stop] = top_rows.cpu().numpy(), top_sims.cpu().numpy()
    return rows, sims


def _top_k_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` columns of each row, best first; equal scores in the lower column first
    (among the columns kept: which of several columns tied at the k-th place are kept is
    ``torch.topk``'s choice)."""
    values, top = torch.topk(scores, k, dim=1)
    by_column = torch.argsort(top, dim=1)  # then a stable sort by score keeps that order
    top, values = top.gather(1, by_column), values.gather(1, by_column)
    best = torch.argsort(values, dim=1, descending=True, stable=True)
    return top.gather(1, best), values.gather(1, best)


def similar_items(
    vectors: np.ndarray,
    k: int,
    *,
    item_ids=None,
    items=None,
    slice_size: int = DEFAULT_SLICE_SIZE,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each item's ``k`` nearest other items by cosine, in original item ids.

    Args:
        vectors: ``num_items x dim`` item vectors (see :func:`item_vectors`).
        k: neighbours per item, at most ``num_items - 1`` (an item is never its own
            neighbour).
        item_ids: the original id of each row of ``vectors`` (a sequence), or a map from
            original id to row (an id map of ``dataframe_to_csr_matrix``); None: ids are rows.
        items: the original ids of the items to answer for; None: every item.
        slice_size: items scored at once (memory: ``slice_size x num_items`` floats).
        device: where the search runs (see :func:`top_k_cosine`).

    Returns:
        ``(query_ids, neighbour_ids, similarities)``: the queried items' ids, and
        ``len(query_ids) x k`` arrays of their neighbours' ids (best first) and cosines.

    Raises:
        ValueError: ``k`` larger than the catalog allows, ids that are not one per row, or an
            item absent from the ids.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors must be a non-empty num_items x dim matrix, got {vectors.shape}")
    ids = _ids_by_row(item_ids, len(vectors))
    rows = np.arange(len(vectors)) if items is None else _rows_of(items, ids)
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= len(vectors):
        raise ValueError(
            f"k={k} is larger than the catalog allows: {len(vectors)} items have at most "
            f"{len(vectors) - 1} other items each"
        )
    neighbour_rows, sims = top_k_cosine(
        vectors, vectors[rows], k, exclude=rows, slice_size=slice_size, device=device
    )
    return ids[rows], ids[neighbour_rows], sims


def _ids_by_row(item_ids, num_items: int) -> np.ndarray:
    if item_ids is None:
        return np.arange(num_items)
    if isinstance(item_ids, Mapping):
        ids = np.empty(num_items, dtype=object)
        seen = np.zeros(num_items, dtype=bool)
        for raw, row in item_ids.items():
            if not 0 <= row < num_items or seen[row]:
                raise ValueError(f"the id map is not a bijection onto 0..{num_items - 1}")
            ids[row], seen[row] = raw, True
        if not seen.all():
            raise ValueError(f"the id map names {int(seen.sum())} of {num_items} items")
        return np.array(ids.tolist())  # a plain int or str array where the ids allow
    ids = np.asarray(item_ids)
    if ids.shape != (num_items,):
        raise ValueError(f"item_ids needs one id per item ({num_items}), got shape {ids.shape}")
    return ids


def _rows_of(items, ids: np.ndarray) -> np.ndarray:
    row_of = {raw: row for row, raw in enumerate(ids.tolist())}
    items = list(np.asarray(items).reshape(-1).tolist())
    unknown = [item for item in items if item not in row_of]
    if unknown:
        raise ValueError(f"{len(unknown)} unknown item ids (e.g. {unknown[:5]})")
    return np.array([row_of[item] for item in items], dtype=np.int64)


def similar_items_table(
    query_ids: np.ndarray, neighbour_ids: np.ndarray, similarities: np.ndarray
) -> pa.Table:
    """:func:`similar_items`' result as an Arrow table, one row per queried item: ``item``,
    ``similar_items`` (a list of ``k`` ids, best first) and ``similarities`` (their cosines,
    float32)."""
    num_queries, k = neighbour_ids.shape
    if len(query_ids) != num_queries or similarities.shape != (num_queries, k):
        raise ValueError(
            f"{len(query_ids)} items, neighbours {neighbour_ids.shape} and similarities "
            f"{similarities.shape} do not match"
        )
    offsets = pa.array(np.arange(0, (num_queries + 1) * k, k, dtype=np.int32))
    return pa.table(
        {
            "item": pa.array(np.asarray(query_ids).tolist()),
            "similar_items": pa.ListArray.from_arrays(
                offsets, pa.array(np.asarray(neighbour_ids).reshape(-1).tolist())
            ),
            "similarities": pa.ListArray.from_arrays(
                offsets, pa.array(np.asarray(similarities, dtype=np.float32).reshape(-1))
            ),
        }
    )
