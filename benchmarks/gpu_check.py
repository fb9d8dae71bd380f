"""One prepared check for a lent GPU machine (a few minutes): the NCCL sparse-sync path, and an
epoch of an ML-20M-shaped synthetic dataset with negative sampling, dense vs sparse embeddings.

    python benchmarks/gpu_check.py            # on the GPU machine
    python benchmarks/gpu_check.py --small    # a CPU smoke run of the same script

Prints a table. With N GPUs the sync check runs N NCCL ranks; with one GPU a 1-rank NCCL group
still goes through every collective of SparseGradSync.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def sync_check(rank: int, world: int, port: int, backend: str, out) -> None:
    """Synced sparse gradients == all-reduced dense gradients / world, on ``backend``."""
    from recoder_dist.training.sparse_sync import SparseGradSync

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(10_000, 64, sparse=True).to(device)
    dense = torch.nn.Embedding(10_000, 64).to(device)
    dense.load_state_dict(sparse.state_dict())
    gen = torch.Generator().manual_seed(rank)
    items = torch.randint(0, 10_000, (4096,), generator=gen).to(device)
    weights = torch.randn(4096, 64, generator=gen).to(device)
    for table in (sparse, dense):
        (table(items) * weights).sum().backward()
    SparseGradSync([sparse.weight]).synchronize()
    reference = dense.weight.grad.clone()
    dist.all_reduce(reference)
    reference /= world
    error = (sparse.weight.grad.to_dense() - reference).abs().max().item()
    if rank == 0:
        out.put(("sync max |sparse - dense|", f"{error:.2e} ({backend}, {world} rank(s))"))
    dist.destroy_process_group()


def synthetic_ml20m(users: int, items: int, interactions: int, seed: int = 0):
    """A users x items matrix with Zipf item popularity and log-normal user activity."""
    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0, 1, users)
    rows = rng.choice(users, size=interactions, p=activity / activity.sum())
    cols = (rng.zipf(1.1, size=interactions) - 1) % items
    matrix = sp.csr_matrix((np.ones(interactions, np.float32), (rows, cols)), shape=(users, items))
    matrix.data[:] = 1.0  # repeated draws collapse to one interaction
    return matrix


def epoch_seconds(matrix, sparse: bool, use_cuda: bool) -> float:
    from recoder_dist.data import RecommendationDataset
    from recoder_dist.model import Recoder
    from recoder_dist.nn import DynamicAutoencoder

    model = DynamicAutoencoder(
        hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=sparse
    )
    recoder = Recoder(
        model, optimizer_type="adam", loss="logloss", use_cuda=use_cuda, num_workers=0, seed=0
    )
    history = recoder.train(
        RecommendationDataset(matrix), batch_size=500, num_epochs=2, negative_sampling=True
    )
    return history[-1]["seconds"]  # the second epoch: warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU smoke run on a small dataset")
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available() and not args.small
    rows = [
        ("torch", torch.__version__),
        ("device", torch.cuda.get_device_name(0) if use_cuda else "cpu"),
    ]
    if use_cuda:
        rows.append(("nccl", ".".join(map(str, torch.cuda.nccl.version()))))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = torch.cuda.device_count() if use_cuda else 2
    out = mp.get_context("spawn").SimpleQueue()
    mp.spawn(sync_check, args=(world, port, "nccl" if use_cuda else "gloo", out), nprocs=world)
    rows.append(out.get())

    import ray

    from recoder_dist.training.launcher import init_local_ray

    init_local_ray(num_cpus=os.cpu_count(), logging_level="ERROR")
    shape = (13_600, 2_000, 1_000_000) if args.small else (136_000, 20_000, 10_000_000)
    started = time.perf_counter()
    matrix = synthetic_ml20m(*shape)
    rows.append(
        (
            "dataset",
            f"{matrix.shape[0]:,} x {matrix.shape[1]:,}, nnz {matrix.nnz:,} "
            f"({time.perf_counter() - started:.1f} s to build)",
        )
    )
    dense_s = epoch_seconds(matrix, sparse=False, use_cuda=use_cuda)
    sparse_s = epoch_seconds(matrix, sparse=True, use_cuda=use_cuda)
    rows += [
        ("epoch, dense embeddings (s)", f"{dense_s:.2f}"),
        ("epoch, sparse embeddings (s)", f"{sparse_s:.2f}"),
        ("dense / sparse", f"{dense_s / sparse_s:.2f}x"),
    ]
    ray.shutdown()
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
