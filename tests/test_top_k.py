"""top_k and the sliced score product against torch.topk and naive per-user loops."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist import kernels
from recoder_dist.data.collator import UserRows
from recoder_dist.metrics import NDCG, AveragePrecision, Recall
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.training import top_k_kernel
from recoder_dist.training.evaluation import (
    _as_batch,
    _is_target,
    _score_factors,
    _searched_hits,
    metric_sums,
    predict_scores,
)
from recoder_dist.training.top_k import top_k, top_k_of_product
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
def test_top_k_matches_torch_topk(num_items, dtype, kernel, kernel_mode):
    generator = torch.Generator().manual_seed(num_items)
    scores = torch.randn(37, num_items, generator=generator, dtype=dtype)
    k = 100
    assert top_k_kernel.applies(scores, k) == kernel
    assert kernels.compiled() == (kernel_mode == "compiled")
    values, items = top_k(scores, k)
    expected_values, expected_items = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(items, expected_items)


@pytest.mark.parametrize(
    "num_items, dtype",
    [(3001, torch.float32), (1500, torch.float32), (1000, torch.float32), (3001, torch.float64)],
)
def test_sliced_product_matches_the_whole_product(num_items, dtype, kernel_mode):
    """3,001 items: three slices, the last one 953 items (not a whole number of blocks of 32);
    1,000 items: one slice."""
    generator = torch.Generator().manual_seed(2)
    codes = torch.randn(40, 16, generator=generator, dtype=dtype)
    vectors = torch.randn(num_items, 16, generator=generator, dtype=dtype)
    bias = torch.randn(num_items, generator=generator, dtype=dtype)
    rows = torch.randint(0, 40, (600,), generator=generator)
    cols = torch.randint(0, num_items, (600,), generator=generator)
    k = 10
    values, items = top_k_of_product(codes, vectors, bias, k, rows, cols)
    scores = torch.addmm(bias, codes, vectors.t())
    scores[rows, cols] = -torch.inf
    expected_values, expected_items = torch.topk(scores, k, dim=1)
    torch.testing.assert_close(values, expected_values, rtol=1e-6, atol=1e-6)
    assert torch.equal(items, expected_items)
    assert not bool(torch.isinf(values).any())


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
def test_score_factors_give_the_forward_scores(model_index):
    inputs = _rows(30, 400, 0.05, seed=4)
    model = _models(400, 30)[model_index]
    rows = UserRows.from_csr(inputs)
    scores = predict_scores(model, rows, 400, CPU)
    codes, vectors, bias = _score_factors(model, _as_batch(rows, 400), CPU)
    torch.testing.assert_close(bias + codes @ vectors.t(), scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_index", [0, 1, 2])
def test_metric_sums_match_a_naive_loop_on_a_large_catalog(model_index, kernel_mode):
    """3,001 items and k=20: the sliced product and the top-k kernel run; every user's metrics
    are recomputed from a full argsort of ``forward``'s scores."""
    num_users, num_items, k = 120, 3001, 20
    inputs = _rows(num_users, num_items, 0.01, seed=5)
    targets = _rows(num_users, num_items, 0.004, seed=6)
    targets = (targets - targets.multiply(inputs)).tocsr()  # targets are not inputs
    targets.eliminate_zeros()
    metrics = [Recall(20), Recall(10, normalize=False), NDCG(20), AveragePrecision(15)]
    model = _models(num_items, num_users)[model_index]

    sums, count = metric_sums(
        model, UserRows.from_csr(inputs), UserRows.from_csr(targets), metrics, k, num_items, CPU
    )

    scores = predict_scores(model, UserRows.from_csr(inputs), num_items, CPU).numpy()
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
def test_the_hit_tables_of_cpu_and_device_agree_with_set_lookups(arrow_ids, kernel_mode):
    """``_is_target`` marks targets in a table on CPU and binary-searches keys on a device;
    both against a set lookup per user (the device path run here on CPU tensors), also with
    the read-only int32 ids that ``rows_from_arrow`` gives."""
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
    assert np.array_equal(_searched_hits(items, rows, num_items, CPU).numpy(), expected)
