"""One training step with sharded tables against one process's, in milliseconds a step.

No Ray: the ranks are forked processes joined by gloo (``tests/sharded_harness.py``), one
torch thread each, so what is timed is the step itself (the exchanges, the scoring and the
optimizer), not a worker group. For each dataset and each global batch (``--batch`` users,
what ``batch_size`` means with sharded tables, and ``world x batch``, what it meant per
worker before): one process on the global batch, against ``world`` ranks that split it.
DynamicAutoencoder [200], tanh, noise 0.5, sparse tables, Adam, logloss, negative sampling
(the settings of train_speed.py); random users each step; the first 2 steps of 12 dropped.
A rank's ``cpu`` is its process's CPU time (every thread), ``wall`` the step's wall time.

    python benchmarks/sharded_step.py                    # ml-1m and Gowalla, 2 ranks, ~1 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import load_average, load_matrix, markdown_table  # noqa: E402

from recoder_dist.data.collator import Collator, UserRows  # noqa: E402
from recoder_dist.losses import build_loss  # noqa: E402
from recoder_dist.nn import DynamicAutoencoder  # noqa: E402
from recoder_dist.sharded.autoencoder import ShardedAutoencoder  # noqa: E402
from recoder_dist.training.worker.optimizers import build_optimizers  # noqa: E402
from recoder_dist.training.worker.step import batch_loss  # noqa: E402
from tests.sharded_harness import rank_entries, run_ranks  # noqa: E402

STEPS, WARMUP = 12, 2


def _model(num_items: int) -> DynamicAutoencoder:
    torch.manual_seed(0)
    model = DynamicAutoencoder([200], activation_type="tanh", noise_prob=0.5, sparse=True)
    model.init_model(num_items=num_items)
    return model


def _timed(step) -> dict:
    """Mean ms a step of ``step(i)`` after the warm-up: wall and this process's CPU."""
    for i in range(WARMUP):
        step(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(WARMUP, STEPS):
        step(i)
    n = STEPS - WARMUP
    return dict(
        cpu=(time.process_time() - cpu) / n * 1e3, wall=(time.perf_counter() - wall) / n * 1e3
    )


def one_process(matrix, batch: int) -> dict:
    torch.set_num_threads(1)
    model = _model(matrix.shape[1])
    optimizers = build_optimizers(model, "adam", 1e-3, 0.0)
    loss_fn, rng = build_loss("logloss"), np.random.default_rng(0)
    collate = Collator(num_items=matrix.shape[1], batch_size=batch)

    def step(_):
        users = np.sort(rng.choice(matrix.shape[0], batch, replace=False))
        optimizers.zero_grad()
        batch_loss(
            model, loss_fn, next(collate(UserRows.from_csr(matrix, users))), torch.device("cpu")
        ).backward()
        optimizers.step()

    return _timed(step)


def _sharded_rank(rank, world, matrix, batch, results):
    model = ShardedAutoencoder.like(_model(matrix.shape[1]))
    optimizers = build_optimizers(model, "adam", 1e-3, 0.0)
    rng = np.random.default_rng(rank)

    def step(_):
        users = np.sort(rng.choice(matrix.shape[0], batch, replace=False))
        optimizers.zero_grad()
        share, _ = model.loss(*rank_entries(matrix, users), loss="logloss")
        share.backward()
        model.all_reduce_dense_grads()
        optimizers.step()

    results[rank] = _timed(step)


def sharded(matrix, batch: int, world: int) -> list[dict]:
    with torch.multiprocessing.Manager() as manager:
        results = manager.dict()
        run_ranks(world, _sharded_rank, matrix, batch, results)
        return [dict(results[rank]) for rank in range(world)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"])
    parser.add_argument("--batch", type=int, default=500, help="the global batch, users a step")
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        matrix = load_matrix(name)
        for users in (args.batch, args.batch * args.world):
            alone = one_process(matrix, users)
            ranks = sharded(matrix, users // args.world, args.world)
            wall = max(r["wall"] for r in ranks)
            rows += [
                [name, users, "1 process", f"{alone['cpu']:.1f}", f"{alone['wall']:.1f}", "1.00x"],
                [
                    name,
                    users,
                    f"{args.world} sharded ranks",
                    " / ".join(f"{r['cpu']:.1f}" for r in ranks),
                    f"{wall:.1f}",
                    f"{alone['wall'] / wall:.2f}x",
                ],
            ]
    print(f"machine load: {load_average()}; 1 torch thread a process")
    header = [
        "dataset",
        "global batch",
        "run",
        "cpu ms a step (each rank)",
        "wall ms a step",
        "steps/s vs 1 process",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
