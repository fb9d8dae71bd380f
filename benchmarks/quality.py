"""Ranking quality of the models against closed-form baselines, on real data.

Trains and evaluates DynamicAutoencoder, MultVAE, MatrixFactorization, EASE and popularity on

* ml-1m-implicit: Mult-VAE strong generalization (600 validation and 600 test users, seed 0,
  80/20 fold-in); Recall@20 and Recall@50 divided by min(k, |relevant|), NDCG@100; test users.
* gowalla: LightGCN's own train.txt/test.txt; Recall@20 divided by |relevant|, NDCG@20; all
  users, training items excluded.

and prints one table, with the training time of each row.

Matrix factorization has no embedding for a held-out user of the strong split. Its ml-1m row
folds each test user in by ridge regression of the user's fold-in row onto the trained item
embeddings (item bias as an offset): ``p = x V (V^T V + lambda I)^-1``, scores ``p V^T + b``.

    python benchmarks/quality.py                                 # both datasets, 1 worker
    python benchmarks/quality.py --datasets ml-1m --epochs 5     # a quick look
    python benchmarks/quality.py --datasets ml-1m --compare-workers 2
    python benchmarks/quality.py --datasets ml-1m --models vae --compare-workers 2
    python benchmarks/quality.py --datasets ml-1m --models dae --splits 5

``--splits N`` asks whether a model beats EASE on ml-1m beyond the noise of one split's 600
test users: N strong splits (seeds 0 to N-1), on each the model trained and EASE fit, and each
test user's NDCG@100 under both. It prints each split's means and, over all the splits' test
users, the model's mean difference from EASE with its standard error (paired by user; the
splits' training sets overlap, so their differences are not independent: a rough error).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from _common import markdown_table

from recoder_dist.baselines import EASE, Popularity, evaluate_scores
from recoder_dist.datasets import load_events, load_train_test, strong_generalization_split
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization, MultVAE
from recoder_dist.nn.base import sharded_class
from recoder_dist.utils import dataframe_to_csr_matrix

REPO = Path(__file__).resolve().parent.parent
ML1M_METRICS = [Recall(20), Recall(50), NDCG(100)]
GOWALLA_METRICS = [Recall(20, normalize=False), NDCG(20)]
COLUMNS = ["Recall@20", "Recall@50", "NDCG@100", "Recall@20/relevant", "NDCG@20"]


@dataclasses.dataclass(frozen=True)
class Run:
    """A model and how to train it; ``batch_size`` is global (split over the workers)."""

    model: dict
    loss: str
    lr: float
    batch_size: int
    num_epochs: int
    weight_decay: float = 0.0
    negative_sampling: bool = False
    num_sampling_users: int = 0
    lr_milestones: tuple[int, ...] | None = None


# The autoencoder on ml-1m: the `ml-1m` preset, chosen by validation NDCG@100 with Tune sweeps
# on prepare's split (the figures: RESULTS.md, Quality, 2026-12-07, session 16). Before it:
# batch 100, 18 epochs, a milestone at 12, weight decay 2e-5, chosen on this split's validation.
DAE_ML1M = Run(
    model=dict(hidden_layers=[600], activation_type="tanh", noise_prob=0.5, is_constrained=True),
    loss="logloss",
    lr=1e-3,
    batch_size=1000,
    num_epochs=100,
    weight_decay=6e-3,
)
# MultVAE on ml-1m: the `vae-ml-1m` preset, chosen by validation NDCG@100 by hand and by a Tune
# sweep on prepare's split (the figures: RESULTS.md, Quality, 2026-12-07).
VAE_ML1M = Run(
    model=dict(hidden_layers=[600, 200], noise_prob=0.5, anneal_cap=0.2, anneal_steps=2000),
    loss="logloss",
    lr=1e-3,
    batch_size=500,
    num_epochs=60,
)
# MultVAE on Gowalla: not tuned ([600, 200] was too slow an epoch here: RESULTS.md, Quality,
# 2026-12-07): [200], sparse tables and sampling groups of 1,500 users (the autoencoder's best
# of the sampled groups), the KL weight at its cap after 10 epochs of 60 steps, 15 epochs.
VAE_GOWALLA = Run(
    model=dict(hidden_layers=[200], noise_prob=0.5, anneal_cap=0.2, anneal_steps=600, sparse=True),
    loss="logloss",
    lr=1e-3,
    batch_size=500,
    num_epochs=15,
    negative_sampling=True,
    num_sampling_users=1500,
)
# MF on ml-1m, validation NDCG@100 (ridge fold-in, lambda 10; popularity 0.2138), sparse
# embeddings, batch 100, lr 1e-3: multinomial loss 0.3606 at epoch 20, then overfitting (0.3012
# at 40); squared error 0.3814 at 20 (0.3718 at 40); squared error with confidence 10 0.3811 at
# 40; logistic 0.2915 at 20. With the multinomial loss, dense embeddings with weight decay
# 1e-5 / 1e-4 (0.3487 / 0.3513), 64 dimensions (0.3158), user dropout 0.5 (0.3556), lr 3e-4
# (0.3535 at 40) or batch 500 (0.3325 at 25) did not help.
MF_ML1M = Run(
    model=dict(embedding_size=200, sparse=True), loss="mse", lr=1e-3, batch_size=100, num_epochs=20
)
# Gowalla, validation Recall@20 / NDCG@20 (20% of each user's training items held out; chosen with
# the data order before 8b425f1, whose groups of neighbouring ids scored higher here; see
# RESULTS.md): negative sampling with groups of 1,500 users (three batches of 500 sharing the union
# of their items) reached 0.178 / 0.1176 at epoch 21 untied, 0.1829 / 0.1217 at 18 with tied decoder
# weights (groups of 500: 0.152 at epoch 21, then overfitting). Scoring every item (the multinomial
# loss over the whole catalog, no sampling) with tied weights: 0.1732 / 0.1176 at epoch 12, 0.1912 /
# 0.1269 at 18, 0.1969 / 0.1301 at 21, 0.1986 / 0.1305 at 24 (the best), 0.1979 / 0.1301 at 27.
# Test, 24 epochs: 0.1767 / 0.1430 in 840 s of training (18 epochs: 0.1736 / 0.1433 in 692 s),
# against 0.1666 / 0.1351 in 280 s with sampling.
DAE_GOWALLA = Run(
    model=dict(
        hidden_layers=[200],
        activation_type="tanh",
        noise_prob=0.5,
        sparse=True,
        is_constrained=True,
    ),
    loss="logloss",
    lr=1e-3,
    batch_size=500,
    num_epochs=24,
)
# MF on Gowalla, validation Recall@20 / NDCG@20 as above, multinomial loss over the sampled
# items, lr 1e-3, batch 500: groups of 500 users 0.1636 / 0.1083 at epoch 25 (0.1466 at 40);
# groups of 1,500 0.1733 / 0.1137 at 30; groups of 3,000 0.1768 / 0.1155 at 35 (0.1730 at 40).
# lr 3e-3 peaked at 0.1540 (epoch 10), lr 1e-2 at 0.1357 (5); user dropout 0.5 with lr 3e-3 at
# 0.1537 (15).
MF_GOWALLA = Run(
    model=dict(embedding_size=200, sparse=True),
    loss="logloss",
    lr=1e-3,
    batch_size=500,
    num_epochs=35,
    negative_sampling=True,
    num_sampling_users=3000,
)
AUTOENCODERS = (
    ("dae", "DynamicAutoencoder", DynamicAutoencoder, DAE_ML1M),
    ("vae", "MultVAE", MultVAE, VAE_ML1M),
)
MF_FOLD_IN_LAMBDA = 10.0
EASE_LAMBDA = 500.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--datasets", default="ml-1m,gowalla")
    parser.add_argument(
        "--models",
        default="dae,vae,mf,baselines",
        help="which rows: dae (DynamicAutoencoder), vae (MultVAE), mf, baselines",
    )
    parser.add_argument("--epochs", type=int, help="override every model's number of epochs")
    parser.add_argument(
        "--compare-workers",
        type=int,
        metavar="N",
        help="add ml-1m DynamicAutoencoder and MultVAE rows trained on N workers",
    )
    parser.add_argument(
        "--splits",
        type=int,
        metavar="N",
        help="ml-1m only: the autoencoders against EASE over N strong splits, paired by user",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="of the training step"
    )
    return parser.parse_args()


def train(model, run: Run, dataset, workers: int, seed: int, epochs: int | None, precision="fp32"):
    """A Recoder trained on ``dataset``, and the seconds its training took. ``run``'s batch
    and sampling group are a step's global ones: given as they are where the tables are
    sharded (a DynamicAutoencoder or a MatrixFactorization on several workers), split by hand
    where they are replicated (``batch_size`` is then per worker)."""
    shares = 1 if sharded_class(model) is not None else max(workers, 1)
    if run.batch_size % shares:
        raise ValueError(f"batch size {run.batch_size} does not split over {workers} workers")
    per_worker = run.batch_size // shares
    recoder = Recoder(model, optimizer_type="adam", loss=run.loss, num_workers=workers, seed=seed)
    started = time.perf_counter()
    recoder.train(
        dataset,
        lr=run.lr,
        weight_decay=run.weight_decay,
        num_epochs=epochs or run.num_epochs,
        batch_size=per_worker,
        lr_milestones=list(run.lr_milestones) if run.lr_milestones else None,
        negative_sampling=run.negative_sampling,
        num_sampling_users=run.num_sampling_users // shares,
        precision=precision,
    )
    return recoder, time.perf_counter() - started


def fold_in_scores(recoder: Recoder, lam: float):
    """Scores of held-out users from a trained MatrixFactorization: each user's embedding is
    the ridge regression of its fold-in row onto the item embeddings."""
    model = recoder.model
    with torch.no_grad():
        items = model.item_embedding.weight.double().numpy()
        bias = model.item_bias.weight.double().numpy().ravel()
    projection = items @ np.linalg.inv(items.T @ items + lam * np.eye(items.shape[1]))

    def scores(rows):
        users = rows @ projection  # sparse rows x dense: one small product per batch
        return (users @ items.T + bias).astype(np.float32)

    return scores


def result_row(dataset: str, model: str, workers, seconds: float, metrics: dict) -> dict:
    return dict(dataset=dataset, model=model, workers=workers, seconds=seconds, **metrics)


def baseline_row(dataset: str, name: str, baseline, train_set, test, metrics) -> dict:
    started = time.perf_counter()
    baseline.fit(train_set.interactions)
    seconds = time.perf_counter() - started
    return result_row(dataset, name, "-", seconds, evaluate_scores(baseline.scores, test, metrics))


def ml1m_matrix(data_root: Path):
    """ml-1m-implicit's users x items CSR matrix."""
    events = load_events(data_root / "ml-1m-implicit" / "interactions.csv")
    return dataframe_to_csr_matrix(events, "user", "item", "value")[0]


