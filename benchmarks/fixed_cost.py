"""The fixed cost of a job (issue 36): what ``Recoder.evaluate`` costs after ``train`` on the
workers and in this process, and how fast this process scores as the evaluation grows.

1. ml-100k (the demo's data: ratings >= 4, 100 test users): a DynamicAutoencoder([200]) trained
   2 epochs on 1 worker, then ``evaluate`` of the test users with ``on_workers=True`` (a worker
   group of its own) and with the default (here, in the driver), interleaved, ``--rounds``
   times; the metrics of both must be equal.
2. Scoring here: ``evaluate(on_workers=False)`` of a DynamicAutoencoder([200]) on random users
   (20 input and 5 target items each) for growing users x items, the scores a call computes;
   this sets ``recoder_dist.model.DRIVER_EVAL_SCORES``.

    python benchmarks/fixed_cost.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
from _common import DATA, load_average, markdown_table, median

from recoder_dist.data import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import DRIVER_EVAL_SCORES, Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.launcher import init_local_ray

METRICS = [Recall(k=20), Recall(k=50), NDCG(k=100)]


def demo_split():
    from recoder_dist.datasets import load_ml100k, strong_generalization_split
    from recoder_dist.utils import dataframe_to_csr_matrix

    ratings = load_ml100k(DATA / "ml-100k")
    positives = ratings[ratings.rating >= 4].assign(value=1.0)
    matrix, _, _ = dataframe_to_csr_matrix(positives, "user", "item", "value")
    return strong_generalization_split(matrix, num_val_users=100, num_test_users=100, seed=0)


def evaluate_after_train(rounds: int) -> None:
    split = demo_split()
    recoder = Recoder(DynamicAutoencoder([200], sparse=True), num_workers=1, seed=0)
    recoder.train(split.train, batch_size=100, num_epochs=2, negative_sampling=True)
    seconds = {"on a worker": [], "here": []}
    results = {}
    for _ in range(rounds):
        for side, on_workers in (("on a worker", True), ("here", None)):
            started = time.perf_counter()
            results[side] = recoder.evaluate(split.test, 100, METRICS, on_workers=on_workers)
            seconds[side].append(time.perf_counter() - started)
    assert results["here"] == results["on a worker"], results
    rows = [
        [side, *[f"{s:.2f}" for s in values], f"{median(values):.2f}"]
        for side, values in seconds.items()
    ]
    header = ["evaluate of 100 users", *[f"round {i + 1} (s)" for i in range(rounds)], "median (s)"]
    print(markdown_table(header, rows))
    print(f"metrics (equal on both sides): {results['here']}")


def random_rows(num_users: int, num_items: int, per_user: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    cols = np.concatenate(
        [rng.choice(num_items, per_user, replace=False) for _ in range(num_users)]
    )
    rows = np.repeat(np.arange(num_users), per_user)
    return sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), (num_users, num_items))


def scoring_here() -> None:
    table = []
    for num_users, num_items in ((1000, 10_000), (2000, 20_000), (4000, 20_000), (4000, 40_000)):
        recoder = Recoder(DynamicAutoencoder([200], sparse=True), num_workers=0, seed=0)
        train = RecommendationDataset(random_rows(500, num_items, 20, seed=1))
        recoder.train(train, batch_size=500, num_epochs=1)
        data = RecommendationDataset(
            random_rows(num_users, num_items, 20, seed=2), random_rows(num_users, num_items, 5, 3)
        )
        started = time.perf_counter()
        recoder.evaluate(data, 100, METRICS, on_workers=False)
        seconds = time.perf_counter() - started
        cells = num_users * num_items
        table.append(
            [
                num_users,
                f"{num_items:,}",
                f"{cells:,}",
                f"{seconds:.2f}",
                f"{cells / seconds / 1e6:.0f}",
            ]
        )
    print(markdown_table(["users", "items", "scores", "seconds", "M scores/s"], table))
    print(f"DRIVER_EVAL_SCORES = {DRIVER_EVAL_SCORES:,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    init_local_ray(num_cpus=4)
    print(f"load: {load_average()}")
    evaluate_after_train(args.rounds)
    scoring_here()
    print(f"load: {load_average()}")


if __name__ == "__main__":
    main()
