"""A Ray Tune sweep over batch size and learning rate (and, if asked, the model's main knobs).

Each trial is a distributed TorchTrainer run (through ``Recoder``) whose evaluations of the
validation users reach Tune through ``TuneReportCallback``; ASHA stops the weak trials early.
The best trial, by Tune's own result, has its final checkpoint exported as a snapshot file
(``best.model``, loadable with ``Recoder.init_from_model_file``), and the results are written
as CSV and printed.

Everything lives under ``--storage``, a folder or a URI (on a multi-node cluster: storage that
every node reaches, e.g. ``s3://bucket/sweeps/ml-1m``): Tune's experiment state in ``tune/``,
each trial's Ray Train run in ``runs/trial-<id>/`` (where an interrupted trial resumes from its
last checkpoint), ``results.csv`` and ``best.model``. Trial drivers ask for the custom resource
``trial_driver`` when the cluster has it (``cluster.yaml``'s head advertises it), so that they
run on the head, not on GPU nodes that may be pre-empted.

    python tune/sweep.py --data data/ml-1m --storage sweeps/ml-1m --epochs 50 --workers 2
    python tune/sweep.py --data data/ml-1m --storage sweeps/ml-1m --resume   # after a crash
    ray job submit --working-dir . -- python tune/sweep.py --data ... --storage s3://...
"""

from __future__ import annotations

import argparse
import io
import json

import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from recoder_dist import storage
from recoder_dist.datasets import open_prepared
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.launcher import ensure_ray
from recoder_dist.training.snapshot import copy_snapshot
from recoder_dist.training.worker_loop import SNAPSHOT_FILE

METRICS = (Recall(k=20), Recall(k=50), NDCG(k=100))
DRIVER_RESOURCE = "trial_driver"  # advertised by cluster.yaml's head
# The settings a trial's configuration chooses, as results.csv and the summary give them.
CHOSEN = (
    "lr",
    "batch_size",
    "hidden_layers",
    "is_constrained",
    "noise_prob",
    "dropout_prob",
    "sparse",
    "weight_decay",
    "milestones",
    "negative_sampling",
)


def run_trial(config: dict) -> None:
    """One trial: a Tune function trainable that drives one distributed training run."""
    split = open_prepared(config["data"])  # the rows are read by the cluster
    model = DynamicAutoencoder(
        hidden_layers=config["hidden_layers"],
        activation_type="tanh",
        is_constrained=config["is_constrained"],
        noise_prob=config["noise_prob"],
        dropout_prob=config["dropout_prob"],
        sparse=config["sparse"],
    )
    # The trial's Ray Train run has a name of its own in the sweep's storage: when Tune restarts
    # an interrupted trial, this run resumes from its last checkpoint.
    recoder = Recoder(
        model,
        optimizer_type="adam",
        loss="logloss",
        num_workers=config["workers"],
        cpus_per_worker=config["cpus_per_worker"],
        seed=config["seed"],
        storage_path=storage.join(config["storage"], "runs"),
        run_name=f"trial-{tune.get_context().get_trial_id()}",
        callbacks=[TuneReportCallback()],
    )
    # The workers' reports reach Tune (ASHA may stop the trial at any of them), each
    # checkpoint's location with them.
    recoder.train(
        train_dataset=split.train,
        val_dataset=split.validation,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        batch_size=config["batch_size"],
        num_epochs=config["epochs"],
        lr_milestones=milestones(config["milestones"], config["epochs"]),
        negative_sampling=config["negative_sampling"],
        eval_freq=config["eval_freq"],
        metrics=list(METRICS),
        eval_num_recommendations=100,
        checkpoint_freq=config["eval_freq"],
    )


def milestones(fractions, epochs: int) -> list[int] | None:
    """``lr_milestones`` at these fractions of the epochs (0.4.0's script: 0.6 and 0.8)."""
    return sorted({max(1, round(f * epochs)) for f in fractions}) if fractions else None


# What --tune-model draws from, on top of the grid of learning rates and batch sizes.
MODEL_SPACE = {
    "hidden_layers": [[200], [600], [600, 200]],
    "is_constrained": [False, True],
    "noise_prob": [0.2, 0.5],
    "dropout_prob": [0.0, 0.5],
    "weight_decay": [0.0, 2e-5, 1e-4],
    "milestones": [None, (0.6, 0.8)],
    # Reconstructing only the group's items (0.4.0's way) or every item: on ml-1m's 3.7k items
    # scoring every item is cheap and was the better of the two in benchmarks/quality.py.
    "negative_sampling": [True, False],
}


