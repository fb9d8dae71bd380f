"""One prepared check for a lent GPU machine (a few minutes): the NCCL sparse-sync path; epochs
of an ML-20M-shaped synthetic dataset with negative sampling, dense and sparse embeddings, fp32
and bf16, against the GPU's measured matmul rate; a profiled epoch; epochs on 1 Ray Train worker
and on 2 (where there are 2 GPUs: NCCL does not put two ranks on one device); the evaluation's
throughput; the host-device synchronizations of a CUDA step.

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

from recoder_dist.datasets import strong_generalization_split
from recoder_dist.training.sparse_sync import EXCHANGES


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
    (dense(items) * weights).sum().backward()
    reference = dense.weight.grad.clone()
    dist.all_reduce(reference)
    reference /= world
    for exchange in EXCHANGES:  # each way the gathered rows can travel
        sparse.weight.grad = None
        (sparse(items) * weights).sum().backward()
        SparseGradSync([sparse.weight], exchange=exchange).synchronize()
        error = (sparse.weight.grad.to_dense() - reference).abs().max().item()
        if rank == 0:
            out.put(
                (
                    f"sync max |sparse - dense|, {exchange}",
                    f"{error:.2e} ({backend}, {world} rank(s))"
                    + (": no hop, nothing sent" if exchange == "ring" and world == 1 else ""),
                )
            )
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


HIDDEN = 200


def train_epochs(matrix, sparse: bool, use_cuda: bool, **kwargs) -> tuple[dict, object]:
    """The record of the second (warm) of two epochs, and the trained Recoder; ``kwargs`` go to
    Recoder (num_workers) and train (precision, profile)."""
    from recoder_dist.data import RecommendationDataset
    from recoder_dist.model import Recoder
    from recoder_dist.nn import DynamicAutoencoder

    model = DynamicAutoencoder(
        hidden_layers=[HIDDEN], activation_type="tanh", noise_prob=0.5, sparse=sparse
    )
    recoder = Recoder(
        model,
        optimizer_type="adam",
        loss="logloss",
        use_cuda=use_cuda,
        num_workers=kwargs.pop("num_workers", 0),
        seed=0,
    )
    history = recoder.train(
        RecommendationDataset(matrix),
        batch_size=500,
        num_epochs=2,
        negative_sampling=True,
        **kwargs,
    )
    return history[-1], recoder


def evaluation_seconds(recoder, test) -> tuple[float, int]:
    """Seconds that ``recoder.evaluate`` takes on ``test`` (top 100; Recall, NDCG and Average
    Precision), with the start of its run, and the users it counted."""
    from recoder_dist.metrics import NDCG, AveragePrecision, Recall

    started = time.perf_counter()
    result = recoder.evaluate(test, 100, [Recall(20), NDCG(100), AveragePrecision(100)])
    return time.perf_counter() - started, result["eval_users"]


def epoch_flops(matrix) -> float:
    """Multiply-adds x 2 of an epoch's matrix products with dense item embeddings: per batch of
    B users over S sampled items, the encoder (B x S by S x H) and the decoder (B x H by H x S),
    forward and twice that backward: 12 B S H."""
    from recoder_dist.data.collator import Collator, UserRows

    collator = Collator(num_items=matrix.shape[1], batch_size=500, negative_sampling=True)
    flops = 0.0
    for start in range(0, matrix.shape[0], 500):
        users = np.arange(start, min(start + 500, matrix.shape[0]))
        for batch in collator(UserRows.from_csr(matrix, users)):
            flops += 12.0 * batch.shape[0] * batch.shape[1] * HIDDEN
    return flops


def matmul_tflops(dtype: torch.dtype, device: torch.device) -> float:
    """The measured rate of a large square matrix product."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def host_syncs_per_step(matrix, device: torch.device) -> str:
    """Host-device synchronizations in a CUDA training step (torch's sync debug mode), with the
    operations that caused them."""
    import warnings

    from recoder_dist.data.collator import Collator, UserRows
    from recoder_dist.losses import build_loss
    from recoder_dist.nn import DynamicAutoencoder
    from recoder_dist.training.worker.optimizers import build_optimizers
    from recoder_dist.training.worker.step import batch_loss

    model = DynamicAutoencoder(hidden_layers=[HIDDEN], noise_prob=0.5, sparse=True)
    model.init_model(num_items=matrix.shape[1])
    model.to(device)
    optimizers = build_optimizers(model, "adam", 1e-3, 0.0)
    loss_fn = build_loss("logloss")
    collator = Collator(num_items=matrix.shape[1], batch_size=500, negative_sampling=True)
    batches = list(collator(UserRows.from_csr(matrix, np.arange(2500))))
    messages = []
    for step, batch in enumerate(batches):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if step > 0:  # the first step warms up
                torch.cuda.set_sync_debug_mode("warn")
            optimizers.zero_grad()
            batch_loss(model, loss_fn, batch, device).backward()
            optimizers.step()
            torch.cuda.set_sync_debug_mode("default")
        if step > 0:
            messages += [str(w.message).splitlines()[0][:60] for w in caught]
    steps = len(batches) - 1
    kinds = sorted(set(messages))[:3]
    return f"{len(messages) / steps:.1f} ({'; '.join(kinds) or 'none'})"


