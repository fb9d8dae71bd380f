"""A Ray Tune sweep over batch size and learning rate (and, if asked, the model's main knobs)
of any registered model (``--model``: ``recoder_dist.nn.registry``).

Each trial is a distributed TorchTrainer run (through ``Recoder``) whose evaluations of the
validation users reach Tune through ``TuneReportCallback``, or with ``--workers 0`` a training
run in the trial's own process, which reports to Tune itself (``training.worker.session``; no Train
controller or worker to start, and the next trial reuses the process); ASHA stops the weak
trials early.
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
    python tune/sweep.py --model vae --tune-model --num-samples 4 --data ... --storage ...
    python tune/sweep.py --data data/ml-1m --storage sweeps/ml-1m --resume   # after a crash
    ray job submit --working-dir . -- python tune/sweep.py --data ... --storage s3://...
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import threading
import time

import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from recoder_dist import storage
from recoder_dist.cli import MODEL_FLAGS, ModelParams, parse_model_param
from recoder_dist.datasets import open_prepared
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder, TrainingRows, read_training_rows
from recoder_dist.nn import registry
from recoder_dist.training.checkpoint import export_snapshot
from recoder_dist.training.driver import release
from recoder_dist.training.driver.launcher import ensure_ray, gpus_for, run_storage
from recoder_dist.training.resources import default_workers
from recoder_dist.training.worker.optimizers import OPTIMIZERS

logger = logging.getLogger(__name__)

METRICS = (Recall(k=20), Recall(k=50), NDCG(k=100))
DRIVER_RESOURCE = "trial_driver"  # advertised by cluster.yaml's head
# The training settings a trial's configuration chooses; with the model's own settings (its
# constructor's arguments), what results.csv and the summary give.
TRAINING = (
    "optimizer",
    "lr",
    "batch_size",
    "weight_decay",
    "milestones",
    "negative_sampling",
    "use_cuda",
)


def chosen(model: str) -> tuple[str, ...]:
    """The settings of a trial of ``model`` that results.csv and the summary give."""
    return (*TRAINING, *registry.parameters(registry.model_class(model)))


def run_trial(config: dict, train_rows: TrainingRows | None = None) -> None:
    """One trial: a Tune function trainable that drives one distributed training run, on
    ``train_rows`` (the sweep's driver read them once for every trial) or, without them, on the
    training files (read again by this trial)."""
    split = open_prepared(config["data"])  # the rows are read by the cluster
    model = registry.build(config["model"], config)  # the settings that are the model's
    # The trial's Ray Train run has a name of its own in the sweep's storage: when Tune restarts
    # an interrupted trial, this run resumes from its last checkpoint.
    recoder = Recoder(
        model,
        optimizer_type=config.get("optimizer", "adam"),  # absent from a sweep saved before it
        loss=config["loss"],
        use_cuda=config.get("use_cuda", False),  # absent from a sweep saved before --gpus
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
        train_dataset=split.train if train_rows is None else train_rows,
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


# What --tune-model draws from for every model, on top of the grid of learning rates and batch
# sizes and of the model's own ``tune_space``.
TRAINING_SPACE = {
    "weight_decay": [0.0, 2e-5, 1e-4],
    "milestones": [None, (0.6, 0.8)],
    # Reconstructing only the group's items (0.4.0's way) or every item: on ml-1m's 3.7k items
    # scoring every item is cheap and was the better of the two in benchmarks/quality.py.
    "negative_sampling": [True, False],
}


def search_space(args) -> dict:
    """The trials' configurations: the grid of ``--lrs`` x ``--batch-sizes`` (x ``--dropout``),
    the model's settings from the model flags and ``--model-param``, and with ``--tune-model``
    draws from ``TRAINING_SPACE`` and the model's ``tune_space``."""
    model = {param: getattr(args, flag) for flag, param in MODEL_FLAGS.items()}
    model.update(args.model_param or {})
    space = {
        "data": storage.normalized(args.data),
        "storage": storage.normalized(args.storage),
        "model": args.model,
        "loss": args.loss,
        **model,
        "lr": tune.grid_search(args.lrs),
        "batch_size": tune.grid_search(args.batch_sizes),
        "dropout_prob": tune.grid_search(args.dropout),
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "milestones": tuple(args.milestones) if args.milestones else None,
        "negative_sampling": args.negative_sampling,
        "epochs": args.epochs,
        "eval_freq": args.eval_freq,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "use_cuda": args.gpus,
        "seed": args.seed,
    }
    if args.tune_model:
        drawn = {**TRAINING_SPACE, **registry.model_class(args.model).tune_space}
        space.update({name: tune.choice(values) for name, values in drawn.items()})
    for name, values in args.grid or []:
        space[name] = tune.grid_search(values)
    return space


def grid_axis(value: str) -> tuple[str, list]:
    """``NAME=[V1, V2, ...]`` (a JSON list): a grid axis over a setting."""
    name, values = parse_model_param(value)
    if not isinstance(values, list) or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=[V1, V2, ...], got {value!r}")
    return name, values


def driver_resources(args) -> dict:
    """What a trial's process asks for. One that trains itself (``--workers 0``): the CPUs of a
    worker, and with ``--gpus`` its GPU. One that drives Ray Train workers (they ask their
    own): the head's trial_driver resource when the cluster has it, else a tenth of a CPU
    (anywhere)."""
    if args.workers == 0:
        # A GPU where the cluster has them (or may add them: RAY_ADDRESS), as Recoder's workers
        # ask; on a local Ray without any, the trial trains on CPU (gpus_for warns).
        gpu = {"GPU": 1} if args.gpus and gpus_for(True) else {}
        return {"CPU": args.cpus_per_worker, **gpu}
    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        return {"CPU": 0, DRIVER_RESOURCE: 1}
    return {"CPU": 0.1}


class ReleaseStoppedRuns(tune.Callback):
    """Frees the resources of the Ray Train runs of the trials that Tune stopped.

    Tune stops a trial (ASHA at a rung, or at ``max_t``) by ending its actor, which kills the
    trial's Ray Train controller before it can remove its workers' placement group; only Ray
    Train's ``PlacementGroupCleaner`` would then free those CPUs, and it cannot where two Ray
    instances run on one machine (``recoder_dist.training.driver.release``). So for
    ``watch_s`` after each trial ends, every ``every_s``, and at the end of the sweep, this
    driver removes the groups whose workers are all dead, itself: in a thread of its own, since
    the state API can take a second to answer on a busy machine and Tune's loop should not wait
    for it.
    """

    def __init__(self, watch_s: float = 120.0, every_s: float = 1.0, final_wait_s: float = 60.0):
        self._watch_s, self._every_s, self._final_wait_s = watch_s, every_s, final_wait_s
        self._watch_until = 0.0  # a stopped trial's workers die a moment after the trial ends
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self):  # Tune saves its callbacks with the experiment: no thread there
        return {"watch_s": self._watch_s, "every_s": self._every_s, "final": self._final_wait_s}

    def __setstate__(self, state):
        self.__init__(state["watch_s"], state["every_s"], state["final"])

    def setup(self, **info):
        self._thread = threading.Thread(target=self._watch, name="release-stopped-runs")
        self._thread.daemon = True
        self._thread.start()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._trial_ended()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._trial_ended()

    def on_experiment_end(self, trials, **info):
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = release.release_until_none_held(self._final_wait_s)
        except Exception as e:  # a sweep's results matter more than this check
            logger.warning("could not check that the trials' runs freed their resources: %s", e)
            return
        if held:
            logger.warning("Ray Train runs still hold placement groups: %s", sorted(held))

    def _trial_ended(self) -> None:
        self._watch_until = time.monotonic() + self._watch_s
        self._wake.set()

    def _watch(self) -> None:
        while not self._done.is_set():
            self._wake.wait()
            self._wake.clear()
            while not self._done.is_set() and time.monotonic() < self._watch_until:
                try:
                    release.release_abandoned_train_groups()
                except Exception as e:  # the state API busy or down: try again
                    logger.warning("could not release the resources of stopped runs: %s", e)
                self._done.wait(self._every_s)


