"""The fixed cost of a job (issue 36): what ``Recoder.evaluate`` costs after ``train`` on the
workers and in this process, and how fast this process scores as the evaluation grows.

1. ml-100k (the demo's data: ratings >= 4, 100 test users): a DynamicAutoencoder([200]) trained
   2 epochs on 1 worker, then ``evaluate`` of the test users with ``on_workers=True`` (a worker
   group of its own) and with the default (here, in the driver), interleaved, ``--rounds``
   times; the metrics of both must be equal.
2. Scoring here: ``evaluate(on_workers=False)`` of a DynamicAutoencoder([200]) on random users
   (20 input and 5 target items each) for growing users x items, the scores a call computes;
   this sets ``recoder_dist.model.DRIVER_EVAL_SCORES``.
3. ``--timeline``: where the seconds of the demo's job go, on 1 and 2 workers, each in a fresh
   process on its own local Ray (the machine's real CPU count, as ``recoder-dist demo``): the
   imports, the data, Ray's start, the Train controller's phases (read from its log in Ray's
   session folder), the first epoch, the epochs, the evaluation here and Ray's shutdown.

    python benchmarks/fixed_cost.py [--rounds 3]
    python benchmarks/fixed_cost.py --timeline [--rounds 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import ray
import scipy.sparse as sp
from _common import DATA, load_average, markdown_table, median

from recoder_dist.data import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import DRIVER_EVAL_SCORES, Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.driver.launcher import init_local_ray

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


# The Train controller's own timings of a worker group's start (its log, Ray 2.60's wording).
CONTROLLER_PHASES = {
    "worker processes (actors created)": r"worker actors created in ([0-9.]+)s",
    "train context on the workers": r"Train context initialized on workers in ([0-9.]+)s",
    "worker group start, all": r"Worker group startup completed in ([0-9.]+)s",
}
# Lines whose time (from the train call) is shown: the controller's first, the loop's launch.
CONTROLLER_EVENTS = {
    "train call to the controller's first log line": "",
    "train call to the loop's launch on the workers": "Train function launched on workers",
}


class _EpochTimes(logging.Handler):
    """When the driver logs each epoch line (the progress actor's records)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.first = self.last = None

    def emit(self, record):
        if record.getMessage().startswith("epoch "):
            self.last = time.perf_counter()
            self.first = self.first or self.last


def one_timeline(workers: int) -> dict:
    """The demo's job on ``workers`` workers, timed (this process is fresh: see main)."""
    import psutil

    imported = time.perf_counter()
    since_start = time.time() - psutil.Process().create_time()  # the interpreter, the imports
    split = demo_split()
    loaded = time.perf_counter()
    init_local_ray()
    ray_up = time.perf_counter()
    run_name = f"fixed-cost-{uuid.uuid4().hex[:8]}"
    epochs = _EpochTimes()
    logging.getLogger("recoder_dist").addHandler(epochs)
    logging.getLogger("recoder_dist").setLevel(logging.INFO)
    recoder = Recoder(
        DynamicAutoencoder([200], activation_type="tanh", noise_prob=0.5, sparse=True),
        optimizer_type="adam",
        loss="logloss",
        num_workers=workers,
        seed=0,
        run_name=run_name,
    )
    train_called = time.time()
    recoder.train(
        split.train,
        split.validation,
        lr=1e-3,
        num_epochs=40,
        batch_size=500,
        negative_sampling=True,
        eval_freq=40,
        metrics=METRICS,
        eval_num_recommendations=100,
    )
    trained = time.perf_counter()
    recoder.evaluate(split.test, num_recommendations=100, metrics=METRICS)
    evaluated = time.perf_counter()
    ray.shutdown()
    down = time.perf_counter()
    times = {
        "interpreter and imports": since_start,
        "data (ml-100k, split)": loaded - imported,
        "Ray's start": ray_up - loaded,
        "train call to first epoch line": epochs.first - ray_up,
        "first to last epoch line (39 epochs)": epochs.last - epochs.first,
        "last epoch line to train's return": trained - epochs.last,
        "evaluate (100 users, here)": evaluated - trained,
        "Ray's shutdown": down - evaluated,
        "total": since_start + down - imported,
    }
    times.update(_controller_phases(run_name, train_called))
    return times


def _controller_phases(run_name: str, train_called: float) -> dict:
    """The phases that the run's Train controller logged into Ray's session folder (under
    Ray's default temporary folder; found by the run's name)."""
    found = {}
    for path in glob.glob("/tmp/ray/session_*/logs/train/ray-train-sys-controller-*.log"):
        text = Path(path).read_text()
        if run_name not in text:
            continue
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            message = record.get("message", "")
            for name, start in CONTROLLER_EVENTS.items():
                if start in message and f"  then: {name}" not in found:
                    when = datetime.strptime(record["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    found[f"  then: {name}"] = when - train_called
            for name, pattern in CONTROLLER_PHASES.items():
                match = re.search(pattern, message)
                if match:
                    found[f"  of which: {name}"] = float(match.group(1))
    return found


def timelines(rounds: int) -> None:
    runs = {1: [], 2: []}
    for _ in range(rounds):
        for workers in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(workers)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[workers].append(json.loads(out.strip().splitlines()[-1]))
    names = list(runs[1][0])
    header = ["phase", *[f"{w} worker(s), run {i + 1} (s)" for w in runs for i in range(rounds)]]
    rows = [
        [n, *[f"{run.get(n, float('nan')):.1f}" for w in runs for run in runs[w]]] for n in names
    ]
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one timeline, as JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_timeline(args.one)))
        return
    if args.timeline:
        print(f"load: {load_average()}")
        timelines(args.rounds)
        print(f"load: {load_average()}")
        return
    init_local_ray(num_cpus=4)
    print(f"load: {load_average()}")
    evaluate_after_train(args.rounds)
    scoring_here()
    print(f"load: {load_average()}")


if __name__ == "__main__":
    main()
