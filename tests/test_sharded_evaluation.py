"""Evaluation from sharded tables (the owners' top k merged) on 2 and 3 gloo ranks against the
whole DynamicAutoencoder in one process: the recommended lists of ``recommend_top_k`` and the
sums of ``metric_sums``.

Each process builds the same whole model (the independent reference) and shards it. The
weights are random normals, so scores do not tie (``torch.topk`` leaves the order of ties
open; the merge's order of ties is checked on its own, against the compiled kernel's). The
cases: k larger than a shard (and than the catalog), users whose input covers all but a few
items (fewer than k left), users without targets, ranks with fewer batches and a rank with no
batch at all, and a catalog large enough for the compiled top-k kernel on every shard. And the
tables gathered for a snapshot, chunk by chunk to the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist

from recoder_dist.data.collator import UserRows
from recoder_dist.metrics import NDCG, AveragePrecision, Recall
from recoder_dist.nn.autoencoder import DynamicAutoencoder
from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.training.evaluation import top_k_kernel
from recoder_dist.training.evaluation.scoring import metric_sums, recommend_top_k
from recoder_dist.training.evaluation.sharded import (
    merge_top_k,
    no_users,
    sharded_eval_sums,
    sharded_top_k,
)
from recoder_dist.training.evaluation.top_k import top_k
from tests.sharded_harness import gather_full_rows, run_ranks

CPU = torch.device("cpu")
METRICS = [Recall(k=5), NDCG(k=20), AveragePrecision(k=20, normalize=False)]
# (catalog, k, hidden layers, constrained): k above every shard's rows (and, at 70, above the
# catalog) on the small catalog; the compiled kernel on every shard of the large one.
CASES = [(53, 20, [8], False), (53, 70, [6, 4], True), (2003, 20, [8, 4], False)]
# Eval batches of each rank, in users: uneven, and on 3 ranks, a rank with none.
BATCHES = {2: [[7, 7, 3], [5]], 3: [[9, 2], [6, 6, 6], []]}


def _model(num_items: int, hidden: list[int], constrained: bool) -> DynamicAutoencoder:
    torch.manual_seed(num_items + len(hidden))
    model = DynamicAutoencoder(hidden, is_constrained=constrained)
    model.init_model(num_items=num_items)
    with torch.no_grad():
        for parameter in model.parameters():  # every score distinct, biases that count
            parameter.normal_(std=0.5)
    return model.eval()


def _eval_rows(num_users: int, num_items: int, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Inputs and targets: a few users whose input covers all but 3 items, some users without
    targets, the rest a few percent dense."""
    rng = np.random.default_rng(seed)
    inputs = (rng.random((num_users, num_items)) < 0.05).astype(np.float32)
    inputs[::7] = 1.0
    inputs[::7, rng.choice(num_items, 3, replace=False)] = 0.0
    targets = ((rng.random((num_users, num_items)) < 0.08) & (inputs == 0)).astype(np.float32)
    targets[3::11] = 0.0
    return sp.csr_matrix(inputs), sp.csr_matrix(targets)


def _rows(matrix: sp.csr_matrix, users: np.ndarray) -> UserRows:
    return UserRows.from_csr(matrix, users)


def _compare(rank, world, compiled):
    for number, (num_items, k, hidden, constrained) in enumerate(CASES):
        whole = _model(num_items, hidden, constrained)
        model = ShardedAutoencoder.like(whole).eval()
        sizes = BATCHES[world]
        inputs, targets = _eval_rows(sum(map(sum, sizes)), num_items, seed=number)
        first = sum(map(sum, sizes[:rank]))
        bounds = first + np.cumsum([0, *sizes[rank]])
        batches = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

        # The lists, batch by batch (every rank joins the most batches any rank has).
        for step in range(max(map(len, sizes))):
            rows = _rows(inputs, batches[step]) if step < len(batches) else no_users()
            items, valid = sharded_top_k(model, rows, k, CPU, compiled=compiled)
            expected_items, expected_valid = recommend_top_k(
                whole, rows, num_items, k, CPU, compiled=compiled
            )
            assert torch.equal(valid, expected_valid), f"case {number}: valid"
            assert torch.equal(items[valid], expected_items[expected_valid]), f"case {number}"
            covered = torch.from_numpy(rows.users % 7 == 0)  # 3 items left to recommend
            assert (valid[covered].sum(1) == 3).all(), f"case {number}: short lists"

        # The metric sums over every rank's users against one process's over all users.
        pairs = [(_rows(inputs, b), _rows(targets, b)) for b in batches]
        sums, users = sharded_eval_sums(model, pairs, METRICS, k, CPU, compiled=compiled)
        totals = torch.tensor([*sums, users], dtype=torch.float64)
        dist.all_reduce(totals)
        everyone = np.arange(inputs.shape[0])
        expected, expected_users = metric_sums(
            whole,
            _rows(inputs, everyone),
            _rows(targets, everyone),
            METRICS,
            k,
            num_items,
            CPU,
            compiled=compiled,
        )
        assert int(totals[-1]) == expected_users < inputs.shape[0]
        np.testing.assert_allclose(totals[:-1].numpy(), expected, rtol=1e-6, atol=1e-9)
        assert expected.min() > 0  # the metrics have hits to count


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_top_k_and_metrics_equal_the_whole_model(world, compiled):
    run_ranks(world, _compare, compiled)


def test_the_large_case_uses_the_compiled_kernel_on_every_shard():
    num_items, k = CASES[2][0], CASES[2][1]
    for world in (1, 2, 3):
        rows = -(-num_items // world)  # the largest shard; the smallest has one fewer
        assert top_k_kernel.applies(torch.zeros(1, rows - 1), k)


def test_merge_orders_ties_by_lowest_id_as_the_kernel_does():
    """Owners' local top k (the compiled kernel: lowest column first among ties) merged,
    against the kernel on the whole rows, on scores with many ties."""
    generator = torch.Generator().manual_seed(0)
    num_items, k, world = 600, 12, 3
    scores = torch.randint(0, 4, (25, num_items), generator=generator).float()
    scores[:, ::5] = -torch.inf
    candidates, ids = [], []
    for owner in range(world):
        local = scores[:, owner::world]
        assert top_k_kernel.applies(local, k)
        values, columns = top_k(local, k)
        candidates.append(values)
        ids.append(columns * world + owner)
    merged, items = merge_top_k(torch.cat(candidates, 1), torch.cat(ids, 1), k)
    expected, expected_items = top_k(scores, k)
    assert torch.equal(merged, expected)
    assert torch.equal(items, expected_items)


def _gather_in_chunks(rank, world):
    full = torch.randn(23, 3, generator=torch.Generator().manual_seed(1))
    rule = Ownership(23, world)
    mine = full[rank::world]
    for chunk_rows in (1, 2, 5, 100):
        for dst in (0, world - 1, None):
            gathered = gather_full_rows(mine, rule, dst, chunk_rows=chunk_rows)
            if dst in (None, rank):
                assert gathered.device.type == "cpu"
                assert torch.equal(gathered, full), (chunk_rows, dst)
            else:
                assert gathered is None


@pytest.mark.parametrize("world", [1, 3])
def test_a_table_gathered_in_chunks_is_the_whole_table(world):
    run_ranks(world, _gather_in_chunks)