def sweep(args) -> tune.ResultGrid:
    ensure_ray()
    if args.workers is None:
        args.workers = default_workers()
    root = storage.normalized(args.storage)
    # The training rows are read once, here, and every trial trains from the same blocks.
    rows = read_training_rows(open_prepared(args.data).train)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, train_rows=rows), driver_resources(args)
    )
    # Tune's experiment state, and the checkpoints of trials that train in their process, are
    # written through a filesystem that retries through a storage outage (as the trials' runs).
    state = run_storage(storage.join(root, "tune"))  # the path, and a URI's filesystem
    path = state.pop("storage_path")
    if args.resume and tune.Tuner.can_restore(path, **state):
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True, **state)
    else:
        grace_period = args.grace_period or min(max(args.eval_freq, 1), args.epochs)
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
                # A trial that trains in its process leaves it to the next one, imports done.
                reuse_actors=args.workers == 0,
            ),
            run_config=tune.RunConfig(
                name="tune",
                **run_storage(root),
                # An interrupted trial (a lost node, a killed driver) starts again, and its Ray
                # Train run resumes from its last checkpoint.
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[ReleaseStoppedRuns()],
            ),
        )
    return tuner.fit()


def export(results: tune.ResultGrid, root: str, metric: str) -> dict:
    """Writes results.csv and best.model (the final snapshot of Tune's best trial) to
    ``root``."""
    frame = results.get_dataframe()
    model = frame["config/model"].iloc[0] if "config/model" in frame.columns else "autoencoder"
    settings = chosen(model)
    if metric not in frame.columns:
        errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
        raise RuntimeError(f"no trial reported {metric}; trial errors: {errors}")
    keep = [
        c
        for c in frame.columns
        if c in ("trial_id", "epoch", "snapshot", metric)
        or c.startswith("config/")
        and c.split("/", 1)[1] in settings
        or c in (m.name for m in METRICS)
    ]
    table = io.StringIO()
    frame[keep].sort_values(metric, ascending=False).to_csv(table, index=False)
    storage.write_atomically(
        storage.join(root, "results.csv"), lambda f: f.write(table.getvalue().encode())
    )
    best = results.get_best_result(metric=metric, mode="max", scope="last", filter_nan_and_inf=True)
    # A trial's last checkpoint: in its Ray Train run's storage (its path among the metrics),
    # or for a trial that trained in its process, Tune's own (in the trial's folder).
    if best is None or best.error is not None:
        raise RuntimeError("no trial finished: nothing to export")
    if best.checkpoint is not None:
        checkpoint = storage.with_path(root, best.checkpoint.path)
    elif CHECKPOINT_PATH_KEY in best.metrics:
        checkpoint = storage.with_path(root, best.metrics[CHECKPOINT_PATH_KEY])
    else:
        raise RuntimeError("no trial finished with a checkpoint: nothing to export")
    snapshot = export_snapshot(checkpoint, storage.join(root, "best.model"))
    summary = {
        "model": model,
        "best": {k: best.config[k] for k in settings if k in best.config},
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
    args = parse_args(argv)
    results = sweep(args)
    return export(results, storage.normalized(args.storage), args.metric)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder written by recoder-dist prepare")
    parser.add_argument(
        "--storage",
        "--output",
        required=True,
        help="the sweep's folder or URI (s3://...), reachable from every node",
    )
    parser.add_argument(
        "--model",
        default="autoencoder",
        choices=registry.names(),
        help="the registered model that the trials train",
    )
    parser.add_argument("--loss", default="logloss")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--hidden", type=int, nargs="+", default=[200])
    parser.add_argument("--embedding-size", type=int, default=200)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--constrained", action="store_true", help="tied decoder weights")
    parser.add_argument(
        "--model-param",
        type=parse_model_param,
        action=ModelParams,
        metavar="NAME=VALUE",
        help="a constructor argument of the model that no flag sets (e.g. anneal_cap=0.2)",
    )
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
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=sorted(OPTIMIZERS),
        help="the dense weights' optimizer (adamw: weight decay apart from the gradient)",
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
        "--grid",
        type=grid_axis,
        action="append",
        metavar="NAME=[V1,...]",
        help="a grid axis over a model or training setting, e.g. anneal_cap=[0.1,0.2]; repeat "
        "for more (the grid is their product with --lrs and --batch-sizes)",
    )
    parser.add_argument(
        "--tune-model",
        action="store_true",
        help="also draw weight decay, milestones, negative sampling and the model's own "
        "settings (its tune_space; --num-samples draws per grid point)",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-freq", type=int, default=5)
    parser.add_argument(
        "--grace-period",
        type=int,
        help="epochs before ASHA may stop a trial (default --eval-freq, at most --epochs; "
        "--epochs: never)",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="repeats of the grid")
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument(
        "--workers",
        type=int,
        help="Ray Train workers per trial; 0 trains in the trial's own process (no worker "
        "group to start, and the next trial reuses the process). Default: 0 where Ray runs "
        "on this machine alone, 1 on a cluster (as Recoder's num_workers=None)",
    )
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument(
        "--gpus",
        action="store_true",
        help="a GPU for each of a trial's workers (or its process, with --workers 0), where the "
        "cluster has them (use_cuda=True)",
    )
    parser.add_argument("--metric", default="NDCG@100")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    parser.add_argument(
        "--max-failures", type=int, default=1, help="restarts of an interrupted trial"
    )
    args = parser.parse_args(argv)
    if args.grace_period is not None and not 1 <= args.grace_period <= args.epochs:
        parser.error(f"--grace-period must be between 1 and --epochs ({args.epochs})")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be 0 (in the trial's process) or more")
    return args


if __name__ == "__main__":
    main()
    ray.shutdown()