def similar_items_check(recoder, device: torch.device) -> str:
    """The exact similar-items search of 2,048 items over the model's catalog on ``device``:
    its seconds, and the share of its neighbour ids equal to the CPU's (ties aside, all)."""
    from recoder_dist.similarity import item_vectors, top_k_cosine

    vectors = item_vectors(recoder)
    queries = np.arange(min(2048, len(vectors)))
    top_k_cosine(vectors, vectors[:8], 20, device=device)  # the device's first use
    started = time.perf_counter()
    rows, _ = top_k_cosine(vectors, vectors[queries], 20, exclude=queries, device=device)
    seconds = time.perf_counter() - started
    reference, _ = top_k_cosine(vectors, vectors[queries], 20, exclude=queries)
    return f"{seconds:.2f} s ({(rows == reference).mean():.4f} of the ids equal the CPU's)"


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
    rows += [out.get() for _ in EXCHANGES]

    import ray

    from recoder_dist.training.driver.launcher import init_local_ray

    init_local_ray(num_cpus=os.cpu_count(), logging_level="ERROR")
    shape = (13_600, 2_000, 1_000_000) if args.small else (136_000, 20_000, 10_000_000)
    started = time.perf_counter()
    events = synthetic_ml20m(*shape)
    split = strong_generalization_split(
        events, num_val_users=0, num_test_users=shape[0] // 10, min_items=2
    )
    train = split.train.interactions  # the held-out users' rows are empty here: drop them
    matrix = train[np.flatnonzero(np.diff(train.indptr))]
    rows.append(
        (
            "dataset (training users)",
            f"{matrix.shape[0]:,} x {matrix.shape[1]:,}, nnz {matrix.nnz:,} "
            f"({time.perf_counter() - started:.1f} s to build)",
        )
    )
    device = torch.device("cuda" if use_cuda else "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_tflops(dtype, device)
        rows.append((f"matmul rate, {str(dtype)[6:]} (TFLOPS)", f"{rate:.1f}"))
    flops = epoch_flops(matrix)
    rows.append(("epoch matmul work, dense embeddings (TFLOP)", f"{flops / 1e12:.2f}"))
    for sparse in (False, True):
        for precision in ("fp32", "bf16"):
            record, _ = train_epochs(matrix, sparse, use_cuda, precision=precision)
            name = f"epoch, {'sparse' if sparse else 'dense'} embeddings, {precision} (s)"
            rate = flops / record["seconds"] / 1e12
            rows.append((name, f"{record['seconds']:.2f} ({rate:.2f} TFLOPS)"))
    record, recoder = train_epochs(matrix, True, use_cuda, profile=True)
    phases = ", ".join(f"{k} {v[0]:.2f}" for k, v in record["profile"].items())
    rows.append(("phases, sparse fp32 in-process (s)", phases))
    seconds, users = evaluation_seconds(recoder, split.test)
    rows.append(("evaluated users", f"{users:,}"))
    rows.append(("evaluation, in-process (s, with its start)", f"{seconds:.1f}"))
    rows.append(
        ("similar items, 2,048 items x the catalog, top 20", similar_items_check(recoder, device))
    )
    one, recoder = train_epochs(matrix, True, use_cuda, num_workers=1)
    rows.append(("epoch, sparse fp32, 1 Ray Train worker (s)", f"{one['seconds']:.2f}"))
    seconds, _ = evaluation_seconds(recoder, split.test)
    rows.append(("evaluation, 1 Ray Train worker (s, with its start)", f"{seconds:.1f}"))
    if world >= 2:
        two, recoder = train_epochs(matrix, True, use_cuda, num_workers=2)
        speedup = one["seconds"] / two["seconds"]
        rows.append(
            (
                "epoch, sparse fp32, 2 Ray Train workers (s)",
                f"{two['seconds']:.2f} ({speedup:.2f}x)",
            )
        )
        seconds, _ = evaluation_seconds(recoder, split.test)
        rows.append(("evaluation, 2 Ray Train workers (s, with its start)", f"{seconds:.1f}"))
    else:
        rows.append(("epoch, 2 Ray Train workers", "not run: NCCL needs a GPU per rank"))
    if use_cuda:
        rows.append(("host syncs per step (sparse, fp32)", host_syncs_per_step(matrix, device)))
    ray.shutdown()
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