def ml1m_split(matrix, seed: int = 0):
    """The strong split of ``matrix``: 600 validation and 600 test users drawn with ``seed``."""
    return strong_generalization_split(matrix, num_val_users=600, num_test_users=600, seed=seed)


def paired_difference(parts: list[np.ndarray]) -> str:
    """The mean of the per-user differences ``parts`` (an array a split), its standard error
    and the number of users, as a table cell."""
    pooled = np.concatenate(parts)
    error = pooled.std(ddof=1) / np.sqrt(len(pooled))
    return f"{pooled.mean():+.4f} ± {error:.4f} ({len(pooled)} users)"


def ml1m_rows(args) -> list[dict]:
    split = ml1m_split(ml1m_matrix(args.data_root))
    train_set, test = split.train, split.test
    rows = []
    worker_counts = [args.workers]
    if args.compare_workers and args.compare_workers != args.workers:
        worker_counts.append(args.compare_workers)
    chosen = args.models.split(",")
    for key, name, model_class, run in AUTOENCODERS:
        if key not in chosen:
            continue
        for workers in worker_counts:
            model = model_class(**run.model)
            recoder, seconds = train(
                model, run, train_set, workers, args.seed, args.epochs, args.precision
            )
            results = recoder.evaluate(test, metrics=ML1M_METRICS)
            rows.append(result_row("ml-1m", name, workers, seconds, results))

    if "mf" in chosen:
        mf = MatrixFactorization(**MF_ML1M.model)
        recoder, seconds = train(
            mf, MF_ML1M, train_set, args.workers, args.seed, args.epochs, args.precision
        )
        results = evaluate_scores(fold_in_scores(recoder, MF_FOLD_IN_LAMBDA), test, ML1M_METRICS)
        rows.append(result_row("ml-1m", "MF + ridge fold-in", args.workers, seconds, results))

    if "baselines" in chosen:
        for name, baseline in (("EASE", EASE(EASE_LAMBDA)), ("popularity", Popularity())):
            rows.append(baseline_row("ml-1m", name, baseline, train_set, test, ML1M_METRICS))
    return rows


