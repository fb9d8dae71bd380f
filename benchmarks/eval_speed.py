"""Evaluation throughput: users per second for top-100 over all items, recoder_dist against
recsys-recoder 0.4.0's evaluator, on the same model weights.

What is measured: Recall@20, Recall@50 and NDCG@100 of every evaluation user from their
top-100 over all items (their input items excluded), batches of 500 users, torch on
--threads threads (1 by default) on both sides. Data: ml-1m-implicit with 20% of each user's
items held out (weak split, seed 0), or Gowalla (train.txt as input, test.txt as target);
only users with both input and target items (recsys-recoder divides by zero otherwise).

The model: our DynamicAutoencoder([200], tanh, sparse), trained for --train-epochs epochs
in-process; its weights are loaded into recsys-recoder's DynamicAutoencoder (same names up to
renaming), so both sides rank with the same scores, and the metric means printed side by side
must agree.

Timed: recsys-recoder's ``RecommenderEvaluator(InferenceRecommender(...)).evaluate`` (what its
``Recoder.evaluate`` runs) inside a subprocess of its own environment, repeated, the first
dropped; ours (a) the per-batch work of a worker, ``metric_sums`` over batches of
``UserRows``, with the CPU fast paths and with their numpy/torch references
(``compiled=False``), and (b) the whole ``Recoder(num_workers=0).evaluate`` call (Ray
Data set-up and the Train controller included). Rounds interleave the sides; medians.

    python benchmarks/eval_speed.py             # ml-1m and Gowalla, ~5 min
    python benchmarks/eval_speed.py --quick     # ml-1m, < 1 min warm
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import scipy.sparse as sp
import torch
from _common import (
    CACHE,
    DATA,
    load_average,
    load_matrix,
    markdown_table,
    median,
    npz_path,
    ratio,
    save_bar_plot,
)
from _reference_venv import run_reference

MODEL = dict(hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=True)
K = 100
BATCH = 500


def eval_matrices(name: str) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
    """(training matrix, evaluation input, evaluation target), the last two restricted to users
    with both input and target items."""
    from recoder_dist.datasets.line_format import read_user_items
    from recoder_dist.datasets.splits import weak_generalization_split

    if name == "ml-1m":
        split = weak_generalization_split(load_matrix(name), target_fraction=0.2, seed=0)
        train = split.train.interactions
        inputs, targets = split.test.interactions, split.test.target
    else:
        train = inputs = load_matrix(name)
        test = read_user_items(DATA / "gowalla" / "test.txt")
        targets = sp.csr_matrix(
            (np.ones(len(test), np.float32), (test.user, test.item)), shape=inputs.shape
        )
    keep = (np.diff(inputs.indptr) > 0) & (np.diff(targets.indptr) > 0)
    return train, inputs[keep], targets[keep]


def metrics():
    from recoder_dist.metrics import NDCG, Recall

    return [Recall(20), Recall(50), NDCG(100)]


def trained_recoder(train: sp.csr_matrix, epochs: int):
    from recoder_dist import nn
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.model import Recoder

    recoder = Recoder(
        nn.DynamicAutoencoder(**MODEL), optimizer_type="adam", loss="logloss", num_workers=0
    )
    recoder.train(
        RecommendationDataset(train),
        num_epochs=epochs,
        batch_size=BATCH,
        lr=1e-3,
        weight_decay=2e-5,
        negative_sampling=True,
    )
    return recoder


def our_worker_batches(model, inputs, targets, compiled: bool = True) -> tuple[float, dict]:
    """Seconds of ``metric_sums`` over all batches (a worker's evaluation work) and the means."""
    from recoder_dist.data.collator import UserRows
    from recoder_dist.training.evaluation.scoring import metric_sums

    found = metrics()
    sums, count = np.zeros(len(found)), 0
    start = time.perf_counter()
    for lo in range(0, inputs.shape[0], BATCH):
        users = np.arange(lo, min(lo + BATCH, inputs.shape[0]))
        batch_sums, batch_count = metric_sums(
            model,
            UserRows.from_csr(inputs, users),
            UserRows.from_csr(targets, users),
            found,
            K,
            inputs.shape[1],
            torch.device("cpu"),
            compiled=compiled,
        )
        sums, count = sums + batch_sums, count + batch_count
    seconds = time.perf_counter() - start
    return seconds, {m.name: s / count for m, s in zip(found, sums)}


def our_evaluate_call(recoder, inputs, targets) -> tuple[float, dict]:
    from recoder_dist.data.dataset import RecommendationDataset

    start = time.perf_counter()
    results = recoder.evaluate(
        RecommendationDataset(inputs, targets),
        num_recommendations=K,
        metrics=metrics(),
        batch_size=BATCH,
    )
    return time.perf_counter() - start, results


def measure(name: str, args) -> dict:
    train, inputs, targets = eval_matrices(name)
    recoder = trained_recoder(train, args.train_epochs)
    model = recoder.model.eval()
    weights = CACHE / "data" / f"{name}-weights.npz"
    np.savez(weights, **{k: v.numpy() for k, v in model.state_dict().items()})
    job = dict(
        task="evaluate",
        input=npz_path(f"{name}-eval-input", inputs),
        target=npz_path(f"{name}-eval-target", targets),
        weights=str(weights),
        model=MODEL,
        k=K,
        batch_size=BATCH,
        repeats=args.repeats + 1,
    )
    times = {"ref": [], "worker": [], "reference": [], "call": []}
    means = {}
    for round_ in range(args.rounds):
        print(f"[{name}] round {round_ + 1}/{args.rounds}", flush=True)
        ref = run_reference(job, args.threads)
        times["ref"] += ref["wall"][1:]
        means["recsys-recoder"] = ref["metrics"]
        for _ in range(args.repeats):
            seconds, means["ours"] = our_worker_batches(model, inputs, targets)
            times["worker"].append(seconds)
            seconds, means["ours, reference kernels"] = our_worker_batches(
                model, inputs, targets, compiled=False
            )
            times["reference"].append(seconds)
        seconds, means["ours, Recoder.evaluate"] = our_evaluate_call(recoder, inputs, targets)
        times["call"].append(seconds)
    users = inputs.shape[0]
    return dict(users=users, ref_users=ref["users"], times=times, means=means)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "gowalla"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="timed evaluations per round")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="ml-1m, 1 round, 1 epoch")
    args = parser.parse_args()
    if args.quick:
        args.datasets, args.rounds, args.repeats, args.train_epochs = ["ml-1m"], 1, 1, 1
    logging.getLogger("ray").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {name: measure(name, args) for name in args.datasets}

    print(f"\nmachine load when the tables were taken: {load_average()}")
    print(f"torch threads: {args.threads}; top-{K} over all items, batches of {BATCH} users")
    labels, series = (
        [],
        {"recsys-recoder 0.4.0": [], "ours (worker)": [], "ours (evaluate call)": []},
    )
    for name, r in results.items():
        users = r["users"]
        ref, worker, reference, call = (
            median(r["times"][k]) for k in ("ref", "worker", "reference", "call")
        )
        print(
            f"\n### {name}: {users:,} evaluation users "
            f"(recsys-recoder counted {r['ref_users']:,})\n"
        )
        rows = [
            ["recsys-recoder 0.4.0 evaluator", f"{ref:.3f}", f"{users / ref:,.0f}", "1.00x"],
            [
                "ours: metric_sums per batch (a worker)",
                f"{worker:.3f}",
                f"{users / worker:,.0f}",
                ratio(ref, worker),
            ],
            [
                "ours: the same, numpy/torch references of the compiled loops",
                f"{reference:.3f}",
                f"{users / reference:,.0f}",
                ratio(ref, reference),
            ],
            [
                "ours: Recoder.evaluate, num_workers=0",
                f"{call:.3f}",
                f"{users / call:,.0f}",
                ratio(ref, call),
            ],
        ]
        print(markdown_table(["evaluator", "seconds", "users/s", "speed-up"], rows))
        print("\nmetric means (same weights, so they should agree):\n")
        names = list(r["means"]["recsys-recoder"])
        rows = [[side] + [f"{vals[n]:.4f}" for n in names] for side, vals in r["means"].items()]
        print(markdown_table(["side"] + names, rows))
        labels.append(name)
        for key, side in zip(("ref", "worker", "call"), series):
            series[side].append(users / median(r["times"][key]))
    save_bar_plot(
        CACHE / "eval_speed.png", "evaluation users per second (top-100)", labels, series, "users/s"
    )
    print(f"wall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
