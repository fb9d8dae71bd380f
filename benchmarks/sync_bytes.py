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
    python benchmarks/sync_bytes.py --model mf   # MatrixFactorization's step

Beside today's sync, the sharded path of ``recoder_dist/sharded`` (issue #32), counted from the
same sampled steps: what each rank sends in one step, forward and backward, through its link
(``sharded_bytes``). Its figures are given twice: with 500 users a rank (the global batch grows
with the world, as above), and with the global batch fixed at 500 users (``batch_size=500``
split over the ranks). Ranks' own entries and codes never cross a link and are not counted.

And the 2D layout (``Recoder(shard_group_size=G)``): the tables sharded within groups of G
ranks (a node's GPUs, over NVLink) and replicated across the groups (over InfiniBand), 500
users a rank. A rank sends its group's sharded exchange (``sharded_bytes`` over the group's
batch) through NVLink, and the rows of its shard that its group touched, to its replicas in
the other groups (``SparseGradSync`` over the group of replicas, ``link_bytes``' rule on a
table of ``num_items / G`` rows), through InfiniBand. Projected: compute + the first over
NVLink + the second over InfiniBand.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
from _common import load_matrix, markdown_table

from recoder_dist.training.sparse_sync import DENSE_SHARE

TABLE_DIMS = (200, 200, 1)  # encoder, decoder, bias: each one row per item
HIDDEN = 200  # the codes' width (the [200] autoencoder)
# An entry on its way to the item's owner: its row and local index (int64 each), its input
# value (normalized, noised) and its target value (float32 each).
ENTRY_BYTES = 8 + 8 + 4 + 4
GROUP = 500
WORLDS = (1, 2, 4, 8, 16, 32, 64)
NODE = 8  # GPUs a node: the 2D layout's group
LINKS = {"NVLink 4, 450 GB/s": 450e9, "InfiniBand NDR, 50 GB/s": 50e9}


def long_tail(users: int, items: int, per_user: int, seed: int = 0) -> sp.csr_matrix:
    """A synthetic catalog: Zipf(1.1) item popularity, ``per_user`` draws a user."""
    rng = np.random.default_rng(seed)
    cols = (rng.zipf(1.1, size=users * per_user) - 1) % items
    rows = np.repeat(np.arange(users), per_user)
    matrix = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(users, items))
    matrix.sum_duplicates()
    return matrix


def link_bytes(
    counts: list[int], num_items: int, dims: tuple[int, ...] = TABLE_DIMS
) -> tuple[float, float]:
    """Bytes through a rank's link in one step: SparseGradSync's, and DDP's dense all-reduce,
    for tables of ``num_items`` rows and widths ``dims`` of which rank r touched ``counts[r]``
    rows."""
    world = len(counts)
    if world == 1:
        return 0.0, 0.0
    longest = max(counts)
    sync, dense_buffer, ddp = 0.0, 0, 0
    for dim in dims:
        ddp += num_items * dim * 4
        if world * longest <= DENSE_SHARE * num_items:
            sync += (world - 1) * longest * (8 + 4 * dim)  # int64 index + float32 row
        else:
            dense_buffer += num_items * (dim + 1) * 4  # the row and its "touched" count
    ring = 2 * (world - 1) / world
    return sync + ring * dense_buffer, ring * ddp


