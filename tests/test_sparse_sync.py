"""SparseGradSync across two real gloo processes, against all-reduced dense gradients."""

from __future__ import annotations

import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recoder_dist.training.sparse_sync import EXCHANGES, SparseGradSync

WORLD = 2
TABLES = [(50, 4), (30, 3)]  # (rows, dim) of the embedding tables

# case -> one entry per table: the rows each rank looks up (rank 0, rank 1).
CASES = {
    "overlapping": [([1, 5, 7, 9], [5, 9, 20, 33, 41])],
    "disjoint": [([0, 2, 4], [10, 11, 12, 13])],
    "one_rank_idle": [([3, 8, 8], [])],
    "duplicates": [([4, 4, 4, 17], [17, 17, 2])],
    "two_tables": [([1, 5, 7, 9], [5, 9, 20, 33, 41]), ([], [0, 29])],
    # 2 ranks x 26 rows > the 50-row table: the dense all-reduce path.
    "crowded": [(list(range(0, 50, 2)), list(range(1, 50, 2)) + [0])],
    # Both tables crowded: one dense buffer holds both.
    "crowded_two_tables": [
        (list(range(0, 50, 2)), list(range(1, 50, 2)) + [0]),
        (list(range(0, 30, 2)), list(range(1, 30, 2)) + [0]),
    ],
    # The first table gathered (2 x 21 rows <= 50), the second crowded (2 x 16 > 30).
    "gathered_and_crowded": [
        (list(range(0, 40, 2)), list(range(1, 40, 2)) + [0]),
        (list(range(0, 30, 2)), list(range(1, 30, 2)) + [0]),
    ],
}

# Bytes one rank sends: per table, the longest count of distinct rows over ranks, each padded
# row an int64 index (8 bytes) and dim float32 values (4 bytes each).
EXPECTED_BYTES = {
    "overlapping": 5 * (8 + 4 * 4),  # rank 1 has 5 distinct rows
    "disjoint": 4 * (8 + 4 * 4),
    "one_rank_idle": 2 * (8 + 4 * 4),  # rows {3, 8}
    "duplicates": 2 * (8 + 4 * 4),  # {4, 17} and {17, 2}
    "two_tables": 5 * (8 + 4 * 4) + 2 * (8 + 3 * 4),
    "crowded": 50 * (4 + 1) * 4,  # the whole table plus its "touched" column, float32
    "crowded_two_tables": 50 * (4 + 1) * 4 + 30 * (3 + 1) * 4,
    "gathered_and_crowded": 21 * (8 + 4 * 4) + 30 * (3 + 1) * 4,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dense_average(twins: list[nn.Embedding], world: int) -> list[torch.Tensor]:
    """The reference: each dense twin's gradient all-reduced and divided by the world size (a
    rank that touched nothing adds zeros)."""
    averaged = []
    for twin in twins:
        grad = torch.zeros_like(twin.weight) if twin.weight.grad is None else twin.weight.grad
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        averaged.append(grad / world)
    return averaged


def coo_of(tables: list[nn.Embedding]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, values) of each table's sparse gradient, as the sync left them (uncoalesced)."""
    return [(t.weight.grad._indices(), t.weight.grad._values()) for t in tables]


def assert_same_coo(ring: list, gathered: list) -> None:
    """The same indices and values in the same order, table by table."""
    for (ring_idx, ring_val), (gathered_idx, gathered_val) in zip(ring, gathered, strict=True):
        assert torch.equal(ring_idx, gathered_idx)
        assert torch.equal(ring_val, gathered_val)


def run_case(rank: int, case: list, exchange: str) -> dict:
    """One step on this rank: returns the synced gradients, the dense reference and bytes."""
    tables, twins, losses = [], [], []
    for t, (rows, dim) in enumerate(TABLES[: len(case)]):
        torch.manual_seed(100 + t)  # identical weights on both ranks
        table = nn.Embedding(rows, dim, sparse=True)
        twin = nn.Embedding(rows, dim, sparse=False)
        twin.weight.data.copy_(table.weight.data)
        indices = torch.tensor(case[t][rank], dtype=torch.int64)
        if len(indices):
            gen = torch.Generator().manual_seed(1000 * rank + t)  # distinct on each rank
            weights = torch.randn(len(indices), dim, generator=gen)
            losses.append((table(indices) * weights).sum())
            (twin(indices) * weights).sum().backward()
        tables.append(table)
        twins.append(twin)
    if losses:
        sum(losses).backward()
    grads_before = [None if t.weight.grad is None else "sparse" for t in tables]

    sync = SparseGradSync([t.weight for t in tables], exchange=exchange)
    sync.synchronize()

    reference = dense_average(twins, WORLD)
    return {
        "grads_before": grads_before,
        "is_sparse": [t.weight.grad.is_sparse for t in tables],
        "shapes": [tuple(t.weight.grad.shape) for t in tables],
        "synced": [t.weight.grad.to_dense() for t in tables],
        "synced_coo": coo_of(tables),
        "reference": reference,
        "bytes_sent": sync.bytes_sent,
        "dense_bytes": sync.dense_bytes,
    }


def dense_grad_registered_as_sparse() -> str:
    """Both ranks register a table whose gradient is dense: synchronize must refuse it."""
    table = nn.Embedding(50, 4, sparse=False)
    table(torch.tensor([1, 2])).sum().backward()
    try:
        SparseGradSync([table.weight]).synchronize()
    except RuntimeError as e:
        return f"RuntimeError: {e}"
    return "no error"


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),
    )
    try:
        results = {
            exchange: {name: run_case(rank, case, exchange) for name, case in CASES.items()}
            for exchange in EXCHANGES
        }
        results["dense_grad"] = dense_grad_registered_as_sparse()
        dist.barrier()
    except BaseException:
        results = {"error": traceback.format_exc()}
        raise
    finally:
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()


