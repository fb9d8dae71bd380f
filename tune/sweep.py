"""A Ray Tune sweep over batch size and learning rate (and, if asked, the model's main knobs).

Each trial is a distributed TorchTrainer run (through ``Recoder``) whose evaluations of the
validation users reach Tune through ``TuneReportCallback``; ASHA stops the weak trials early.
The best trial's final snapshot is exported as a normal snapshot file, loadable with
``Recoder.init_from_model_file``, and the results are written as CSV and printed.

Everything lives under ``--output`` (on a multi-node cluster: storage that every node reaches):
Tune's experiment state in ``tune/``, each trial's snapshots in ``snapshots/<trial id>/``.

    python tune/sweep.py --data data/ml-1m --output sweeps/ml-1m --epochs 50 --workers 2
    python tune/sweep.py --data data/ml-1m --output sweeps/ml-1m --resume   # after a crash
    ray job submit --working-dir . -- python tune/sweep.py --data ... --output ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from recoder_dist.datasets import load_prepared
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.launcher import ensure_ray

METRICS = (Recall(k=20), Recall(k=50), NDCG(k=100))


def run_trial(config: dict) -> None:
    """One trial: a Tune function trainable that drives one distributed training run."""
    split = load_prepared(config["data"]).split
    model = DynamicAutoencoder(
        hidden_layers=config["hidden_layers"],
        activation_type="tanh",
        noise_prob=config["noise_prob"],
        sparse=True,
    )
    recoder = Recoder(
        model,
        optimizer_type="adam",
        loss="logloss",
        num_workers=config["workers"],
        cpus_per_worker=config["cpus_per_worker"],
        seed=config["seed"],
        callbacks=[TuneReportCallback()],
    )
    # The workers' reports reach Tune (ASHA may stop the trial at any of them); the last
    # epoch's report also names the snapshot file written under this prefix.
    recoder.train(
        train_dataset=split.train,
        val_dataset=split.validation,
        lr=config["lr"],
        batch_size=config["batch_size"],
        num_epochs=config["epochs"],
        negative_sampling=True,
        eval_freq=config["eval_freq"],
        metrics=list(METRICS),
        eval_num_recommendations=100,
        # Not in the trial dir: that is a staging folder in the driver node's Ray session, which
        # Tune copies whole to --output at every experiment checkpoint. Under --output,
        # snapshots outlive the cluster, are reachable from any node and are written once.
        model_checkpoint_prefix=os.path.join(
            config["snapshots"], tune.get_context().get_trial_id(), "model"
        ),
    )


def search_space(args) -> dict:
    space = {
        "data": str(Path(args.data).resolve()),
        "snapshots": str(Path(args.output).resolve() / "snapshots"),
        "lr": tune.grid_search(args.lrs),
        "batch_size": tune.grid_search(args.batch_sizes),
        "hidden_layers": args.hidden,
        "noise_prob": args.noise,
        "epochs": args.epochs,
        "eval_freq": args.eval_freq,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "seed": args.seed,
    }
    if args.tune_model:
        space["hidden_layers"] = tune.choice([[100], [200], [600, 200]])
        space["noise_prob"] = tune.choice([0.2, 0.5])
    return space


def sweep(args) -> tune.ResultGrid:
    ensure_ray()
    output = Path(args.output).resolve()
    trainable = tune.with_resources(run_trial, {"CPU": 0.1})  # the driver; workers ask their own
    if args.resume and tune.Tuner.can_restore(str(output / "tune")):
        tuner = tune.Tuner.restore(str(output / "tune"), trainable, resume_errored=True)
    else:
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=args.epochs, grace_period=max(args.eval_freq, 1)
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(args),
            tune_config=tune.TuneConfig(
                metric=args.metric,
                mode="max",
                scheduler=scheduler,
                num_samples=args.num_samples,
                max_concurrent_trials=args.concurrent,
            ),
            run_config=tune.RunConfig(name="tune", storage_path=str(output)),
        )
    return tuner.fit()


def export(results: tune.ResultGrid, output: Path, metric: str) -> dict:
    """Writes results.csv and best.model (the best completed trial's snapshot)."""
    frame = results.get_dataframe()
    keep = [
        c
        for c in frame.columns
        if c in ("trial_id", "epoch", "snapshot", metric)
        or c.startswith("config/")
        and c.split("/", 1)[1] in ("lr", "batch_size", "hidden_layers", "noise_prob")
        or c in (m.name for m in METRICS)
    ]
    frame[keep].sort_values(metric, ascending=False).to_csv(output / "results.csv", index=False)
    finished = [r for r in results if r.error is None and "snapshot" in (r.metrics or {})]
    if not finished:
        raise RuntimeError("no trial finished: nothing to export")
    best = max(finished, key=lambda r: r.metrics[metric])
    shutil.copyfile(best.metrics["snapshot"], output / "best.model")
    summary = {
        "best": {k: best.config[k] for k in ("lr", "batch_size", "hidden_layers", "noise_prob")},
        metric: best.metrics[metric],
        "snapshot": str(output / "best.model"),
        "trials": len(frame),
    }
    print(frame[keep].sort_values(metric, ascending=False).to_string(index=False))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder written by recoder-dist prepare")
    parser.add_argument("--output", required=True)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--hidden", type=int, nargs="+", default=[200])
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--tune-model", action="store_true", help="also sweep layers and noise")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-freq", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the grid")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per trial")
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--metric", default="NDCG@100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = sweep(args)
    return export(results, output.resolve(), args.metric)


if __name__ == "__main__":
    main()
    ray.shutdown()
