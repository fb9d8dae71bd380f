"""Scaling with workers: epoch time in-process, with 1 and 2 Ray Train workers, and where it goes.

What is measured, on ml-1m-implicit and Gowalla, with the settings of train_speed.py (the ML-20M
script's: DynamicAutoencoder [200] tanh, noise 0.5, sparse embeddings, Adam, batch 500 (per
worker with replicated tables; a step's global batch, split over the workers, with sharded
ones: the model of 1 worker), negative sampling), one torch thread per worker (and
in-process):

- seconds per epoch of unprofiled runs (2 workers with the item tables replicated, today's
  sync of touched rows, and sharded, each worker holding its rows; the first epoch of every
  run dropped, the others pooled over the rounds; median), the throughput against 1 worker,
  and the fixed cost of a run: the wall time of ``Recoder.train`` less the time of its epochs
  (Ray Train's start and end, the driver's preparation);
- with ``--reference``, recsys-recoder 0.4.0 on 2 torch threads beside them (ml-1m only);
- one profiled run per side (``Recoder.train(profile=True)``): seconds per epoch in each phase
  of the step (see recoder_dist/training/worker/step_profile.py), the mean over ranks, and the bytes
  that the sparse sync sent per step.

With ``--model mf``, MatrixFactorization instead (200 dims, sparse, the same loss, batch and
steps; with sharded tables its user table is sharded too).

With ``--defaults``, what a user who changes nothing gets instead: the workers' CPUs and threads
by default (``cpus_per_worker=None``, on a local Ray of this machine's cores) and torch's own
thread count in-process.

    python benchmarks/scaling.py                         # ml-1m and Gowalla, ~12 min
    python benchmarks/scaling.py --datasets gowalla --sides 1 2r 2s
    python benchmarks/scaling.py --datasets ml-1m --rounds 3 --reference
    python benchmarks/scaling.py --datasets ml-1m --reference --defaults
    python benchmarks/scaling.py --model mf --sides 1 2r 2s
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from _common import load_average, load_matrix, markdown_table, median, npz_path
from train_speed import CONFIGS, MODEL, TRAIN, reference_epochs

# side -> (workers, tables, label)
SIDES = {
    "0": (0, "sharded", "in-process"),
    "1": (1, "sharded", "1 worker"),
    "2r": (2, "replicated", "2 workers, replicated tables"),
    "2s": (2, "sharded", "2 workers, sharded tables"),
}


def run(
    matrix, side: str, epochs: int, profile: bool, cpus: float | None, model: str = "autoencoder"
) -> tuple[list[dict], float]:
    """The history of one training run and its wall time."""
    from recoder_dist import nn
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.model import Recoder

    if model == "mf":
        built = nn.MatrixFactorization(embedding_size=200, sparse=True)
    else:
        built = nn.DynamicAutoencoder(**MODEL, sparse=True)
    trainer = Recoder(
        built,
        optimizer_type="adam",
        loss="logloss",
        num_workers=SIDES[side][0],
        cpus_per_worker=cpus,
        seed=0,
        tables=SIDES[side][1],
    )
    dataset = RecommendationDataset(matrix)
    started = time.perf_counter()
    history = trainer.train(
        dataset, num_epochs=epochs, negative_sampling=True, profile=profile, **TRAIN
    )
    return history, time.perf_counter() - started


def measure(name: str, args) -> dict:
    matrix = load_matrix(name)
    cpus = None if args.defaults else 1
    seconds = {side: [] for side in args.sides}
    fixed = {side: [] for side in args.sides}
    reference = []
    for round_ in range(args.rounds):
        print(f"[{name}] round {round_ + 1}/{args.rounds}", flush=True)
        if args.reference and name == "ml-1m":
            path = npz_path(name, matrix)
            reference += reference_epochs(path, CONFIGS["sparse+ns"], args.epochs, 2)
        for side in args.sides:
            history, wall = run(matrix, side, args.epochs, False, cpus, args.model)
            seconds[side] += [record["seconds"] for record in history[1:]]
            fixed[side].append(wall - sum(record["seconds"] for record in history))
    profiles = {}
    for side in args.sides:
        history, _ = run(matrix, side, args.epochs, True, cpus, args.model)
        profiles[side] = history[1:]
    return dict(
        shape=matrix.shape, seconds=seconds, fixed=fixed, reference=reference, profiles=profiles
    )


def epoch_rows(result: dict, sides: list[int]) -> list[list]:
    one = median(result["seconds"].get("1", []))
    rows = []
    if result["reference"]:
        ref = median(result["reference"])
        rows.append(["recsys-recoder 0.4.0, 2 threads", f"{ref:.3f}", f"{one / ref:.2f}x", "-"])
    for side in sides:
        seconds = median(result["seconds"][side])
        rows.append(
            [
                SIDES[side][2],
                f"{seconds:.3f}",
                f"{one / seconds:.2f}x",
                f"{median(result['fixed'][side]):.1f}",
            ]
        )
    return rows


def phase_rows(result: dict, sides: list[int]) -> list[list]:
    """Seconds per epoch in each phase: the median over the profiled epochs of the mean over
    ranks."""
    profiles = result["profiles"]
    phases = list(profiles[sides[0]][0]["profile"])
    rows = []
    for phase in [*phases, "epoch"]:
        row = [phase]
        for side in sides:
            if phase == "epoch":
                values = [record["seconds"] for record in profiles[side]]
            else:
                values = [statistics.mean(record["profile"][phase]) for record in profiles[side]]
            row.append(f"{median(values):.3f}")
        rows.append(row)
    row = ["sync MB per step"]
    for side in sides:
        sent = [record.get("sync_bytes_per_step", 0.0) for record in profiles[side]]
        row.append(f"{median(sent) / 1e6:.2f}")
    rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is dropped")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--model", choices=["autoencoder", "mf"], default="autoencoder")
    parser.add_argument(
        "--reference", action="store_true", help="recsys-recoder 0.4.0 (2 threads) on ml-1m"
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="the default CPUs and threads of every side instead of one thread each",
    )
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.WARNING)
    import torch

    from recoder_dist.training.driver.launcher import ensure_ray

    if not args.defaults:
        torch.set_num_threads(1)  # the in-process loop runs in this process
    threads = torch.get_num_threads()
    ensure_ray()  # started before the first run: its start is not a run's fixed cost
    started = time.perf_counter()
    results = {name: measure(name, args) for name in args.datasets}

    print(f"\nmachine load when the tables were taken: {load_average()}")
    if args.defaults:
        print(f"default CPUs per worker; {threads} torch thread(s) in-process")
    else:
        print("1 torch thread per worker and in-process")
    print(f"model: {args.model}; median of {args.rounds} round(s) x {args.epochs - 1} epochs")
    for name, result in results.items():
        users, items = result["shape"]
        print(f"\n### {name} ({users:,} users x {items:,} items): seconds per epoch\n")
        header = ["run", "s/epoch", "throughput vs 1 worker", "fixed cost of a run, s"]
        print(markdown_table(header, epoch_rows(result, args.sides)))
        print(f"\n### {name}: seconds per epoch in each phase (profiled runs, mean over ranks)\n")
        header = ["phase", *(SIDES[side][2] for side in args.sides)]
        print(markdown_table(header, phase_rows(result, args.sides)))
    print(f"\nwall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