def per_user(score_fn, dataset, metric) -> np.ndarray:
    """``metric`` of each user of ``dataset`` with a target, from ``score_fn``'s scores (each
    user's own input items excluded, as ``evaluate_scores`` does)."""
    users = np.flatnonzero(np.diff(dataset.target.indptr))
    inputs, targets = dataset.interactions[users], dataset.target[users]
    scores = np.array(score_fn(inputs), dtype=np.float64)
    scores[np.repeat(np.arange(len(users)), np.diff(inputs.indptr)), inputs.indices] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, : metric.k]
    hits = np.take_along_axis(targets.toarray() > 0, top, axis=1)
    return metric.evaluate_hits(hits, np.diff(targets.indptr))


def split_comparison(args) -> None:
    """Prints the autoencoders against EASE over ``args.splits`` strong splits of ml-1m."""
    matrix = ml1m_matrix(args.data_root)
    metric = NDCG(100)
    chosen = [a for a in AUTOENCODERS if a[0] in args.models.split(",")]
    differences = {name: [] for _, name, _, _ in chosen}
    lines = []
    for split_seed in range(args.splits):
        split = ml1m_split(matrix, split_seed)
        ease = EASE(EASE_LAMBDA).fit(split.train.interactions)
        reference = per_user(ease.scores, split.test, metric)
        lines.append([split_seed, "EASE", f"{reference.mean():.4f}", "", ""])
        for _, name, model_class, run in chosen:
            recoder, seconds = train(
                model_class(**run.model),
                run,
                split.train,
                args.workers,
                args.seed,
                args.epochs,
                args.precision,
            )
            values = per_user(recoder.predict, split.test, metric)
            differences[name].append(values - reference)
            change = f"{(values - reference).mean():+.4f}"
            lines.append([split_seed, name, f"{values.mean():.4f}", change, f"{seconds:.1f}"])
    for name, parts in differences.items():
        lines.append(["all", name, "", paired_difference(parts), ""])
    header = ["split", "model", metric.name, "minus EASE", "train s"]
    print(markdown_table(header, lines))


