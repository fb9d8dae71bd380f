"""top_k and evaluation's metric sums against torch.topk and naive per-user loops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist.data.collator import UserRows
from recoder_dist.metrics import NDCG, AveragePrecision, Recall
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.training.evaluation import top_k_kernel
from recoder_dist.training.evaluation.scoring import (
    _is_target,
    metric_sums,
    predict_scores,
)
from recoder_dist.training.evaluation.top_k import top_k
from tests.test_metrics import naive

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "num_items, dtype, kernel",
    [
        (2810, torch.float32, True),
        (5000, torch.float32, True),
        (600, torch.float32, False),  # 75 blocks of 8: fewer than k
        (2810, torch.float64, False),
    ],
)
def test_top_k_matches_torch_topk(num_items, dtype, kernel, compiled):
    generator = torch.Generator().manual_seed(num_items)
    scores = torch.randn(37, num_items, generator=generator, dtype=dtype)
    k = 100
    assert top_k_kernel.applies(scores, k) == kernel
    values, items = top_k(scores, k, compiled=compiled)
    expected_values, expected_items = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(items, expected_items)


def _models(num_items: int, num_users: int):
    torch.manual_seed(3)
    models = [
        DynamicAutoencoder([24, 8], noise_prob=0.5, dropout_prob=0.2),
        DynamicAutoencoder([24], is_constrained=True, sparse=True),
        MatrixFactorization(12, activation_type="tanh", dropout_prob=0.3),
    ]
    for model in models:
        model.init_model(num_items=num_items, num_users=num_users)
        for parameter in model.parameters():  # untrained biases are zeros: make them count
            torch.nn.init.normal_(parameter.data, std=0.3)
        model.eval()
    return models


def _rows(num_users: int, num_items: int, density: float, seed: int):
    matrix = sp.random(num_users, num_items, density, format="csr", random_state=seed)
    matrix.data[:] = 1.0
    return matrix


@pytest.mark.parametrize("model_index", [0, 1, 2])
def test_the_scores_of_the_sparse_input_are_the_dense_inputs(model_index):
    """``predict_scores`` with the CPU fast path (the model reads a sparse input) against its
    reference (a dense input)."""
    inputs = _rows(30, 400, 0.05, seed=4)
    model = _models(400, 30)[model_index]
    rows = UserRows.from_csr(inputs)
    scores = predict_scores(model, rows, 400, CPU)
    reference = predict_scores(model, rows, 400, CPU, compiled=False)
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_index", [0, 1, 2])
def test_metric_sums_match_a_naive_loop_on_a_large_catalog(model_index, compiled):
    """3,001 items and k=20: the top-k kernel runs (with ``compiled``); every user's metrics
    are recomputed from a full argsort of ``forward``'s scores."""
    num_users, num_items, k = 120, 3001, 20
    inputs = _rows(num_users, num_items, 0.01, seed=5)
    targets = _rows(num_users, num_items, 0.004, seed=6)
    targets = (targets - targets.multiply(inputs)).tocsr()  # targets are not inputs
    targets.eliminate_zeros()
    metrics = [Recall(20), Recall(10, normalize=False), NDCG(20), AveragePrecision(15)]
    model = _models(num_items, num_users)[model_index]

    sums, count = metric_sums(
        model,
        UserRows.from_csr(inputs),
        UserRows.from_csr(targets),
        metrics,
        k,
        num_items,
        CPU,
        compiled=compiled,
    )

    rows = UserRows.from_csr(inputs)
    scores = predict_scores(model, rows, num_items, CPU, compiled=compiled).numpy()
    expected, counted = np.zeros(len(metrics)), 0
    for user in range(num_users):
        relevant = set(targets[user].indices.tolist())
        if not relevant:
            continue
        row = scores[user].copy()
        row[inputs[user].indices] = -np.inf
        ranked = np.argsort(-row, kind="stable")[:k].tolist()
        expected += [naive(metric, ranked, relevant) for metric in metrics]
        counted += 1
    assert count == counted
    np.testing.assert_allclose(sums, expected, rtol=1e-9)


@pytest.mark.parametrize("arrow_ids", [False, True])
def test_the_hit_test_agrees_with_set_lookups(arrow_ids):
    """``_is_target`` against a set lookup per user, also with the read-only int32 ids that
    ``rows_from_arrow`` gives."""
    rng = np.random.default_rng(8)
    num_items = 700
    targets = _rows(60, num_items, 0.05, seed=8)
    targets.data[targets.indptr[5] : targets.indptr[6]] = 0  # a user with no targets
    targets.eliminate_zeros()
    items = torch.from_numpy(rng.integers(0, num_items, (60, 40)))
    items[:, :5] = torch.from_numpy(targets[:, :5].toarray().argmax(1))[:, None]  # some hits
    rows = UserRows.from_csr(targets)
    if arrow_ids:
        indices = rows.indices.astype(np.int32)
        indices.flags.writeable = False
        rows = dataclasses.replace(rows, indices=indices)
    expected = np.array(
        [[item in set(targets[u].indices) for item in items[u].tolist()] for u in range(60)]
    )
    assert 0 < expected.sum() < expected.size
    assert np.array_equal(_is_target(items, rows, num_items, CPU).numpy(), expected)
