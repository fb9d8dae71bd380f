"""How evenly item ownership ``i % world`` spreads a catalog's rows and a step's touched rows,
against contiguous ranges of ids, on Gowalla and on the 1M-item long-tail catalog.

A step is a global batch of 500 users a rank (a seeded draw); its touched rows are the distinct
items of the batch. The step waits for the rank with the most rows to pool, score and update,
so the figure that matters is the busiest rank's touched rows over the mean. The modulo rule
is also measured on the ids renumbered at random (what a hash of the id would give).

    python benchmarks/shard_balance.py
    python benchmarks/shard_balance.py --datasets long-tail-1m --worlds 2 64
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import load_matrix, markdown_table
from sync_bytes import GROUP, long_tail

from recoder_dist.sharded.ownership import balance


def range_owner(items: np.ndarray, num_items: int, world: int) -> np.ndarray:
    """Contiguous ranges of ids, ``ceil(num_items / world)`` a rank (the alternative rule)."""
    return items // -(-num_items // world)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["gowalla", "long-tail-1m"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 8, 16, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in args.datasets:
        if name == "long-tail-1m":
            matrix = long_tail(users=200_000, items=1_000_000, per_user=30, seed=args.seed)
        else:
            matrix = load_matrix(name)
        num_users, num_items = matrix.shape
        rng = np.random.default_rng(args.seed)
        rows = []
        for world in args.worlds:
            users_a_step = min(world * GROUP, num_users)
            steps = [
                np.unique(matrix[rng.choice(num_users, users_a_step, replace=False)].indices)
                for _ in range(args.steps)
            ]
            modulo = balance(steps, num_items, world)
            ranges = [
                np.bincount(range_owner(items, num_items, world), minlength=world)
                for items in steps
            ]
            range_ratio = np.mean([c.max() / c.mean() for c in ranges])
            # The same steps with the ids renumbered at random: whether an imbalance comes from
            # structure in the ids (which a hash of the id would remove) or from the steps.
            shuffled = rng.permutation(num_items)
            hashed = balance([shuffled[items] for items in steps], num_items, world)
            rows.append(
                [
                    world,
                    f"{users_a_step:,}",
                    f"{modulo['rows'].min():,}-{modulo['rows'].max():,}",
                    f"{modulo['touched'].mean():,.0f}",
                    f"{modulo['touched'].min():,.0f}-{modulo['touched'].max():,.0f}",
                    f"{modulo['max_over_mean']:.3f}",
                    f"{range_ratio:.3f}",
                    f"{hashed['max_over_mean']:.3f}",
                ]
            )
        print(f"\n### {name}: {num_users:,} users x {num_items:,} items, {args.steps} steps\n")
        header = [
            "ranks",
            "users a step",
            "rows a rank",
            "touched rows a rank a step (mean)",
            "mean touched, least-most loaded rank",
            "busiest / mean, modulo",
            "busiest / mean, ranges",
            "busiest / mean, modulo of shuffled ids",
        ]
        print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
