"""Bytes that the sparse embedding sync moves per step, for 2 to 64 ranks, and what they cost.

Counted, not timed: each step, every rank takes a sampling group of 500 users (a seeded draw
without replacement) and its autoencoder's three item tables (a 200-dim encoder and decoder, a
1-dim bias) hold gradients on the union of the group's items (negative sampling). The path of
every table follows ``SparseGradSync``'s rule (all-gather when world x the longest rank's rows
<= DENSE_SHARE x the table's rows, else one dense all-reduce buffer for the crowded tables), and
the bytes through each rank's link are those of ring collectives:

- all-gather of P bytes a rank: (world - 1) x P sent (and received); this is NCCL's exchange,
  the GPUs' default (on gloo the ring sends each rank's rows unpadded: (world - 1) x the mean
  rank's rows rather than the longest's);
- all-reduce of S bytes: 2 (world - 1) / world x S sent (reduce-scatter, then all-gather);
- DDP's dense all-reduce of the same tables, for comparison: the all-reduce of the tables.

Then a projection: step time = compute + link bytes / bandwidth (no overlap), at a compute time
per step that is an input (``--step-ms``; the default is this machine's measured CPU step on
Gowalla, benchmarks/RESULTS.md) and two link bandwidths, NVLink 4 (H100 SXM: 900 GB/s in both
directions together, 450 GB/s each way) and InfiniBand NDR (400 Gb/s a port: 50 GB/s). Scaling
efficiency = epoch time on 1 rank / (world x epoch time on world ranks), with 500 users a rank
a step (``batch_size`` is per worker): each rank runs 1/world of the steps, so the efficiency
is compute / (compute + link bytes / bandwidth).

    python benchmarks/sync_bytes.py
    python benchmarks/sync_bytes.py --datasets gowalla --step-ms 5
    python benchmarks/sync_bytes.py --step-ms 2 --plot benchmarks/sync_projection.png
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
from _common import load_matrix, markdown_table

from recoder_dist.training.sparse_sync import DENSE_SHARE

TABLE_DIMS = (200, 200, 1)  # encoder, decoder, bias: each one row per item
GROUP = 500
WORLDS = (1, 2, 4, 8, 16, 32, 64)
LINKS = {"NVLink 4, 450 GB/s": 450e9, "InfiniBand NDR, 50 GB/s": 50e9}


def long_tail(users: int, items: int, per_user: int, seed: int = 0) -> sp.csr_matrix:
    """A synthetic catalog: Zipf(1.1) item popularity, ``per_user`` draws a user."""
    rng = np.random.default_rng(seed)
    cols = (rng.zipf(1.1, size=users * per_user) - 1) % items
    rows = np.repeat(np.arange(users), per_user)
    matrix = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(users, items))
    matrix.sum_duplicates()
    return matrix


def link_bytes(counts: list[int], num_items: int) -> tuple[float, float]:
    """Bytes through a rank's link in one step: SparseGradSync's, and DDP's dense all-reduce."""
    world = len(counts)
    if world == 1:
        return 0.0, 0.0
    longest = max(counts)
    sync, dense_buffer, ddp = 0.0, 0, 0
    for dim in TABLE_DIMS:
        ddp += num_items * dim * 4
        if world * longest <= DENSE_SHARE * num_items:
            sync += (world - 1) * longest * (8 + 4 * dim)  # int64 index + float32 row
        else:
            dense_buffer += num_items * (dim + 1) * 4  # the row and its "touched" count
    ring = 2 * (world - 1) / world
    return sync + ring * dense_buffer, ring * ddp


def measure(matrix: sp.csr_matrix, steps: int, seed: int) -> dict[int, dict]:
    """Per world size: the mean rows a rank touches, and the mean link bytes of both syncs."""
    rng = np.random.default_rng(seed)
    num_users, num_items = matrix.shape
    out = {}
    for world in WORLDS:
        if world * GROUP > num_users:  # fewer users than one step of every rank takes
            continue
        rows, sync, ddp = [], [], []
        for _ in range(steps):
            users = rng.choice(num_users, size=world * GROUP, replace=False)
            counts = [
                len(np.unique(matrix[users[r * GROUP : (r + 1) * GROUP]].indices))
                for r in range(world)
            ]
            rows.append(np.mean(counts))
            step_sync, step_ddp = link_bytes(counts, num_items)
            sync.append(step_sync)
            ddp.append(step_ddp)
        out[world] = dict(rows=np.mean(rows), sync=np.mean(sync), ddp=np.mean(ddp))
    return out


def projection(bytes_by_world: dict, step_seconds: float, key: str) -> list[list]:
    """Epoch-time efficiency of ``world`` ranks against one, per link (a rank runs 1/world of
    the steps, each of the same compute time)."""
    rows = []
    for world, measured in bytes_by_world.items():
        row = [world]
        for bandwidth in LINKS.values():
            step = step_seconds + measured[key] / bandwidth
            row.append(f"{step_seconds / step:.0%}")
        rows.append(row)
    return rows


def efficiency(measured: dict, step_seconds: float, key: str, bandwidth: float) -> list[float]:
    return [step_seconds / (step_seconds + m[key] / bandwidth) for m in measured.values()]


def save_plot(path: str, results: dict, step_seconds: float) -> None:
    """One panel per dataset: projected efficiency against ranks, per sync and link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.4), dpi=100)
    for ax, (name, measured) in zip(np.atleast_1d(axes), results.items()):
        worlds = list(measured)
        for key, label, style in (("sync", "sparse sync", "-"), ("ddp", "DDP dense", "--")):
            for link, bandwidth in LINKS.items():
                values = efficiency(measured, step_seconds, key, bandwidth)
                ax.plot(worlds, values, style, marker="o", label=f"{label}, {link.split(',')[0]}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("ranks")
        ax.set_ylabel("projected scaling efficiency")
        ax.set_title(f"{name}, {step_seconds * 1e3:g} ms of compute a step", fontsize=9)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"\nplot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["gowalla", "long-tail-1m"])
    parser.add_argument("--steps", type=int, default=20, help="sampled steps per world size")
    parser.add_argument(
        "--step-ms",
        type=float,
        default=86.0,
        help="compute time of one 500-user step (default: this CPU's, Gowalla, 1 thread)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="save the projection as a PNG here (needs matplotlib)")
    args = parser.parse_args()
    results = {}
    for name in args.datasets:
        if name == "long-tail-1m":
            matrix = long_tail(users=200_000, items=1_000_000, per_user=30, seed=args.seed)
        else:
            matrix = load_matrix(name)
        measured = results[name] = measure(matrix, args.steps, args.seed)
        print(f"\n### {name}: {matrix.shape[0]:,} users x {matrix.shape[1]:,} items\n")
        header = ["ranks", "rows a rank touches", "sync MB a rank", "DDP dense MB a rank", "ratio"]
        rows = [
            [
                world,
                f"{m['rows']:,.0f}",
                f"{m['sync'] / 1e6:,.1f}",
                f"{m['ddp'] / 1e6:,.1f}",
                f"{m['ddp'] / m['sync']:.1f}x" if m["sync"] else "-",
            ]
            for world, m in measured.items()
        ]
        print(markdown_table(header, rows))
        for key, label in (("sync", "SparseGradSync"), ("ddp", "DDP dense all-reduce")):
            print(
                f"\nprojected scaling efficiency, {label}, {args.step_ms:g} ms of compute a step\n"
            )
            print(markdown_table(["ranks", *LINKS], projection(measured, args.step_ms / 1e3, key)))

    if args.plot:
        save_plot(args.plot, results, args.step_ms / 1e3)


if __name__ == "__main__":
    main()