def spawn_ranks(function, ranks: int, out_dir) -> None:
    """Runs ``function(rank, port, out_dir)`` in ``ranks`` spawned processes, within 120 s.
    join() raises ProcessRaisedException if a child failed: that fails the caller."""
    context = mp.spawn(function, args=(free_port(), str(out_dir)), nprocs=ranks, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {ranks} sync processes did not finish within 120 s")


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    """Runs every case with each exchange in one pair of spawned processes; returns
    {rank: {exchange: {case: results}, "dense_grad": ...}}."""
    out_dir = tmp_path_factory.mktemp("sparse_sync")
    spawn_ranks(worker, WORLD, out_dir)
    return {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)}


@pytest.fixture(params=EXCHANGES)
def results(all_results, request):
    """{rank: {case: results}} of one exchange (every test runs for both)."""
    for rank in (0, 1):
        assert "error" not in all_results[rank], all_results[rank].get("error")
    return {
        rank: {**all_results[rank][request.param], "exchange": request.param} for rank in (0, 1)
    }


@pytest.mark.parametrize("case", list(CASES))
def test_both_exchanges_give_the_same_gradient_to_the_bit(all_results, case):
    """The ring (exact counts, point to point) and the padded all-gather give the same sparse
    tensors: the same indices and values in the same order, so the optimizer sums alike."""
    for rank in (0, 1):
        assert_same_coo(*(all_results[rank][e][case]["synced_coo"] for e in EXCHANGES))


@pytest.mark.parametrize("case", list(CASES))
def test_synced_sparse_grad_equals_dense_average(results, case):
    """On every rank, the synced sparse gradient equals the all-reduced dense gradient / 2."""
    for rank in (0, 1):
        got = results[rank][case]
        assert "error" not in results[rank]
        assert got["is_sparse"] == [True] * len(CASES[case])
        assert got["shapes"] == list(TABLES[: len(CASES[case])])
        for synced, reference in zip(got["synced"], got["reference"]):
            torch.testing.assert_close(synced, reference)
    for synced0, synced1 in zip(results[0][case]["synced"], results[1][case]["synced"]):
        assert torch.equal(synced0, synced1)


@pytest.mark.parametrize("case", list(CASES))
def test_synced_rows_are_the_touched_rows(results, case):
    """The synced gradient is non-zero exactly on the rows that some rank touched."""
    touched = [sorted(set(r0) | set(r1)) for r0, r1 in CASES[case]]
    for t, rows in enumerate(touched):
        synced = results[0][case]["synced"][t]
        nonzero = sorted(synced.abs().sum(1).nonzero().flatten().tolist())
        assert nonzero == rows


