"""The main job: train a DynamicAutoencoder on MovieLens 100K and evaluate it."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger("recoder_dist")


def run_demo(args: argparse.Namespace) -> int:
    """Trains a DynamicAutoencoder on MovieLens 100K (ratings >= 4 as implicit feedback) and
    evaluates it on held-out users with 80/20 fold-in."""
    from recoder_dist.datasets import load_ml100k, strong_generalization_split
    from recoder_dist.metrics import NDCG, Recall
    from recoder_dist.model import Recoder
    from recoder_dist.nn import DynamicAutoencoder
    from recoder_dist.utils import dataframe_to_csr_matrix

    ratings = load_ml100k(args.data_dir)
    positives = ratings[ratings.rating >= 4].assign(value=1.0)
    matrix, _, _ = dataframe_to_csr_matrix(positives, "user", "item", "value")
    split = strong_generalization_split(
        matrix, num_val_users=100, num_test_users=100, seed=args.seed
    )
    logger.info("MovieLens 100K: %s users x %s items, %s positives", *matrix.shape, matrix.nnz)

    metrics = [Recall(k=20), Recall(k=50), NDCG(k=100)]
    recoder = Recoder(
        DynamicAutoencoder(
            hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=True
        ),
        optimizer_type="adam",
        loss="logloss",
        num_workers=args.num_workers,
        seed=args.seed,
    )
    started = time.perf_counter()
    recoder.train(
        train_dataset=split.train,
        val_dataset=split.validation,
        lr=args.lr,
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        negative_sampling=True,
        eval_freq=args.epochs,
        metrics=metrics,
        eval_num_recommendations=100,
    )
    seconds = time.perf_counter() - started
    results = recoder.evaluate(split.test, num_recommendations=100, metrics=metrics)
    print(
        f"\nDynamicAutoencoder, {args.num_workers} workers, {args.epochs} epochs, "
        f"{seconds:.1f} s of training; {results['eval_users']} held-out test users:"
    )
    for metric in metrics:
        print(f"  {metric.name:<10} {results[metric.name]:.4f}")
    return 0