def search_space(args) -> dict:
    space = {
        "data": storage.normalized(args.data),
        "storage": storage.normalized(args.storage),
        "lr": tune.grid_search(args.lrs),
        "batch_size": tune.grid_search(args.batch_sizes),
        "hidden_layers": args.hidden,
        "is_constrained": args.constrained,
        "noise_prob": args.noise,
        "dropout_prob": tune.grid_search(args.dropout),
        "sparse": args.sparse,
        "weight_decay": args.weight_decay,
        "milestones": tuple(args.milestones) if args.milestones else None,
        "negative_sampling": args.negative_sampling,
        "epochs": args.epochs,
        "eval_freq": args.eval_freq,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "seed": args.seed,
    }
    if args.tune_model:
        space.update({name: tune.choice(values) for name, values in MODEL_SPACE.items()})
    return space


def driver_resources(args) -> dict:
    """What a trial's driver asks for (its workers ask their own): the head's trial_driver
    resource when the cluster has it, else a tenth of a CPU (anywhere)."""
    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        return {"CPU": 0, DRIVER_RESOURCE: 1}
    return {"CPU": 0.1}


def sweep(args) -> tune.ResultGrid:
    ensure_ray()
    root = storage.normalized(args.storage)
    trainable = tune.with_resources(run_trial, driver_resources(args))
    state = storage.join(root, "tune")
    if args.resume and tune.Tuner.can_restore(state):
        tuner = tune.Tuner.restore(state, trainable, resume_errored=True)
    else:
        grace_period = args.grace_period or max(args.eval_freq, 1)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=args.epochs, grace_period=grace_period)
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
            run_config=tune.RunConfig(
                name="tune",
                storage_path=root,
                # An interrupted trial (a lost node, a killed driver) starts again, and its Ray
                # Train run resumes from its last checkpoint.
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
            ),
        )
    return tuner.fit()


def export(results: tune.ResultGrid, root: str, metric: str) -> dict:
    """Writes results.csv and best.model (the final snapshot of Tune's best trial) to
    ``root``."""
    frame = results.get_dataframe()
    if metric not in frame.columns:
        errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
        raise RuntimeError(f"no trial reported {metric}; trial errors: {errors}")
    keep = [
        c
        for c in frame.columns
        if c in ("trial_id", "epoch", "snapshot", metric)
        or c.startswith("config/")
        and c.split("/", 1)[1] in CHOSEN
        or c in (m.name for m in METRICS)
    ]
    table = io.StringIO()
    frame[keep].sort_values(metric, ascending=False).to_csv(table, index=False)
    storage.write_atomically(
        storage.join(root, "results.csv"), lambda f: f.write(table.getvalue().encode())
    )
    best = results.get_best_result(metric=metric, mode="max", scope="last", filter_nan_and_inf=True)
    if best is None or best.error is not None or CHECKPOINT_PATH_KEY not in best.metrics:
        raise RuntimeError("no trial finished with a checkpoint: nothing to export")
    checkpoint = storage.with_path(root, best.metrics[CHECKPOINT_PATH_KEY])
    snapshot = copy_snapshot(
        storage.join(checkpoint, SNAPSHOT_FILE), storage.join(root, "best.model")
    )
    summary = {
        "best": {k: best.config[k] for k in CHOSEN},
        metric: best.metrics[metric],
        "snapshot": snapshot,
        "trials": len(frame),
        # What the sweep cost: the trials' training time, summed.
        "trial_hours": round(float(frame["time_total_s"].sum()) / 3600, 3),
    }
    print(frame[keep].sort_values(metric, ascending=False).to_string(index=False))
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder written by recoder-dist prepare")
    parser.add_argument(
        "--storage",
        "--output",
        required=True,
        help="the sweep's folder or URI (s3://...), reachable from every node",
    )
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--hidden", type=int, nargs="+", default=[200])
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--constrained", action="store_true", help="tied decoder weights")
    parser.add_argument(
        "--dropout",
        type=float,
        nargs="+",
        default=[0.0],
        help="dropout on the code (the innermost layer); several values are a grid axis",
    )
    parser.add_argument(
        "--sparse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sparse embedding layers (else dense: weight decay then applies to them)",
    )
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--negative-sampling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reconstruct only the items of each sampling group (else every item)",
    )
    parser.add_argument(
        "--milestones",
        type=float,
        nargs="*",
        help="lr_milestones as fractions of --epochs (e.g. 0.6 0.8); none by default",
    )
    parser.add_argument(
        "--tune-model",
        action="store_true",
        help="also draw layers, tied weights, noise, weight decay, milestones and negative "
        "sampling (--num-samples draws per grid point)",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-freq", type=int, default=5)
    parser.add_argument(
        "--grace-period",
        type=int,
        help="epochs before ASHA may stop a trial (default --eval-freq; --epochs: never)",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the grid")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray Train workers per trial (at least 1)",
    )
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--metric", default="NDCG@100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument(
        "--max-failures", type=int, default=1, help="restarts of an interrupted trial"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        # Ray Train's in-process mode cannot report from inside a Tune trial (Ray raises a
        # DeprecationWarning at ray.train.get_context()).
        parser.error("--workers must be at least 1: a trial trains on Ray Train workers")
    results = sweep(args)
    return export(results, storage.normalized(args.storage), args.metric)


if __name__ == "__main__":
    main()
    ray.shutdown()
