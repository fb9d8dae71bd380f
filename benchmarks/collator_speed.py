"""The collator alone: users per second, ours against a naive scipy-indexing collator.

What is measured: turning a shuffled epoch of user rows into training batches with mini-batch
negative sampling (batch_size 500, num_sampling_users 500), on ml-1m-implicit and Gowalla.

- naive (recsys-recoder's way, per group): ``matrix[users]`` (scipy row indexing),
  ``np.unique(rows.indices)``, the column slice ``rows[:, items]`` and ``.toarray()``.
- recsys-recoder 0.4.0's own data path, for reference: its ``RecommendationDataLoader``
  (dataset indexing and ``BatchCollator``: torch sparse batches), and the same plus the
  ``to_dense`` of its training step; in a subprocess of its own environment, timed inside.
- ours: ``rows_from_arrow`` on the group's Arrow rows (what a worker reads from Ray Data) and
  ``Collator``, which yields sparse batches (rows, cols, values over the sampled items); a GPU
  densifies them on the device, and on CPU the autoencoder reads them sparse. The column
  "ours + densify" adds a densification (``batch.densify`` on CPU) for a like-for-like count.
- floor: the bytes of our output written with no work done: the group's Arrow ids copied to
  int64 columns, zero rows, the values copied. No collator that writes this format can beat
  it; the gap between it and ours is the marking of the items and each entry's lookup.

The Arrow groups are taken from the table beforehand (Ray Data's work, not the collator's).
Rounds interleave the sides; medians of per-epoch wall-clock (``perf_counter``) times. Each side
starts with the caches cleared (a 64 MB buffer written), as a worker's rows come from Ray's
object store: otherwise a side would find what the side before it read still cached.

    python benchmarks/collator_speed.py            # ml-1m and Gowalla, ~1 min
    python benchmarks/collator_speed.py --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import (
    CACHE,
    load_average,
    load_matrix,
    markdown_table,
    median,
    npz_path,
    ratio,
    save_bar_plot,
)
from _reference_venv import run_reference

BATCH = 500


def naive_epoch(matrix, groups) -> None:
    for users in groups:
        rows = matrix[users]
        items = np.unique(rows.indices)
        rows[:, items].toarray()


def our_epoch(collator, tables, densify: bool) -> None:
    from recoder_dist.data.ray_dataset import rows_from_arrow
    from recoder_dist.training.batch import densify as to_dense

    cpu = torch.device("cpu")
    for table in tables:
        for batch in collator(rows_from_arrow(table)):
            if densify:
                to_dense(batch, cpu)


_CACHE_SWEEP = np.zeros(64 << 20, dtype=np.uint8)  # larger than this machine's caches


def clear_caches() -> None:
    _CACHE_SWEEP[::64] += 1  # a write to every cache line


def floor_epoch(tables) -> None:
    for table in tables:
        items = table.column("items").chunk(0).values.to_numpy()
        values = table.column("values").chunk(0).values.to_numpy()
        np.zeros(len(items), np.int64), items.astype(np.int64), values.astype(np.float32)


def reference_epochs(path: str, rounds: int) -> dict:
    job = dict(task="collate", matrix=path, batch_size=BATCH, repeats=rounds + 1)
    return {side: times[1:] for side, times in run_reference(job, threads=1).items()}


def measure(name: str, rounds: int, with_reference: bool) -> dict:
    from recoder_dist.data.collator import Collator
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.data.ray_dataset import user_rows_table

    matrix = load_matrix(name)
    table = user_rows_table(RecommendationDataset(matrix))
    order = np.random.default_rng(0).permutation(matrix.shape[0])
    groups = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    tables = [table.take(users) for users in groups]
    collator = Collator(num_items=matrix.shape[1], batch_size=BATCH, negative_sampling=True)
    sides = {
        "naive": lambda: naive_epoch(matrix, groups),
        "ours": lambda: our_epoch(collator, tables, densify=False),
        "ours + densify": lambda: our_epoch(collator, tables, densify=True),
        "floor (output bytes, no work)": lambda: floor_epoch(tables),
    }
    times = {side: [] for side in sides}
    for _ in range(rounds):
        for side, run in sides.items():
            clear_caches()
            start = time.perf_counter()
            run()
            times[side].append(time.perf_counter() - start)
    if with_reference:
        for side, seconds in reference_epochs(npz_path(name, matrix), rounds).items():
            times[f"recsys-recoder {side}"] = seconds
    return {"users": matrix.shape[0], "times": times}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip-reference", action="store_true", help="no recsys-recoder run")
    parser.add_argument("--quick", action="store_true", help="ml-1m, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.rounds = ["ml-1m"], 3
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {name: measure(name, args.rounds, not args.skip_reference) for name in args.datasets}

    print(f"\nmachine load when the table was taken: {load_average()}")
    print(f"batch_size {BATCH}, negative sampling; median of {args.rounds} interleaved epochs\n")
    rows, labels, series = [], [], {}
    for name, r in results.items():
        speed = {side: r["users"] / median(t) for side, t in r["times"].items()}
        for side, users_per_s in speed.items():
            rows.append([name, side, f"{users_per_s:,.0f}", ratio(users_per_s, speed["naive"])])
            series.setdefault(side, []).append(users_per_s)
        labels.append(name)
    print(markdown_table(["dataset", "collator", "users/s", "vs naive"], rows))
    save_bar_plot(
        CACHE / "collator_speed.png", "collator users per second", labels, series, "users/s"
    )
    print(f"wall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
