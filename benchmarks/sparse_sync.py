"""Gradient sync of item embeddings per step: dense all-reduce (what DDP does) vs SparseGradSync.

Two gloo processes on this machine; a synthetic catalog with power-law (Zipf) item popularity;
each rank's step touches the items of a batch of users (mini-batch negative sampling touches
exactly those rows). SparseGradSync runs with its own choice of path (auto) and with each of
its paths forced: gathering the rows (by the ring of sends, or by all-gather), or all-reducing
them in a dense buffer. Prints one table of measured bytes and times, and their ratios.

    python benchmarks/sparse_sync.py                      # 20k, 200k, 2M items x 200
    python benchmarks/sparse_sync.py --items 2810 40981 200000 --steps 7
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recoder_dist.training import sparse_sync
from recoder_dist.training.sparse_sync import SparseGradSync


def touched_items(rng, num_items: int, users: int, items_per_user: int) -> torch.Tensor:
    """Items of a batch of users, drawn with Zipf(1.1)-like popularity over the catalog."""
    ranks = rng.zipf(1.1, size=users * items_per_user)
    return torch.from_numpy(np.unique((ranks - 1) % num_items))


# The library's choice, and each of its paths forced (DENSE_SHARE patched per step): the rows
# gathered by the ring (gloo's default) or by all-gather (NCCL's default), or the dense buffer.
PATHS = {
    "auto": (None, None),
    "ring": (float("inf"), "ring"),
    "all-gather": (float("inf"), "all_gather"),
    "dense buffer": (0.0, None),
}


def worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    default_share = sparse_sync.DENSE_SHARE
    rng = np.random.default_rng(rank)
    for num_items in args.items:
        table = torch.nn.Embedding(num_items, args.dim, sparse=True)
        dense_grad = torch.zeros(num_items, args.dim)
        times = {name: [] for name in ["ddp", *PATHS]}
        sent = {name: 0 for name in PATHS}
        rows = []
        for step in range(args.steps + 1):  # the first step warms up and is not counted
            items = touched_items(rng, num_items, args.batch_users, args.items_per_user)
            rows.append(len(items))
            for name, (share, exchange) in PATHS.items():
                sparse_sync.DENSE_SHARE = default_share if share is None else share
                sync = SparseGradSync([table.weight], exchange=exchange)
                table.weight.grad = None
                table(items).sum().backward()
                dist.barrier()
                start = time.perf_counter()
                sync.synchronize()
                table.weight.grad.coalesce()  # the optimizer's first act: sum duplicate rows
                if step:
                    times[name].append(time.perf_counter() - start)
                    sent[name] += sync.bytes_sent

            dense_grad.zero_()
            dense_grad[items] = 1.0  # the dense gradient DDP would all-reduce
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(dense_grad)
            dense_grad /= world
            if step:
                times["ddp"].append(time.perf_counter() - start)
        sparse_sync.DENSE_SHARE = default_share
        if rank == 0:
            results.put(
                dict(
                    items=num_items,
                    rows=statistics.mean(rows[1:]),
                    share=world * max(rows[1:]) / num_items,
                    dense_bytes=dense_grad.numel() * dense_grad.element_size(),
                    sent={name: b / args.steps for name, b in sent.items()},
                    seconds={name: statistics.median(t) for name, t in times.items()},
                )
            )
        del table, dense_grad
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[20_000, 200_000, 2_000_000])
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-users", type=int, default=500)
    parser.add_argument("--items-per-user", type=int, default=50)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(2, port, args, results), nprocs=2, join=True)
    print(
        f"\n2 gloo workers, {args.dim}-dim item embeddings, {args.batch_users} users x "
        f"{args.items_per_user} Zipf draws per rank per step; median of {args.steps} steps; "
        "the sync times include summing the rows that both ranks touched (coalesce)\n"
    )
    header = (
        "items",
        "rows/step a rank",
        "share (2 x rows / items)",
        "DDP dense MB",
        "sync MB (auto)",
        "DDP dense ms",
        "gathered, ring ms",
        "gathered, all-gather ms",
        "dense buffer ms",
        "auto ms",
        "auto vs DDP",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    while not results.empty():
        r = results.get()
        t = {name: seconds * 1e3 for name, seconds in r["seconds"].items()}
        print(
            f"| {r['items']:,} | {r['rows']:,.0f} | {r['share']:.2f} | "
            f"{r['dense_bytes'] / 1e6:,.1f} | {r['sent']['auto'] / 1e6:,.2f} | "
            f"{t['ddp']:,.1f} | {t['ring']:,.1f} | {t['all-gather']:,.1f} | "
            f"{t['dense buffer']:,.1f} | "
            f"{t['auto']:,.1f} | {t['ddp'] / t['auto']:,.1f}x |"
        )


if __name__ == "__main__":
    main()
