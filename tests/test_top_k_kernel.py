"""The compiled top-k kernel against torch.topk and a naive stable sort of each row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recoder_dist.training.evaluation import top_k_kernel
from recoder_dist.training.evaluation.top_k_kernel import top_k_rows


def naive_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted by value, largest first, equal values by column (no NaN, no -0.0)."""
    rows = scores.numpy()
    columns = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in rows])
    return torch.from_numpy(np.take_along_axis(rows, columns, 1)), torch.from_numpy(columns)


@pytest.mark.parametrize(
    "num_items, k",
    [
        (2810, 100),  # ml-1m: fewer than k super-blocks of 64, one selection among block maxima
        (40_981, 100),  # Gowalla: the threshold from the super-blocks that reach the k-th
        (6400, 100),  # exactly k super-blocks
        (801, 100),  # 101 blocks, the last one short
        (800, 100),  # exactly k blocks: every entry is a candidate
        (8, 1),
        (70, 1),
        (5000, 20),
    ],
)
def test_distinct_scores_match_torch_topk(num_items, k):
    scores = torch.randn(37, num_items, generator=torch.Generator().manual_seed(num_items))
    values, columns = top_k_rows(scores, k)
    expected_values, expected_columns = torch.topk(scores, k, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(columns, expected_columns)


@pytest.mark.parametrize("num_items, k", [(3001, 20), (3001, 100), (40_000, 50), (130, 17)])
def test_ties_and_minus_inf_rank_by_column(num_items, k):
    """Integer scores tie everywhere; among equal values the lowest column comes first."""
    generator = torch.Generator().manual_seed(num_items + k)
    scores = torch.randint(-3, 4, (41, num_items), generator=generator).float()
    scores[torch.rand(scores.shape, generator=generator) < 0.3] = -torch.inf
    scores[7, : num_items - 11] = -torch.inf  # 11 finite scores: fewer than k
    scores[8] = -torch.inf
    values, columns = top_k_rows(scores, k)
    expected_values, expected_columns = naive_top_k(scores, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(columns, expected_columns)
    assert torch.equal(columns[8], torch.arange(k))


def test_all_equal_scores_give_the_first_columns():
    """All-zero scores (an untrained model's) tie everywhere: the first k columns. (The
    selections see distinct packed entries, so they stay linear here too.)"""
    scores = torch.zeros(200, 40_981)
    values, columns = top_k_rows(scores, 100)
    assert torch.equal(columns, torch.arange(100).expand(200, 100))
    assert not bool(values.any())


def test_nan_ranks_above_every_number_as_in_torch_topk():
    scores = torch.randn(6, 900, generator=torch.Generator().manual_seed(3))
    scores[0, [5, 600]] = torch.nan
    scores[1, 17] = -torch.nan  # the sign bit set, as x86 writes NaN from 0 * inf
    scores[2] = torch.nan
    values, columns = top_k_rows(scores, 100)
    expected_values, _ = torch.topk(scores, 100, dim=1)
    assert torch.equal(values.isnan(), expected_values.isnan())
    assert torch.equal(values[~values.isnan()], expected_values[~expected_values.isnan()])
    assert columns[0, :2].tolist() == [5, 600] and columns[1, 0] == 17


def test_minus_zero_ranks_below_zero():
    scores = torch.full((2, 800), -1.0)
    scores[:, 10], scores[:, 3] = 0.0, -0.0
    values, columns = top_k_rows(scores, 3)
    assert columns.tolist() == [[10, 3, 0]] * 2
    assert torch.equal(values, torch.tensor([[0.0, -0.0, -1.0]] * 2))


def test_a_strided_view_is_read_as_its_values():
    base = torch.randn(900, 50, generator=torch.Generator().manual_seed(4))
    scores = base.t()[::2]  # 25 x 900, not contiguous
    values, columns = top_k_rows(scores, 30)
    expected_values, expected_columns = torch.topk(scores, 30, dim=1)
    assert torch.equal(values, expected_values)
    assert torch.equal(columns, expected_columns)


@pytest.mark.parametrize(
    "scores, k",
    [
        (torch.zeros(3, 800, dtype=torch.float64), 10),  # not float32
        (torch.zeros(3, 800), 101),  # 100 blocks: fewer than k
        (torch.zeros(3, 800), 0),
        (torch.zeros(800), 10),  # not a matrix
    ],
)
def test_what_it_declines(scores, k):
    assert not top_k_kernel.applies(scores, k)
    with pytest.raises(ValueError, match="float32 CPU matrix"):
        top_k_rows(scores, k)