def sharded_bytes(
    block: sp.csr_matrix, sizes: list[int], hidden: int = HIDDEN, users: np.ndarray | None = None
) -> dict:
    """Bytes that each rank sends in one sharded step (forward and backward), per exchange.

    Args:
        block: the step's global batch (rank 0's rows, then rank 1's, ...).
        sizes: users of each rank.
        hidden: the codes' width.
        users: MatrixFactorization's step: the rows' global user ids (its user table is
            sharded too: each user's row comes from its owner, ``u % world``, and its gradient
            goes back; its entries carry no input value, and it has no dense layer). None:
            the autoencoder's (the encoder's pooling sends partial codes home).

    Returns:
        per-rank arrays: ``entries`` (to the items' owners), ``partials`` (partial codes back
        to the users' ranks, and their gradients to the owners), ``codes`` (the all-gather of
        every rank's codes, padded to the longest rank's, in a ring; and the codes' gradients
        back, an all-to-all), ``small`` (counts, batch sizes, the encoder bias's all-reduce,
        the loss), ``stats`` (logloss only: the rows' max and sum of exponentials, and the
        gradient of their log-sum-exp: three all-reduces of the global batch's floats),
        and ``scores`` (users x items this rank scores).
    """
    factorization = users is not None
    world, num_rows = len(sizes), block.shape[0]
    rank_of_row = np.repeat(np.arange(world), sizes)
    rows = np.repeat(np.arange(num_rows), np.diff(block.indptr))
    source, owner = rank_of_row[rows], block.indices % world
    away = source != owner
    # MatrixFactorization's entries carry their target only, not an input value as well.
    entry_bytes = ENTRY_BYTES - 4 if factorization else ENTRY_BYTES
    entries = np.bincount(source[away], minlength=world) * entry_bytes
    row_bytes = hidden * 4
    if factorization:
        # Each user's row from its owner: an entry there (its row, id and weight of 1), the
        # row back, its gradient there again; a user of its owner's rank stays home.
        pair_owner, pair_source = np.asarray(users) % world, rank_of_row
        away = pair_source != pair_owner
        entries = entries + np.bincount(pair_source[away], minlength=world) * entry_bytes
    else:
        # One partial code per (user, owner) pair with entries; the user's own rank's stays home.
        pairs = np.unique(rows.astype(np.int64) * world + owner)
        pair_owner, pair_source = pairs % world, rank_of_row[pairs // world]
        away = pair_source != pair_owner
    partials = (
        np.bincount(pair_owner[away], minlength=world)
        + np.bincount(pair_source[away], minlength=world)
    ) * row_bytes
    sizes = np.asarray(sizes)
    codes = (world - 1) * sizes.max() * row_bytes + (num_rows - sizes) * row_bytes
    ring = 2 * (world - 1) / world
    # Each route's counts (the batch sizes' all-gather, the counts' all-to-all: two routes for
    # MatrixFactorization, its users' and its items'); the dense layers' gradients (the
    # autoencoder's encoder bias) and the loss in all-reduces.
    dense = 0 if factorization else hidden
    small = (1 + factorization) * 2 * (world - 1) * 8 + ring * (dense + 1) * 4
    stats = np.full(world, 3 * ring * num_rows * 4)
    items = np.unique(block.indices)
    scores = num_rows * np.bincount(items % world, minlength=world)
    return dict(
        entries=entries, partials=partials, codes=codes, small=small, stats=stats, scores=scores
    )


def replicated_bytes(
    counts: list[int], num_items: int, num_users: int, factorization: bool
) -> tuple[float, float]:
    """``link_bytes`` of a step's replicated tables: the autoencoder's three item tables, or
    MatrixFactorization's two item tables and its user table (``GROUP`` rows a rank)."""
    if not factorization:
        return link_bytes(counts, num_items)
    items = link_bytes(counts, num_items, dims=(HIDDEN, 1))
    users = link_bytes([GROUP] * len(counts), num_users, dims=(HIDDEN,))
    return items[0] + users[0], items[1] + users[1]


def measure(
    matrix: sp.csr_matrix, steps: int, seed: int, factorization: bool = False
) -> dict[int, dict]:
    """Per world size: the mean rows a rank touches, and the mean link bytes of both syncs
    (``factorization``: MatrixFactorization's step, else the autoencoder's)."""
    rng = np.random.default_rng(seed)
    num_users, num_items = matrix.shape
    out = {}
    for world in WORLDS:
        if world * GROUP > num_users:  # fewer users than one step of every rank takes
            continue
        rows, sync, ddp, scores, sharded, fixed, intra, inter = [], [], [], [], [], [], [], []
        for _ in range(steps):
            users = rng.choice(num_users, size=world * GROUP, replace=False)
            counts = [
                len(np.unique(matrix[users[r * GROUP : (r + 1) * GROUP]].indices))
                for r in range(world)
            ]
            rows.append(np.mean(counts))
            scores.append(GROUP * np.mean(counts))  # today: a rank scores its group's items
            step_sync, step_ddp = replicated_bytes(counts, num_items, num_users, factorization)
            sync.append(step_sync)
            ddp.append(step_ddp)
            ids = users if factorization else None
            sharded.append(sharded_bytes(matrix[users], [GROUP] * world, users=ids))
            # The global batch fixed at GROUP users, dealt out as evenly as it goes.
            fixed_sizes = [len(part) for part in np.array_split(np.arange(GROUP), world)]
            first = None if ids is None else ids[:GROUP]
            fixed.append(sharded_bytes(matrix[users[:GROUP]], fixed_sizes, users=first))
            if world > NODE:
                group_bytes, replica_bytes = two_d_bytes(matrix, users, world, NODE, factorization)
                intra.append(group_bytes)
                inter.append(replica_bytes)
        out[world] = dict(
            rows=np.mean(rows),
            sync=np.mean(sync),
            ddp=np.mean(ddp),
            today_scores=np.mean(scores),
            sharded=_mean_over_steps(sharded),
            fixed=_mean_over_steps(fixed),
        )
        if intra:
            out[world]["two_d_intra"] = float(np.mean(intra))
            out[world]["two_d_inter"] = float(np.mean(inter))
    return out


def two_d_bytes(
    matrix: sp.csr_matrix, users: np.ndarray, world: int, group: int, factorization=False
):
    """Bytes a rank sends in one step of the 2D layout (``world`` ranks in groups of ``group``,
    ``GROUP`` users a rank, ``users`` in rank order), mean over ranks: within its group (the
    sharded exchange, logloss) and to its replicas (the rows of its shard that its group
    touched, as ``link_bytes`` counts a sync of a ``num_items / group``-row table; for
    MatrixFactorization, its item tables' and its user table's)."""
    (num_users, num_items), groups = matrix.shape, world // group
    within, touched, touched_users = [], [], []
    for g in range(groups):
        ids = users[g * group * GROUP : (g + 1) * group * GROUP]
        block = matrix[ids]
        b = sharded_bytes(block, [GROUP] * group, users=ids if factorization else None)
        within.append(np.mean(b["entries"] + b["partials"] + b["codes"] + b["stats"]) + b["small"])
        touched.append(np.bincount(np.unique(block.indices) % group, minlength=group))
        touched_users.append(np.bincount(ids % group, minlength=group))
    touched, touched_users = np.array(touched), np.array(touched_users)  # groups x shards
    across = []
    for r in range(group):
        if factorization:
            items = link_bytes(list(touched[:, r]), num_items // group, dims=(HIDDEN, 1))[0]
            rows = link_bytes(list(touched_users[:, r]), num_users // group, dims=(HIDDEN,))[0]
            across.append(items + rows)
        else:
            across.append(link_bytes(list(touched[:, r]), num_items // group)[0])
    return float(np.mean(within)), float(np.mean(across))


def _mean_over_steps(steps: list[dict]) -> dict:
    """Each exchange's bytes, mean over ranks and steps; ``total`` (mse, logistic: no stats)
    and ``total_logloss``; ``max_total``: the busiest rank's total, mean over steps."""
    keys = ("entries", "partials", "codes", "small", "stats", "scores")
    out = {key: float(np.mean([np.mean(step[key]) for step in steps])) for key in keys}
    out["total"] = out["entries"] + out["partials"] + out["codes"] + out["small"]
    out["total_logloss"] = out["total"] + out["stats"]
    out["max_total"] = float(
        np.mean(
            [
                np.max(step["entries"] + step["partials"] + step["codes"]) + step["small"]
                for step in steps
            ]
        )
    )
    return out


def sharded_rows(measured: dict, layout: str) -> tuple[list[str], list[list]]:
    """The sharded bytes of ``layout`` beside today's sync (whose steps have 500 users a
    rank: the ratio compares the same global batch only for layout ``sharded``)."""
    header = [
        "ranks",
        "entries",
        "partial codes",
        "codes",
        "logloss stats",
        "total (mse, logistic)",
        "total (logloss)",
        "busiest rank",
        "today's sync",
        "today / sharded",
        "scores a rank, vs today",
    ]
    rows = []
    for world, m in measured.items():
        b = m[layout]
        ratio = m["sync"] / b["total_logloss"] if m["sync"] and b["total_logloss"] else 0
        rows.append(
            [
                world,
                *(f"{b[key] / 1e6:,.3f}" for key in ("entries", "partials", "codes", "stats")),
                f"{b['total'] / 1e6:,.3f}",
                f"{b['total_logloss'] / 1e6:,.3f}",
                f"{b['max_total'] / 1e6:,.3f}",
                f"{m['sync'] / 1e6:,.1f}",
                f"{ratio:.1f}x" if ratio else "-",
                f"{b['scores'] / m['today_scores']:.2f}x",
            ]
        )
    return header, rows


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


def two_d_rows(measured: dict, step_seconds: float) -> tuple[list[str], list[list]]:
    """The 2D layout's bytes and projected efficiency, beside the 1D sharded layout's over
    NVLink (every rank in one group) and over InfiniBand (ranks on several nodes)."""
    nvlink, infiniband = LINKS.values()
    header = [
        "ranks",
        "MB within the group",
        "MB to the replicas",
        "2D efficiency",
        "1D sharded, all NVLink",
        "1D sharded, InfiniBand",
    ]
    rows = []
    for world, m in measured.items():
        if "two_d_intra" not in m:
            continue
        step = step_seconds + m["two_d_intra"] / nvlink + m["two_d_inter"] / infiniband
        one_d = m["sharded"]["total_logloss"]
        rows.append(
            [
                world,
                f"{m['two_d_intra'] / 1e6:,.3f}",
                f"{m['two_d_inter'] / 1e6:,.3f}",
                f"{step_seconds / step:.0%}",
                f"{step_seconds / (step_seconds + one_d / nvlink):.0%}",
                f"{step_seconds / (step_seconds + one_d / infiniband):.0%}",
            ]
        )
    return header, rows


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
    parser.add_argument(
        "--model",
        choices=["autoencoder", "mf"],
        default="autoencoder",
        help="whose step: the [200] autoencoder's, or 200-dim MatrixFactorization's",
    )
    parser.add_argument("--plot", help="save the projection as a PNG here (needs matplotlib)")
    args = parser.parse_args()
    results = {}
    for name in args.datasets:
        if name == "long-tail-1m":
            matrix = long_tail(users=200_000, items=1_000_000, per_user=30, seed=args.seed)
        else:
            matrix = load_matrix(name)
        measured = results[name] = measure(matrix, args.steps, args.seed, args.model == "mf")
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
        for layout, label in (("sharded", "500 users a rank"), ("fixed", "global batch of 500")):
            print(f"\nsharded, {label}: MB a rank sends a step (mean over ranks)\n")
            print(markdown_table(*sharded_rows(measured, layout)))
        for m in measured.values():
            m["sharded_total"] = m["sharded"]["total_logloss"]
        for key, label in (
            ("sync", "SparseGradSync"),
            ("ddp", "DDP dense all-reduce"),
            ("sharded_total", "sharded, 500 users a rank, logloss"),
        ):
            print(
                f"\nprojected scaling efficiency, {label}, {args.step_ms:g} ms of compute a step\n"
            )
            print(markdown_table(["ranks", *LINKS], projection(measured, args.step_ms / 1e3, key)))
        print(
            f"\n2D layout, groups of {NODE} (NVLink 450 GB/s within, InfiniBand 50 GB/s across), "
            f"500 users a rank, logloss, {args.step_ms:g} ms of compute a step\n"
        )
        print(markdown_table(*two_d_rows(measured, args.step_ms / 1e3)))

    if args.plot:
        save_plot(args.plot, results, args.step_ms / 1e3)


if __name__ == "__main__":
    main()
