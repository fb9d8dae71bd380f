"""Quality and training time: recoder_dist against recsys-recoder 0.4.0 on 0.4.0's own settings.

Both libraries train the same DynamicAutoencoder on the same training rows with the same
settings, three seeds each, and both are scored by the same code (recoder_dist's evaluation;
recsys-recoder's model files are read with ``Recoder.init_from_model_file``):

* DynamicAutoencoder([200], tanh, noise 0.5, sparse embeddings), Adam (SparseAdam for the
  embeddings) lr 1e-3, weight decay 2e-5, batch 500, mini-batch negative sampling, logloss,
  ``lr_milestones`` at 60% and 80% of the epochs: the settings of recsys-recoder's ML-20M script.
* ml-1m-implicit (600 validation / 600 test users held out, 80/20 fold-in: the split of
  ``benchmarks/quality.py``), ml-latest-small (ratings > 3.5, 100 test users), citeulike-a
  (600 test users): Recall@20, Recall@50 (divided by min(k, |relevant|)) and NDCG@100 of the
  test users. Gowalla (LightGCN's train.txt/test.txt): Recall@20 (divided by |relevant|) and
  NDCG@20 of every test user. 100 epochs; 30 on Gowalla, where recsys-recoder takes ~16 s an
  epoch on one thread.
* Training rows: the users with interactions in the training matrix, in the same order for
  both (recsys-recoder would otherwise also draw the held-out users' empty rows).
* Time: the wall time of the ``train`` call, on ``--threads`` torch threads on both sides.
  recoder_dist runs with its default ``num_workers`` unless ``--workers`` is given: on one
  machine, in this process; with ``--workers N``, on N Ray Train workers, whose start (seconds)
  is counted too.

The target (issue #20): on every dataset and metric, recoder_dist's mean is at least
recsys-recoder's mean minus one standard deviation, and its training time is lower.

Every finished run is appended to ``~/.cache/recoder_dist/bench/parity/runs.jsonl``; a run
already there (same dataset, library, seed and settings) is not run again, so an interrupted
benchmark continues where it stopped (``--fresh`` ignores the file).

    python benchmarks/parity.py                          # all four datasets, ~1 h 15 min
    python benchmarks/parity.py --datasets ml-1m --seeds 1 --epochs 5    # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import time

import numpy as np
import scipy.sparse as sp
from _common import CACHE, DATA, load_average, markdown_table, npz_path
from _reference_venv import run_reference

from recoder_dist.data import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall

RUNS = CACHE / "parity" / "runs.jsonl"
MODEL = dict(hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=True)
TRAIN = dict(lr=1e-3, weight_decay=2e-5, batch_size=500, negative_sampling=True)
STRONG_METRICS = (Recall(20), Recall(50), NDCG(100))
GOWALLA_METRICS = (Recall(20, normalize=False), NDCG(20))


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    epochs: int
    metrics: tuple

    def milestones(self, epochs: int) -> list[int]:
        """0.4.0's ML-20M script decays at epochs 60 and 80 of 100: the same fractions."""
        return sorted({max(1, round(0.6 * epochs)), max(1, round(0.8 * epochs))})


DATASETS = {
    "ml-1m": Dataset("ml-1m", 100, STRONG_METRICS),
    "ml-latest-small": Dataset("ml-latest-small", 100, STRONG_METRICS),
    "citeulike-a": Dataset("citeulike-a", 100, STRONG_METRICS),
    "gowalla": Dataset("gowalla", 30, GOWALLA_METRICS),
}


def load_split(name: str) -> tuple[sp.csr_matrix, RecommendationDataset]:
    """The training rows (users with interactions only) and the test users of ``name``."""
    from recoder_dist.datasets import (
        load_citeulike_a,
        load_events,
        load_movielens,
        load_train_test,
        strong_generalization_split,
    )
    from recoder_dist.utils import dataframe_to_csr_matrix

    if name == "gowalla":
        train, test = load_train_test(DATA / "gowalla").datasets()
        return _nonempty_rows(train.interactions), test
    if name == "ml-1m":
        events, held_out = load_events(DATA / "ml-1m-implicit" / "interactions.csv"), (600, 600)
    elif name == "ml-latest-small":
        ratings = load_movielens("ml-latest-small", DATA / "ml-latest-small")
        events, held_out = ratings[ratings.rating > 3.5].assign(value=1.0), (0, 100)
    elif name == "citeulike-a":
        events, held_out = load_citeulike_a(DATA / "citeulike-a"), (0, 600)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    matrix = dataframe_to_csr_matrix(events, "user", "item", "value")[0]
    split = strong_generalization_split(
        matrix, num_val_users=held_out[0], num_test_users=held_out[1], seed=0
    )
    return _nonempty_rows(split.train.interactions), split.test


def _nonempty_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    return matrix[np.flatnonzero(np.diff(matrix.indptr))]


