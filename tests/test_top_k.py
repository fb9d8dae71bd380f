"""Block top-k and the sliced score product against torch.topk and naive per-user loops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist.data.collator import UserRows
from recoder_dist.metrics import NDCG, AveragePrecision, Recall
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.training import bf16_candidates
from recoder_dist.training import top_k as top_k_module
from recoder_dist.training.evaluation import (
    _as_batch,
    _score_factors,
    metric_sums,
    predict_scores,
)
from recoder_dist.training.top_k import top_k, top_k_of_product
from tests.test_bf16_candidates import use_bf16_path
from tests.test_metrics import naive

CPU = torch.device("cpu")


def _rounds(num_items: int, k: int) -> list[int]:
    return top_k_module._round_sizes(num_items, k)


@pytest.fixture(params=["fp32", "bf16"])
def product_path(request, monkeypatch):
    """The sliced fp32 product, or the bf16 product with fp32 rescoring (where the CPU's bf16
    products accumulate in fp32), whichever this CPU would take."""
    if request.param == "fp32":
        monkeypatch.setattr(bf16_candidates, "ENABLED", False)
    else:
        use_bf16_path(monkeypatch, 8)
    return request.param


@pytest.mark.parametrize(
    "num_items, k, rounds",
    [
        (5000, 20, [32, 4]),
        (20_000, 100, [32, 4]),
        (1300, 10, [32, 4]),
        (1279, 10, []),
        (2810, 100, []),
    ],
)
def test_distinct_scores_match_torch_topk(num_items, k, rounds):
    scores = torch.randn(37, num_items, generator=torch.Generator().manual_seed(num_items))
    values, items = top_k(scores, k)
    expected_values, expected_items = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(items, expected_items)
    assert _rounds(num_items, k) == rounds


def test_the_short_last_block_is_read_in_place():
    """5,000 items: the last block holds 8 items, which here are every row's largest; a block
    past the last column must not read the last item again."""
    scores = torch.randn(20, 5000, generator=torch.Generator().manual_seed(7))
    scores[:, -8:] += 10.0
    assert _rounds(5000, 20) == [32, 4]
    values, items = top_k(scores, 20)
    expected_values, expected_items = torch.topk(scores, 20, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(items, expected_items)


def test_ties_and_excluded_entries_keep_torch_topk_values():
    """Integer scores tie everywhere; which tied items are picked may differ, their values not."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (50, 3001), generator=generator).float()
    scores[torch.rand(scores.shape, generator=generator) < 0.3] = -torch.inf
    scores[7, :2990] = -torch.inf
    scores[7, 2990:] = 1.0  # 11 items left: fewer than k
    k = 20
    assert _rounds(3001, k) == [32, 4]
    values, items = top_k(scores, k)
    assert torch.equal(values, torch.topk(scores, k, dim=1).values)
    finite = values > -torch.inf  # a -inf value may stand for a padding column, not an item
    assert torch.equal(scores.gather(1, items)[finite], values[finite])
    assert int(items.min()) >= 0 and int(items.max()) < 3001
    for row, value_row in zip(items, values):
        finite = row[value_row > -torch.inf]
        assert len(set(finite.tolist())) == len(finite)  # no item twice
    assert int((values[7] > -torch.inf).sum()) == 11


@pytest.mark.parametrize(
    "num_items, dtype",
    [(3001, torch.float32), (1500, torch.float32), (1000, torch.float32), (3001, torch.float64)],
)
def test_sliced_product_matches_the_whole_product(num_items, dtype, product_path):
    """3,001 items: three slices, the last one 953 items (not a whole number of blocks); 1,000
    items: too few for blocks, one product and torch.topk."""
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
    assert _rounds(num_items, k) == ([32, 4] if num_items > 1000 else [])


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
def test_metric_sums_match_a_naive_loop_on_a_large_catalog(model_index, product_path):
    """3,001 items and k=20: the sliced product and block top-k run; every user's metrics are
    recomputed from a full argsort of ``forward``'s scores."""
    num_users, num_items, k = 120, 3001, 20
    inputs = _rows(num_users, num_items, 0.01, seed=5)
    targets = _rows(num_users, num_items, 0.004, seed=6)
    targets = (targets - targets.multiply(inputs)).tocsr()  # targets are not inputs
    targets.eliminate_zeros()
    metrics = [Recall(20), Recall(10, normalize=False), NDCG(20), AveragePrecision(15)]
    model = _models(num_items, num_users)[model_index]
    assert _rounds(num_items, k) == [32, 4]

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
