"""Peak memory of a training worker: item tables replicated against sharded, for source trees
side by side (e.g. the code before a change against after it).

Gowalla (train.txt for training and as the evaluation users' input, test.txt as their
targets), or with ``--dataset long-tail`` sync_bytes.py's synthetic Zipf catalog (20,000 users,
``--items`` items, 30 draws a user; a fifth of each user's items held out as targets, 2,000 of
those users evaluated); the ML-20M script's model and step (DynamicAutoencoder [200] tanh,
noise 0.5, sparse embeddings, Adam, logloss, batch 500, negative sampling); 1 or 2 workers of 1 CPU,
``--epochs`` epochs, an evaluation (Recall@20, NDCG@100) and a checkpoint every epoch. Each run
is a process of its own (its own local Ray) that imports the recoder_dist of the tree given,
and the runs are interleaved (every tree and side once a round). What is read is the last
epoch's record: ``peak_rss_mb``, the largest peak resident memory (``VmHWM``) of any worker so
far (the evaluations and checkpoints of the epochs before, and the last epoch's steps), and
``private_rss_mb``, the largest private resident memory (``RssAnon``) at the end of the last
epoch's steps; the driver's own peak (``VmHWM`` of the run's process, after ``train``
returned: with sharded tables the weights stay in the run's checkpoint); and the epoch's
metrics, which the trees must agree on. ``--eval-batch`` bounds the sharded evaluation's
scores (a rank scores ``batch x its items`` at once).

    python benchmarks/worker_memory.py --trees before=/tmp/base after=.
    python benchmarks/worker_memory.py --trees before=/tmp/base after=. --dataset long-tail
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import load_average, markdown_table, median

# side -> (workers, tables, label)
SIDES = {
    "1": (1, "replicated", "1 worker"),
    "2r": (2, "replicated", "2 workers, replicated tables"),
    "2s": (2, "sharded", "2 workers, sharded tables"),
    "4s": (4, "sharded", "4 workers, sharded tables"),
}
MACHINE_CPUS = 2  # this machine's: 4 workers hold half a CPU each
MARK = "RESULT "
LONG_TAIL_USERS = 20_000


def matrices(dataset: str, items: int):
    """(training matrix, evaluation input, evaluation target) of ``dataset``."""
    if dataset == "gowalla":
        from eval_speed import eval_matrices

        return eval_matrices("gowalla")
    from sync_bytes import long_tail

    from recoder_dist.datasets.splits import weak_generalization_split

    split = weak_generalization_split(
        long_tail(users=LONG_TAIL_USERS, items=items, per_user=30), target_fraction=0.2, seed=0
    )
    return split.train.interactions, split.test.interactions, split.test.target


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["VmHWM"].split()[0]) / 1024.0


def one_run(side: str, epochs: int, dataset: str, items: int, eval_batch: int) -> dict:
    """A training run of ``side`` in this process; its last record's memory and metrics."""
    from train_speed import MODEL, TRAIN

    import recoder_dist
    from recoder_dist import nn
    from recoder_dist.data.dataset import RecommendationDataset
    from recoder_dist.metrics import NDCG, Recall
    from recoder_dist.model import Recoder

    train, inputs, targets = matrices(dataset, items)
    workers = SIDES[side][0]
    trainer = Recoder(
        nn.DynamicAutoencoder(**MODEL, sparse=True),
        optimizer_type="adam",
        loss="logloss",
        num_workers=workers,
        cpus_per_worker=min(1, MACHINE_CPUS / workers),
        seed=0,
        tables=SIDES[side][1],
    )
    started = time.perf_counter()
    history = trainer.train(
        RecommendationDataset(train),
        val_dataset=RecommendationDataset(inputs, targets),
        metrics=[Recall(k=20), NDCG(k=100)],
        eval_freq=1,
        eval_num_users=None if dataset == "gowalla" else 2_000,
        checkpoint_freq=1,
        eval_batch_size=eval_batch,
        num_epochs=epochs,
        negative_sampling=True,
        **TRAIN,
    )
    last = history[-1]
    return dict(
        tree=str(Path(recoder_dist.__file__).parent.parent),
        driver_peak_rss_mb=_peak_rss_mb(),
        peak_rss_mb=last["peak_rss_mb"],
        private_rss_mb=last["private_rss_mb"],
        recall=last["Recall@20"],
        ndcg=last["NDCG@100"],
        eval_users=last["eval_users"],
        loss=last["loss"],
        seconds=time.perf_counter() - started,
    )


def run_in_tree(tree: str, side: str, epochs: int, dataset: str, items: int, eval_batch) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
    env.pop("RAY_ADDRESS", None)  # a local Ray of the run's own
    command = [sys.executable, os.path.abspath(__file__), "--one", side, "--epochs", str(epochs)]
    command += ["--dataset", dataset, "--items", str(items), "--eval-batch", str(eval_batch)]
    # Run from the tree: Ray puts the driver's working directory first on its workers'
    # sys.path, before PYTHONPATH (from this repository, they would import its recoder_dist).
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise RuntimeError(f"{tree} {side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", default=["this=."], help="name=path ...")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dataset", choices=["gowalla", "long-tail"], default="gowalla")
    parser.add_argument("--items", type=int, default=300_000, help="of the long-tail catalog")
    parser.add_argument("--eval-batch", type=int, default=500, help="users a step of evaluation")
    parser.add_argument("--one", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            MARK
            + json.dumps(one_run(args.one, args.epochs, args.dataset, args.items, args.eval_batch)),
            flush=True,
        )
        return

    trees = dict(tree.split("=", 1) for tree in args.trees)
    results = {}
    started = time.perf_counter()
    for round_ in range(args.rounds):
        for side in args.sides:
            for name, path in trees.items():
                result = run_in_tree(
                    path, side, args.epochs, args.dataset, args.items, args.eval_batch
                )
                print(f"round {round_ + 1} {name} {side}: {json.dumps(result)}", flush=True)
                results.setdefault((name, side), []).append(result)

    print(f"\nmachine load at the end: {load_average()}")
    if args.dataset == "long-tail":
        print(f"long-tail catalog: {LONG_TAIL_USERS:,} users x {args.items:,} items")
    print(f"{args.rounds} round(s), {args.epochs} epochs a run; MB, median over the rounds [range]")
    header = ["tree", "run", "peak RSS, MB", "private RSS, MB", "driver peak, MB"]
    header += ["Recall@20", "NDCG@100"]
    rows = []
    for (name, side), runs in results.items():
        cells = []
        for key in ("peak_rss_mb", "private_rss_mb", "driver_peak_rss_mb"):
            values = [run.get(key, float("nan")) for run in runs]  # trees before: no driver
            cells.append(f"{median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]")
        metrics = [f"{runs[-1][key]:.5f}" for key in ("recall", "ndcg")]
        rows.append([name, SIDES[side][2], *cells, *metrics])
    print(markdown_table(header, rows))
    print(f"\nwall time of the benchmark: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