def _key(dataset: str, library: str, seed: int, settings: dict) -> str:
    text = json.dumps([dataset, library, seed, settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _done_runs(fresh: bool) -> dict:
    if fresh or not RUNS.exists():
        return {}
    runs = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    return {run["key"]: run for run in runs}


def _record(run: dict) -> None:
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with RUNS.open("a") as f:
        f.write(json.dumps(run) + "\n")


def reference_run(matrix_path: str, settings: dict, seed: int, threads: int) -> tuple[str, float]:
    """Trains with recsys-recoder 0.4.0; returns its model file and the train call's seconds."""
    prefix = CACHE / "parity" / "models" / f"{settings['dataset']}-seed{seed}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    job = dict(
        task="train_save",
        matrix=matrix_path,
        epochs=settings["epochs"],
        seed=seed,
        model=MODEL,
        train=dict(TRAIN, lr_milestones=settings["milestones"]),
        prefix=str(prefix),
    )
    result = run_reference(job, threads)
    return result["model_file"], result["wall"]


def our_recoder(args, seed: int):
    from recoder_dist.model import Recoder
    from recoder_dist.nn import DynamicAutoencoder

    return Recoder(
        DynamicAutoencoder(**MODEL),
        optimizer_type="adam",
        loss="logloss",
        num_workers=args.workers,
        cpus_per_worker=args.threads,
        seed=seed,
    )


def our_run(args, matrix: sp.csr_matrix, settings: dict, seed: int):
    recoder = our_recoder(args, seed)
    started = time.perf_counter()
    recoder.train(
        RecommendationDataset(matrix),
        num_epochs=settings["epochs"],
        lr_milestones=settings["milestones"],
        **TRAIN,
    )
    return recoder, time.perf_counter() - started


def run_dataset(dataset: Dataset, args, done: dict) -> list[dict]:
    matrix, test = load_split(dataset.name)
    epochs = args.epochs or dataset.epochs
    settings = dict(dataset=dataset.name, epochs=epochs, milestones=dataset.milestones(epochs))
    settings.update(model=MODEL, train=TRAIN, threads=args.threads, workers=args.workers)
    matrix_path = npz_path(f"parity-{dataset.name}", matrix)
    k = max(m.k for m in dataset.metrics)
    runs = []
    for seed in range(args.seeds):
        for library in ("recsys-recoder 0.4.0", "recoder_dist"):  # interleaved: same load
            key = _key(dataset.name, library, seed, settings)
            if key in done:
                runs.append(done[key])
                continue
            print(f"[{dataset.name}] seed {seed}: {library} ...", flush=True)
            if library == "recoder_dist":
                recoder, seconds = our_run(args, matrix, settings, seed)
            else:
                model_file, seconds = reference_run(matrix_path, settings, seed, args.threads)
                recoder = our_recoder(args, seed)
                recoder.init_from_model_file(model_file)
            results = recoder.evaluate(test, num_recommendations=k, metrics=list(dataset.metrics))
            run = dict(key=key, dataset=dataset.name, library=library, seed=seed, seconds=seconds)
            run.update(metrics={m.name: results[m.name] for m in dataset.metrics})
            run.update(users=results["eval_users"], load=load_average(), settings=settings)
            _record(run)
            runs.append(run)
    return runs


def summary_rows(dataset: Dataset, runs: list[dict]) -> tuple[list, list[str]]:
    """Table rows (mean ± std per library) and the target's misses."""
    names = [m.name for m in dataset.metrics]
    by_library = {}
    for run in runs:
        by_library.setdefault(run["library"], []).append(run)
    rows, stats = [], {}
    for library, group in by_library.items():
        cells = []
        for name in [*names, "seconds"]:
            values = [r["seconds"] if name == "seconds" else r["metrics"][name] for r in group]
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[library, name] = mean, std
            digits = 1 if name == "seconds" else 4
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        rows.append([dataset.name, library, len(group), *cells])
    misses = []
    ref, ours = "recsys-recoder 0.4.0", "recoder_dist"
    if (ref, "seconds") in stats and (ours, "seconds") in stats:
        for name in names:
            (ref_mean, ref_std), (our_mean, _) = stats[ref, name], stats[ours, name]
            if our_mean < ref_mean - ref_std:
                misses.append(f"{dataset.name} {name}: {our_mean:.4f} < {ref_mean - ref_std:.4f}")
        if stats[ours, "seconds"][0] >= stats[ref, "seconds"][0]:
            misses.append(f"{dataset.name}: training time not lower")
    return rows, misses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, help="override every dataset's number of epochs")
    parser.add_argument(
        "--workers", type=int, help="recoder_dist's Ray Train workers (default: the library's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both libraries")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already recorded")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)  # the in-process loop (--workers 0) runs here
    done = _done_runs(args.fresh)
    all_rows, all_misses = {}, []
    for name in args.datasets:
        dataset = DATASETS[name]
        rows, misses = summary_rows(dataset, run_dataset(dataset, args, done))
        all_rows[dataset.metrics] = all_rows.get(dataset.metrics, []) + rows
        all_misses += misses
    print(
        f"\nmachine load at the end: {load_average()}; torch threads {args.threads}, "
        f"recoder_dist workers {'default' if args.workers is None else args.workers}; "
        f"mean ± std over seeds 0..{args.seeds - 1}\n"
    )
    for metrics, rows in all_rows.items():
        header = ["dataset", "library", "seeds", *(m.name for m in metrics), "train s"]
        print(markdown_table(header, rows) + "\n")
    print("target met" if not all_misses else "target missed:\n- " + "\n- ".join(all_misses))


if __name__ == "__main__":
    main()
