"""Gradient sync of item embeddings per step: dense all-reduce (what DDP does) vs SparseGradSync.

Two gloo processes on this machine; a synthetic catalog with power-law (Zipf) item popularity;
each rank's step touches the items of a batch of users (mini-batch negative sampling touches
exactly those rows). Prints one table of measured bytes and times, and their ratios.

    python benchmarks/sparse_sync.py                      # 20k, 200k, 2M items x 200
    python benchmarks/sparse_sync.py --items 20000 200000 --steps 3
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

from recoder_dist.training.sparse_sync import SparseGradSync


def touched_items(rng, num_items: int, users: int, items_per_user: int) -> torch.Tensor:
    """Items of a batch of users, drawn with Zipf(1.1)-like popularity over the catalog."""
    ranks = rng.zipf(1.1, size=users * items_per_user)
    return torch.from_numpy(np.unique((ranks - 1) % num_items))


def worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rng = np.random.default_rng(rank)
    for num_items in args.items:
        table = torch.nn.Embedding(num_items, args.dim, sparse=True)
        sync = SparseGradSync([table.weight])
        dense_grad = torch.zeros(num_items, args.dim)
        dense_times, sparse_times, rows = [], [], []
        for _ in range(args.steps + 1):  # the first step warms up and is not counted
            items = touched_items(rng, num_items, args.batch_users, args.items_per_user)
            rows.append(len(items))
            table.weight.grad = None
            table(items).sum().backward()
            dist.barrier()
            start = time.perf_counter()
            sync.synchronize()
            sparse_times.append(time.perf_counter() - start)

            dense_grad.zero_()
            dense_grad[items] = 1.0  # the dense gradient DDP would all-reduce
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(dense_grad)
            dense_grad /= world
            dense_times.append(time.perf_counter() - start)
        if rank == 0:
            results.put(
                dict(
                    items=num_items,
                    rows=statistics.mean(rows[1:]),
                    dense_bytes=dense_grad.numel() * dense_grad.element_size(),
                    sparse_bytes=sync.bytes_sent / (args.steps + 1),
                    dense_s=statistics.median(dense_times[1:]),
                    sparse_s=statistics.median(sparse_times[1:]),
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
        f"{args.items_per_user} Zipf draws per rank per step; median of {args.steps} steps\n"
    )
    header = (
        "items",
        "rows/step",
        "dense MB",
        "sparse MB",
        "bytes ratio",
        "dense ms",
        "sparse ms",
        "speed-up",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    while not results.empty():
        r = results.get()
        print(
            f"| {r['items']:,} | {r['rows']:,.0f} | {r['dense_bytes'] / 1e6:,.1f} | "
            f"{r['sparse_bytes'] / 1e6:,.2f} | {r['dense_bytes'] / r['sparse_bytes']:,.1f}x | "
            f"{r['dense_s'] * 1e3:,.1f} | {r['sparse_s'] * 1e3:,.1f} | "
            f"{r['dense_s'] / r['sparse_s']:,.1f}x |"
        )


if __name__ == "__main__":
    main()
