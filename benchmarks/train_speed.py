"""Seconds per training epoch: recoder_dist against recsys-recoder 0.4.0, and under Ray Train.

What is measured: one epoch over every user of the matrix (ml-1m-implicit: 5,949 x 2,810;
Gowalla train.txt: 29,858 x 40,981) on CPU, with the settings of recsys-recoder's ML-20M
script: DynamicAutoencoder(hidden_layers=[200], tanh, noise_prob=0.5), batch_size 500,
Adam (SparseAdam for sparse embeddings), lr 1e-3, weight_decay 2e-5, loss 'logloss'.
torch runs on --threads threads on both sides (1 by default: the machine is shared).

How: each round runs, one after the other, recsys-recoder (a subprocess in its own virtual
environment, see _reference_venv.py, timed inside the subprocess at the start of every epoch),
ours in-process (``Recoder(num_workers=0)``), ours under Ray Train with 1 worker and with 2
workers (``num_workers=1``/``2``; per-epoch ``seconds`` of the history, timed in the worker
loop, so cluster and worker start-up are excluded). The first epoch of every run is dropped
(warm-up), the others pooled over the rounds; tables give medians and ratios. Peak RSS is the
largest ``peak_rss_mb`` (max over ranks) that the Ray runs report.

    python benchmarks/train_speed.py                 # ml-1m and Gowalla, ~15 min
    python benchmarks/train_speed.py --quick         # ml-1m, a smoke run (< 1 min warm)
    python benchmarks/train_speed.py --datasets gowalla --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

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

MODEL = dict(hidden_layers=[200], activation_type="tanh", noise_prob=0.5)
TRAIN = dict(batch_size=500, lr=1e-3, weight_decay=2e-5)


@dataclass(frozen=True)
class Config:
    name: str
    sparse: bool
    negative_sampling: bool


CONFIGS = {
    "sparse+ns": Config("sparse emb, neg. sampling (target)", True, True),
    "dense+ns": Config("dense emb, neg. sampling", False, True),
    "dense": Config("dense emb, all items", False, False),
}


def reference_epochs(path: str, config: Config, epochs: int, threads: int) -> list[float]:
    job = dict(
        task="train",
        matrix=path,
        epochs=epochs,
        model=dict(MODEL, sparse=config.sparse),
        train=dict(TRAIN, negative_sampling=config.negative_sampling),
    )
    return run_reference(job, threads)["wall"][1:]


def our_epochs(matrix, config: Config, epochs: int, workers: int, threads: int):
    """Per-epoch seconds (first dropped) and the largest peak RSS of one training run."""
    from recoder_dist import nn
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.model import Recoder

    model = nn.DynamicAutoencoder(**MODEL, sparse=config.sparse)
    trainer = Recoder(
        model,
        optimizer_type="adam",
        loss="logloss",
        num_workers=workers,
        cpus_per_worker=threads,
        seed=0,
    )
    history = trainer.train(
        RecommendationDataset(matrix),
        num_epochs=epochs,
        negative_sampling=config.negative_sampling,
        **TRAIN,
    )
    return [r["seconds"] for r in history[1:]], max(r["peak_rss_mb"] for r in history)


def measure(name: str, configs: list[str], args) -> tuple[list, list, tuple[int, int]]:
    matrix = load_matrix(name)
    path = npz_path(name, matrix)
    sides = {}  # (config, side) -> per-epoch seconds
    rss = {}
    for round_ in range(args.rounds):
        for key in configs:
            config = CONFIGS[key]
            print(f"[{name}] round {round_ + 1}/{args.rounds}: {config.name}", flush=True)
            if not args.skip_reference:
                sides.setdefault((key, "ref"), []).extend(
                    reference_epochs(path, config, args.epochs, args.threads)
                )
            worker_counts = [0] + (args.workers if key == "sparse+ns" else [])
            for workers in worker_counts:
                seconds, peak = our_epochs(matrix, config, args.epochs, workers, args.threads)
                sides.setdefault((key, workers), []).extend(seconds)
                rss[workers] = max(rss.get(workers, 0.0), peak)
    vs_reference = _vs_reference_rows(configs, sides)
    return vs_reference, _ray_rows(sides, rss, args.workers), matrix.shape


def _vs_reference_rows(configs, sides) -> list:
    rows = []
    for key in configs:
        ours = median(sides[(key, 0)])
        ref = median(sides.get((key, "ref"), []))
        rows.append([CONFIGS[key].name, f"{ref:.3f}", f"{ours:.3f}", ratio(ref, ours)])
    return rows


def _ray_rows(sides, rss, workers) -> list:
    base = median(sides[("sparse+ns", 0)])
    rows = [["in-process (num_workers=0)", f"{base:.3f}", "1.00x", f"{rss[0]:,.0f} (driver)"]]
    for count in workers:
        seconds = median(sides[("sparse+ns", count)])
        rows.append(
            [
                f"Ray Train, {count} worker(s)",
                f"{seconds:.3f}",
                ratio(seconds, base),
                f"{rss[count]:,.0f}",
            ]
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"])
    parser.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is dropped")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-reference", action="store_true", help="ours only")
    parser.add_argument(
        "--quick", action="store_true", help="ml-1m, 1 round of 2 epochs, in-process only"
    )
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.rounds, args.epochs, args.workers = ["ml-1m"], 1, 2, []
        args.configs = args.configs or ["sparse+ns"]
    logging.getLogger("ray").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)  # the in-process loop runs in this process
    started = time.perf_counter()
    results = {}
    for name in args.datasets:
        configs = args.configs or (list(CONFIGS) if name == "ml-1m" else ["sparse+ns", "dense+ns"])
        results[name] = measure(name, configs, args)

    print(f"\nmachine load when the tables were taken: {load_average()}")
    print(
        f"torch threads: {args.threads}; "
        f"median of {args.rounds} round(s) x {args.epochs - 1} epochs"
    )
    for name, (vs_ref, ray_rows, shape) in results.items():
        print(f"\n### {name}: seconds per epoch, recsys-recoder 0.4.0 vs recoder_dist in-process\n")
        header = ["configuration", "recsys-recoder s/epoch", "ours s/epoch", "speed-up"]
        print(markdown_table(header, vs_ref))
        print(f"\n### {name}: Ray Train overhead and scaling (sparse emb, neg. sampling)\n")
        header = ["run", "s/epoch", "vs in-process", "peak RSS MB per worker"]
        print(markdown_table(header, ray_rows))
        dense_mb = shape[0] * shape[1] * 4 / 2**20
        print(f"\n(a dense {shape[0]:,} x {shape[1]:,} float32 matrix: {dense_mb:,.0f} MB)")
    labels, series = [], {"recsys-recoder 0.4.0": [], "recoder_dist": []}
    for name, (vs_ref, _, _) in results.items():
        for row in vs_ref:
            labels.append(f"{name}\n{row[0].split(' (')[0]}")
            series["recsys-recoder 0.4.0"].append(float(row[1]))
            series["recoder_dist"].append(float(row[2]))
    save_bar_plot(CACHE / "train_speed.png", "seconds per epoch (CPU)", labels, series, "s/epoch")
    print(f"wall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