def gowalla_rows(args) -> list[dict]:
    train_set, test = load_train_test(args.data_root / "gowalla").datasets()
    rows = []
    chosen = args.models.split(",")
    for key, name, model_class, run in (
        ("dae", "DynamicAutoencoder", DynamicAutoencoder, DAE_GOWALLA),
        ("vae", "MultVAE", MultVAE, VAE_GOWALLA),
        ("mf", "MatrixFactorization", MatrixFactorization, MF_GOWALLA),
    ):
        if key not in chosen:
            continue
        model = model_class(**run.model)
        recoder, seconds = train(
            model, run, train_set, args.workers, args.seed, args.epochs, args.precision
        )
        results = recoder.evaluate(test, metrics=GOWALLA_METRICS)
        rows.append(result_row("gowalla", name, args.workers, seconds, results))

    if "baselines" in chosen:
        # EASE's dense 40,981 x 40,981 inverse would take ~13 GB: refused.
        rows.append(dict(dataset="gowalla", model="EASE", note="n/a (too many items)"))
        rows.append(
            baseline_row("gowalla", "popularity", Popularity(), train_set, test, GOWALLA_METRICS)
        )
    return rows


def print_table(rows: list[dict]) -> None:
    header = ["dataset", "model", "workers", *COLUMNS, "train s"]
    lines = []
    for row in rows:
        if "note" in row:
            lines.append([row["dataset"], row["model"], "-", row["note"]])
            continue
        metrics = [f"{row[c]:.4f}" if c in row else "" for c in COLUMNS]
        seconds = f"{row['seconds']:.1f}"
        lines.append([row["dataset"], row["model"], row["workers"], *metrics, seconds])
    print(markdown_table(header, lines))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    datasets = args.datasets.split(",")
    unknown = set(datasets) - {"ml-1m", "gowalla"}
    if unknown:
        raise SystemExit(f"unknown datasets {sorted(unknown)}; choose from ml-1m, gowalla")
    if args.splits is not None:
        if args.splits < 1:
            raise SystemExit(f"--splits must be >= 1, got {args.splits}")
        if datasets != ["ml-1m"]:
            raise SystemExit("--splits compares on ml-1m only: add --datasets ml-1m")
        split_comparison(args)
        return
    rows = []
    if "ml-1m" in datasets:
        rows += ml1m_rows(args)
    if "gowalla" in datasets:
        rows += gowalla_rows(args)
    print_table(rows)


if __name__ == "__main__":
    main()
