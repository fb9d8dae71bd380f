"""Exact item similarity (recoder_dist.similarity): every item's K nearest by cosine, computed
in slices, against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.similarity import (
    item_vectors,
    similar_items,
    similar_items_table,
    top_k_cosine,
)


def _brute_force(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every item's k nearest other items: a double loop of cosines, sorted by (-cos, row)."""
    n = len(vectors)
    norms = [float(np.sqrt(sum(float(v) ** 2 for v in row))) for row in vectors]
    neighbours, cosines = [], []
    for i in range(n):
        cos = {
            j: float(np.dot(vectors[i], vectors[j])) / (norms[i] * norms[j])
            for j in range(n)
            if j != i
        }
        best = sorted(cos, key=lambda j: (-cos[j], j))[:k]
        neighbours.append(best)
        cosines.append([cos[j] for j in best])
    return np.array(neighbours), np.array(cosines)


@pytest.mark.parametrize("slice_size", [1, 7, 1000])
def test_similar_items_equal_the_brute_force(slice_size):
    vectors = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    expected, cosines = _brute_force(vectors.astype(np.float64), 6)
    queries, neighbours, sims = similar_items(vectors, 6, slice_size=slice_size)
    np.testing.assert_array_equal(queries, np.arange(60))
    np.testing.assert_array_equal(neighbours, expected)
    np.testing.assert_allclose(sims, cosines, atol=1e-5)


def test_similar_items_in_original_ids():
    vectors = np.random.default_rng(1).normal(size=(20, 3))
    expected, _ = _brute_force(vectors, 3)
    names = np.array([f"movie-{i}" for i in range(20)])
    id_map = {name: row for row, name in enumerate(names)}  # dataframe_to_csr_matrix's form
    for item_ids in (names, id_map):
        queries, neighbours, _ = similar_items(vectors, 3, item_ids=item_ids)
        np.testing.assert_array_equal(queries, names)
        np.testing.assert_array_equal(neighbours, names[expected])
    queries, neighbours, sims = similar_items(vectors, 3, item_ids=id_map, items=["movie-4"])
    assert queries.tolist() == ["movie-4"]
    np.testing.assert_array_equal(neighbours, names[expected[[4]]])
    table = similar_items_table(queries, neighbours, sims).to_pylist()
    assert table == [
        {
            "item": "movie-4",
            "similar_items": names[expected[4]].tolist(),
            "similarities": sims[0].astype(np.float32).tolist(),
        }
    ]


def test_equal_cosines_go_to_the_lower_row():
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    _, neighbours, sims = similar_items(vectors, 3)
    assert neighbours.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    np.testing.assert_allclose(sims[0], [1, 1, 0], atol=1e-6)


def test_zero_vectors_have_cosine_zero():
    rows, sims = top_k_cosine(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 1.0]]), 2)
    assert rows.tolist() == [[1, 0]]
    np.testing.assert_allclose(sims, [[np.sqrt(0.5), 0]], atol=1e-6)


def test_bad_input_is_refused_clearly():
    vectors = np.eye(4)
    with pytest.raises(ValueError, match="k=4 is larger than the catalog allows: 4 items"):
        similar_items(vectors, 4)
    with pytest.raises(ValueError, match="k=0"):
        similar_items(vectors, 0)
    with pytest.raises(ValueError, match=r"2 unknown item ids \(e.g. \['x', 'y'\]\)"):
        similar_items(vectors, 2, item_ids=["a", "b", "c", "d"], items=["a", "x", "y"])
    with pytest.raises(ValueError, match="one id per item"):
        similar_items(vectors, 2, item_ids=["a", "b"])
    with pytest.raises(ValueError, match="bijection"):
        similar_items(vectors, 2, item_ids={"a": 0, "b": 0, "c": 1, "d": 2})
    with pytest.raises(ValueError, match="non-empty"):
        similar_items(np.zeros((0, 2)), 1)
    with pytest.raises(ValueError, match="same width"):
        top_k_cosine(vectors, np.ones((1, 3)), 1)
    for row in (4, -1):  # -1 would have excluded the last row, silently
        with pytest.raises(ValueError, match=r"exclude's rows must be in \[0, 4\)"):
            top_k_cosine(vectors, vectors[:2], 1, exclude=np.array([row, 0]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_asked_for_where_torch_has_none_is_refused():
    with pytest.raises(ValueError, match="device='cuda', but torch sees no CUDA GPU here"):
        similar_items(np.eye(4), 2, device="cuda")


def test_item_vectors_of_the_models():
    autoencoder = DynamicAutoencoder(hidden_layers=[6, 3])
    with pytest.raises(ValueError, match="no item vectors.*initialized"):
        item_vectors(autoencoder)
    autoencoder.init_model(num_items=9)
    np.testing.assert_array_equal(
        item_vectors(autoencoder), autoencoder.de_embedding_layer.weight.detach().numpy()
    )
    assert item_vectors(autoencoder).shape == (9, 6)
    factorization = MatrixFactorization(embedding_size=4)
    factorization.init_model(num_items=7, num_users=5)
    np.testing.assert_array_equal(
        item_vectors(factorization), factorization.item_embedding_layer.weight.detach().numpy()
    )
    with pytest.raises(ValueError, match="Linear has no item vectors"):
        item_vectors(torch.nn.Linear(3, 3))


def test_a_catalog_of_ml100k_size_in_uneven_slices():
    """1682 items (ml-100k's catalog) of 32 dimensions, 500 queries a slice (the last one
    short), against a full stable sort of all the cosines."""
    vectors = np.random.default_rng(3).normal(size=(1682, 32)).astype(np.float32)
    units = vectors.astype(np.float64) / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = units @ units.T
    np.fill_diagonal(cosines, -np.inf)
    expected = np.argsort(-cosines, axis=1, kind="stable")[:, :10]
    _, neighbours, sims = similar_items(vectors, 10, slice_size=500)
    np.testing.assert_array_equal(neighbours, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(cosines, expected, axis=1), atol=1e-5)