def test_idle_rank_had_no_gradient(results):
    """In 'one_rank_idle' rank 1 had grad None before the sync and a sparse one after it."""
    assert results[0]["one_rank_idle"]["grads_before"] == ["sparse"]
    assert results[1]["one_rank_idle"]["grads_before"] == [None]
    assert results[1]["two_tables"]["grads_before"] == ["sparse", "sparse"]
    assert results[0]["two_tables"]["grads_before"] == ["sparse", None]


def own_rows_bytes(case: str, rank: int) -> int:
    """The ring's bytes_sent: this rank's own distinct rows of the gathered tables (int64
    index, float32 values), and the dense buffer of the crowded ones, as in EXPECTED_BYTES."""
    total = 0
    for rows_by_rank, (rows, dim) in zip(CASES[case], TABLES):
        if WORLD * max(len(set(r)) for r in rows_by_rank) > rows:  # crowded: the dense buffer
            total += rows * (dim + 1) * 4
        else:
            total += len(set(rows_by_rank[rank])) * (8 + 4 * dim)
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_bytes_sent_is_the_payload(results, case):
    """bytes_sent: the padded (indices, values) payload that each rank all-gathers, or its
    own rows that the ring sends; the dense buffer in both."""
    for rank in (0, 1):
        expected = (
            EXPECTED_BYTES[case]
            if results[rank]["exchange"] == "all_gather"
            else own_rows_bytes(case, rank)
        )
        assert results[rank][case]["bytes_sent"] == expected


def test_own_rows_bytes_by_hand():
    assert own_rows_bytes("overlapping", 0) == 4 * (8 + 4 * 4)
    assert own_rows_bytes("one_rank_idle", 1) == 0
    assert own_rows_bytes("gathered_and_crowded", 1) == 21 * (8 + 4 * 4) + 30 * (3 + 1) * 4


@pytest.mark.parametrize("case", list(CASES))
def test_dense_bytes_is_whole_table_size(results, case):
    """dense_bytes is what a dense all-reduce would move: every float32 of every table."""
    expected = sum(rows * dim * 4 for rows, dim in TABLES[: len(CASES[case])])
    assert expected == {1: 50 * 4 * 4, 2: 50 * 4 * 4 + 30 * 3 * 4}[len(CASES[case])]
    assert results[0][case]["dense_bytes"] == results[1][case]["dense_bytes"] == expected


def test_dense_gradient_is_refused(all_results):
    """A parameter registered as sparse but holding a dense gradient raises RuntimeError."""
    for rank in (0, 1):
        assert all_results[rank]["dense_grad"].startswith("RuntimeError: ")
        assert "dense gradient" in all_results[rank]["dense_grad"]


def three_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """Three ranks, two tables of random rows (one rank touching none of the second table's):
    every exchange's gradients, and the all-reduced dense reference."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
        timeout=timedelta(seconds=30),
    )  # fmt: skip
    try:
        out = {}
        for exchange in EXCHANGES:
            tables, twins = [], []
            for t, (rows, dim) in enumerate([(500, 8), (300, 1)]):
                torch.manual_seed(t)
                table, twin = nn.Embedding(rows, dim, sparse=True), nn.Embedding(rows, dim)
                twin.weight.data.copy_(table.weight.data)
                gen = torch.Generator().manual_seed(10 * rank + t)
                count = 0 if (t, rank) == (1, 2) else 40 + 15 * rank
                indices = torch.randint(0, rows, (count,), generator=gen)
                weights = torch.randn(count, dim, generator=gen)
                for module in (table, twin):
                    (module(indices) * weights).sum().backward()
                tables.append(table)
                twins.append(twin)
            SparseGradSync([t.weight for t in tables], exchange=exchange).synchronize()
            out[exchange] = {
                "coo": coo_of(tables),
                "synced": [t.weight.grad.to_dense() for t in tables],
                "reference": dense_average(twins, 3),
            }
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_three_ranks_ring_equals_all_gather_and_the_dense_average(tmp_path):
    """With 3 ranks the ring takes 2 hops, and a slot of no rows is skipped by both sides."""
    spawn_ranks(three_rank_worker, 3, tmp_path)
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for exchange in EXCHANGES:
            for synced, reference in zip(got[exchange]["synced"], got[exchange]["reference"]):
                torch.testing.assert_close(synced, reference)
        assert_same_coo(got["ring"]["coo"], got["all_gather"]["coo"])
