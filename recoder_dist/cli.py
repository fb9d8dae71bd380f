"""``recoder-dist`` (also ``python -m recoder_dist``): prepare, train, evaluate, recommend,
similar-items, demo.

Every command connects to ``RAY_ADDRESS`` when it is set (as under ``ray job submit``) and
otherwise starts a local embedded Ray. A user mistake (a bad flag, a missing file, a value
out of range) prints one line and exits 2; a storage outage past the retry bound
(``recoder_dist.retry``) prints one line and exits 1 (resubmitted, a run resumes); any other
failure exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

logger = logging.getLogger("recoder_dist")

# The command line's model flags -> the models' constructor arguments; a model takes those its
# constructor has (``recoder_dist.nn.registry.build``), and any other through --model-param.
MODEL_FLAGS = {
    "hidden": "hidden_layers",
    "embedding_size": "embedding_size",
    "activation": "activation_type",
    "noise": "noise_prob",
    "dropout": "dropout_prob",
    "constrained": "is_constrained",
    "sparse": "sparse",
}
_DEFAULT_HELD_OUT = 100  # validation and test users of a strong split
DATASETS = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "ml-latest", "events")


class UsageError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the usage block), still exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _prepare(args) -> int:
    from recoder_dist import storage
    from recoder_dist.datasets import StrongSplitConfig, WeakSplitConfig, prepare
    from recoder_dist.datasets.cluster_prepare import prepare_on_cluster
    from recoder_dist.datasets.movielens import load_movielens

    output = Path(args.output)
    if not storage.is_uri(args.output) and output.exists() and not output.is_dir():
        raise UsageError(f"--output {args.output} is a file, not a folder")  # before the work
    # A flag of the other kind of split or dataset would be ignored: said instead.
    if args.dataset == "events" and args.data_dir:
        raise UsageError("--data-dir is for the MovieLens datasets; --dataset events reads --input")
    if args.dataset != "events" and args.input:
        raise UsageError(f"--input is for --dataset events; {args.dataset} is read from --data-dir")
    if args.split == "strong":
        if args.val_fraction:
            raise UsageError("--val-fraction is a --split weak setting")
        val_users = _DEFAULT_HELD_OUT if args.val_users is None else args.val_users
        test_users = _DEFAULT_HELD_OUT if args.test_users is None else args.test_users
        if test_users < 1:
            raise UsageError(
                f"--test-users must be >= 1 (train evaluates on them), got {test_users}"
            )
        split = StrongSplitConfig(val_users, test_users, seed=args.seed)
    else:
        if args.val_users is not None or args.test_users is not None:
            raise UsageError("--val-users and --test-users are --split strong settings")
        split = WeakSplitConfig(seed=args.seed, val_fraction=args.val_fraction or 0.0)
    if args.dataset == "events":
        if not args.input:
            raise UsageError("--dataset events needs --input (a file, folder, glob or URI)")
        files = prepare_on_cluster(
            args.input,
            args.output,
            split,
            user_col=args.user_col,
            item_col=args.item_col,
            value_col=args.value_col,
            positive_above=args.positive_above,
        )
        sizes = {key: files.meta[key] for key in ("train_users", "test_users")}
        sizes.update(users=files.meta["num_users"], items=files.meta["num_items"])
    else:
        events = load_movielens(args.dataset, args.data_dir)
        positive_above = 3.5 if args.positive_above is None else args.positive_above
        prepared = prepare(events, args.output, split, positive_above=positive_above)
        sizes = {
            "users": len(prepared.user_id_map),
            "items": len(prepared.item_id_map),
            "train_users": len(prepared.split.train),
            "test_users": len(prepared.split.test),
        }
    print(json.dumps({"output": str(args.output), **sizes}))
    return 0


def _path(value: str) -> str:
    """A path flag's value: an empty one (a quoted, unset shell variable) would name the
    current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return value


def _model(args):
    """The registered model ``--model``, with the model flags that it takes and every
    ``--model-param`` (which must all be its own)."""
    from recoder_dist.nn import registry

    settings = {param: getattr(args, flag) for flag, param in MODEL_FLAGS.items()}
    return registry.build(args.model, settings, strict=args.model_param or {})


def _model_name(value: str) -> str:
    from recoder_dist.nn import registry

    if value not in registry.names():
        raise argparse.ArgumentTypeError(
            f"unknown model {value!r}; choose one of {', '.join(registry.names())}"
        )
    return value


class ModelParams(argparse.Action):
    """``--model-param NAME=VALUE``, repeatable: the settings gathered in a dict (a preset's
    or a config file's dict is the default, which the flags update)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), name: value})


def parse_model_param(value: str) -> tuple[str, object]:
    """``NAME=VALUE``, the value read as JSON when it is (numbers, lists, true/false), else
    as a string."""
    name, sep, text = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    try:
        return name.strip().replace("-", "_"), json.loads(text)
    except json.JSONDecodeError:
        return name.strip().replace("-", "_"), text


def _metrics(ks: list[int]):
    from recoder_dist.metrics import NDCG, Recall

    if min(ks) < 1:
        raise UsageError(f"--metrics: each k must be >= 1, got {min(ks)}")
    return [*(Recall(k=k) for k in ks[:-1]), NDCG(k=ks[-1])]


def _train(args) -> int:
    from recoder_dist import storage
    from recoder_dist.datasets import open_prepared
    from recoder_dist.model import Recoder
    from recoder_dist.training.snapshot import epoch_file

    # The cluster reads the user rows; this process, split.json only.
    split = open_prepared(args.data)
    if split.test is None or split.test.num_rows == 0:  # said now, not after the epochs
        raise UsageError(f"the split at {args.data} has no test users, which train evaluates")
    checkpoint_dir = storage.normalized(args.checkpoint_dir)
    recoder = Recoder(
        _model(args),
        optimizer_type=args.optimizer,
        loss=args.loss,
        use_cuda=args.gpus,
        num_workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        backend=args.backend,
        tables=args.tables,
        shard_group_size=args.shard_group_size,
        seed=args.seed,
        max_failures=args.max_failures,
        storage_path=args.storage or storage.join(checkpoint_dir, "runs"),
        run_name=args.name or _run_name(checkpoint_dir),
    )
    metrics = _metrics(args.metrics)
    prefix = storage.join(checkpoint_dir, "model")
    validating = split.validation is not None and args.eval_freq > 0
    history = recoder.train(
        train_dataset=split.train,
        val_dataset=split.validation if validating else None,
        lr=args.lr,
        weight_decay=args.weight_decay,
        num_epochs=args.epochs,
        lr_milestones=args.lr_milestones,
        decay_sparse_lr=args.decay_sparse_lr,
        batch_size=args.batch_size,
        negative_sampling=args.negative_sampling,
        num_sampling_users=args.sampling_users,
        model_checkpoint_prefix=prefix,
        checkpoint_freq=args.checkpoint_freq,
        eval_freq=args.eval_freq if validating else 0,
        metrics=metrics if validating else None,
        eval_num_recommendations=max(args.metrics),
        precision=args.precision,
        profile=args.profile,
    )
    results = recoder.evaluate(split.test, max(args.metrics), metrics)
    output = {
        "checkpoint": epoch_file(prefix, recoder.current_epoch),
        "epoch": recoder.current_epoch,
        "test": results,
    }
    if args.profile:  # phase -> seconds of the last epoch, one value per rank
        output["profile"] = history[-1]["profile"]
    print(json.dumps(output))
    return 0


def _run_name(checkpoint_dir: str) -> str:
    """The same training command (the same checkpoint location) names the same run: submitted
    again after it stopped, it resumes from its last checkpoint."""
    return "train-" + hashlib.sha256(checkpoint_dir.encode()).hexdigest()[:12]


def _restored(
    checkpoint: str,
    workers: int,
    gpus: bool,
    storage_path: str | None,
    cpus: float | None = None,
    backend: str | None = None,
):
    from recoder_dist import storage
    from recoder_dist.model import Recoder
    from recoder_dist.nn import registry
    from recoder_dist.training.snapshot import load_snapshot

    name = load_snapshot(checkpoint).model_class
    try:
        model_class = registry.model_class(name)
    except ValueError as e:
        raise UsageError(f"{checkpoint} holds a {name}: {e}") from None
    if storage_path is None and workers != 0:  # where Ray Train keeps an evaluation's run
        storage_path = storage.join(storage.parent(checkpoint), "runs")
    recoder = Recoder(
        model_class(),
        num_workers=workers,
        use_cuda=gpus,
        storage_path=storage_path,
        cpus_per_worker=cpus,
        backend=backend,
    )
    recoder.init_from_model_file(checkpoint)
    return recoder


def _evaluate(args) -> int:
    from recoder_dist.datasets import open_prepared

    recoder = _restored(
        args.checkpoint, args.workers, args.gpus, args.storage, args.cpus_per_worker, args.backend
    )
    split = open_prepared(args.data)
    dataset = split.test if args.split == "test" else split.validation
    if dataset is None:
        raise UsageError(f"{args.data} has no validation part")
    print(json.dumps(recoder.evaluate(dataset, max(args.metrics), _metrics(args.metrics))))
    return 0


def _recommend(args) -> int:
    from recoder_dist.datasets import open_prepared
    from recoder_dist.inference import write_recommendations

    # The cluster reads the split's rows and id maps; this process, split.json only.
    prepared = open_prepared(args.data)
    recoder = _restored(args.checkpoint, 0, False, None)
    rows = write_recommendations(
        recoder,
        prepared,
        args.output,
        k=args.top_k,
        part=args.split,
        workers=max(args.workers or 1, 1),
        use_gpu=args.gpus,
    )
    print(json.dumps({"output": str(args.output), "users": rows}))
    return 0


def _similar_items(args) -> int:
    from recoder_dist.datasets import open_prepared
    from recoder_dist.inference import write_similar_items

    # The item ids are read by a task into the object store; this process, split.json only.
    prepared = open_prepared(args.data)
    recoder = _restored(args.checkpoint, 0, False, None)
    items = write_similar_items(
        recoder,
        prepared,
        args.output,
        k=args.top_k,
        workers=max(args.workers, 1),
        use_gpu=args.gpus,
    )
    print(json.dumps({"output": str(args.output), "items": items}))
    return 0


def _demo(args) -> int:
    from recoder_dist.demo import run_demo

    return run_demo(args)


def _add_common(parser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        help="Ray Train workers; 0: in this process (the default on one machine; 1 on a cluster)",
    )
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker")
    parser.add_argument(
        "--backend",
        help="the workers' process group backend (default: Ray chooses, NCCL for GPU workers, "
        "gloo otherwise); 'gloo' for GPU workers whose torch has no NCCL",
    )
    parser.add_argument(
        "--metrics",
        type=int,
        nargs="+",
        default=[20, 50, 100],
        help="Recall at each k but the last, NDCG at the last",
    )


def _add_worker_cpus(parser) -> None:
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs (and torch threads) of each Ray Train worker (default: the workers split "
        "the CPUs of the nodes that are up when the run starts)",
    )


def parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    return parsers()[0]


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line's parser, and each command's own by name (whose defaults ``--preset``
    and ``--config`` set)."""
    main = _Parser(prog="recoder-dist", description=__doc__.split("\n\n")[0].replace("\n", " "))
    main.add_argument("--config", help="YAML or JSON file of defaults for the command's flags")
    main.add_argument(
        "--verbose", action="store_true", help="also show Ray's own logs (always in its log files)"
    )
    commands = main.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="split a dataset into train/validation/test")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument(
        "--data-dir",
        type=_path,
        help="folder holding the ratings file (u.data, ratings.dat or ratings.csv) of an "
        "unzipped copy (default: download into the cache)",
    )
    p.add_argument(
        "--input",
        type=_path,
        help="--dataset events: the event table, read by the cluster: a CSV (with a header) or "
        "Parquet file, a folder of them, a glob, or a URI of these",
    )
    p.add_argument("--user-col", default="user", help="--dataset events: the users' ids")
    p.add_argument("--item-col", default="item", help="--dataset events: the items' ids")
    p.add_argument(
        "--value-col", help="--dataset events: the events' values (default: every event is 1)"
    )
    p.add_argument("--output", type=_path, required=True)
    p.add_argument("--split", choices=("strong", "weak"), default="strong")
    p.add_argument("--val-users", type=int, help=f"--split strong (default: {_DEFAULT_HELD_OUT})")
    p.add_argument(
        "--test-users",
        type=int,
        help=f"--split strong (default: {_DEFAULT_HELD_OUT}; train evaluates on them)",
    )
    p.add_argument("--val-fraction", type=float, help="--split weak (default: 0)")
    p.add_argument(
        "--positive-above",
        type=float,
        help="keep events whose value is above this (default: 3.5 for MovieLens ratings, "
        "every event of --dataset events)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_prepare)

    t = commands.add_parser("train", help="train a model on a prepared split")
    t.add_argument("--data", type=_path, required=True, help="folder written by prepare")
    t.add_argument(
        "--checkpoint-dir",
        type=_path,
        required=True,
        help="where snapshots go: a folder or a URI (s3://...)",
    )
    t.add_argument(
        "--storage",
        type=_path,
        help="Ray Train's run storage, reachable from every node (default: CHECKPOINT_DIR/runs)",
    )
    t.add_argument(
        "--name",
        help="run name; the same name resumes a stopped run (default: from --checkpoint-dir)",
    )
    t.add_argument(
        "--preset",
        help="named settings (recoder_dist.presets: recoder-0.4.0, gowalla, ...); flags win",
    )
    t.add_argument(
        "--model",
        type=_model_name,
        default="autoencoder",
        help="a registered model (recoder_dist.nn.registry), e.g. autoencoder or mf",
    )
    t.add_argument(
        "--model-param",
        type=parse_model_param,
        action=ModelParams,
        metavar="NAME=VALUE",
        help="a constructor argument of the model that no flag sets (e.g. anneal_cap=0.2); "
        "repeat for more",
    )
    t.add_argument("--hidden", type=int, nargs="+", default=[200])
    t.add_argument("--embedding-size", type=int, default=200)
    t.add_argument("--activation", default="tanh")
    t.add_argument("--noise", type=float, default=0.5)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--constrained", action="store_true", help="tie the decoder to the encoder")
    t.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument(
        "--tables",
        choices=["sharded", "replicated"],
        default="sharded",
        help="the autoencoder's item tables with several workers: each worker holds its rows "
        "(sharded), or every worker holds every row (replicated)",
    )
    t.add_argument(
        "--shard-group-size",
        type=int,
        default=None,
        help="shard the tables within groups of this many workers (a node's GPUs) and "
        "replicate them across the groups (default: one group of every worker)",
    )
    t.add_argument("--loss", default="logloss")
    t.add_argument("--optimizer", default="adam")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument(
        "--lr-milestones",
        type=int,
        nargs="+",
        help="epochs at which the dense learning rate is multiplied by 0.1",
    )
    t.add_argument(
        "--decay-sparse-lr",
        action="store_true",
        help="let --lr-milestones decay the sparse embeddings' learning rate too",
    )
    t.add_argument("--batch-size", type=int, default=500)
    t.add_argument("--sampling-users", type=int, default=0)
    t.add_argument("--negative-sampling", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--checkpoint-freq", type=int, default=0)
    t.add_argument("--eval-freq", type=int, default=0)
    t.add_argument("--max-failures", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: the model's forward under autocast to bfloat16",
    )
    t.add_argument(
        "--profile",
        action="store_true",
        help="time the phases of the steps on every rank; the last epoch's are printed",
    )
    _add_common(t)
    _add_worker_cpus(t)
    t.set_defaults(run=_train)

    e = commands.add_parser("evaluate", help="evaluate a checkpoint on a prepared split")
    e.add_argument("--checkpoint", type=_path, required=True)
    e.add_argument("--data", type=_path, required=True)
    e.add_argument("--split", choices=("test", "validation"), default="test")
    e.add_argument(
        "--storage",
        type=_path,
        help="Ray Train's run storage (default: runs/ beside the checkpoint)",
    )
    _add_common(e)
    _add_worker_cpus(e)
    e.set_defaults(run=_evaluate)

    r = commands.add_parser("recommend", help="top-K items of every user to Parquet")
    r.add_argument("--checkpoint", type=_path, required=True)
    r.add_argument("--data", type=_path, required=True)
    r.add_argument("--split", choices=("train", "test", "validation"), default="test")
    r.add_argument(
        "--output",
        type=_path,
        required=True,
        help="a folder or a URI; what it holds is replaced once the new files are all written",
    )
    r.add_argument("--top-k", type=int, default=100)
    _add_common(r)
    r.set_defaults(run=_recommend)

    s = commands.add_parser(
        "similar-items", help="every item's K nearest items by cosine, to Parquet"
    )
    s.add_argument("--checkpoint", type=_path, required=True)
    s.add_argument("--data", type=_path, required=True, help="the prepared split (its item ids)")
    s.add_argument(
        "--output",
        type=_path,
        required=True,
        help="a folder or a URI; what it holds is replaced once the new files are all written",
    )
    s.add_argument("--top-k", type=int, default=20)
    s.add_argument("--workers", type=int, default=1, help="Ray Data tasks that search at once")
    s.add_argument("--gpus", action="store_true", help="one GPU per task")
    s.set_defaults(run=_similar_items)

    d = commands.add_parser("demo", help="train and evaluate an autoencoder on MovieLens 100K")
    d.add_argument(
        "--data-dir",
        type=_path,
        help="folder with MovieLens 100K's u.data "
        "(default: $RECODER_DIST_ML100K, else download into the cache)",
    )
    d.add_argument("--num-workers", type=int, default=2)
    d.add_argument("--epochs", type=int, default=40)
    d.add_argument("--batch-size", type=int, default=100)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=_demo)
    return main, {
        "prepare": p,
        "train": t,
        "evaluate": e,
        "recommend": r,
        "similar-items": s,
        "demo": d,
    }


def _with_config(argv: list[str]) -> argparse.Namespace:
    """Flags on the command line win over the ``--config`` file, which wins over a ``--preset``,
    which wins over the defaults."""
    cli, commands = parsers()
    args = cli.parse_args(argv)
    sub = commands[args.command]
    if getattr(args, "preset", None):
        from recoder_dist.presets import preset

        sub.set_defaults(**preset(args.preset))
    if not args.config:
        return cli.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UsageError(
                f"--config {path}: not valid YAML: {' '.join(str(e).split())}"
            ) from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--config {path}: not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    known = vars(args)
    unknown = sorted(k for k in values if k.replace("-", "_") not in known)
    if unknown:
        raise UsageError(f"--config {path}: unknown settings {unknown} for '{args.command}'")
    sub.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return cli.parse_args(argv)


# A path that is a file where a folder goes (or the other way), or that the user may not
# write, is the user's to fix too.
_USER_ERRORS = (
    UsageError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FloatingPointError,
)


def _user_error(error: Exception) -> Exception | None:
    """The user's mistake behind ``error``, or None when it is not one: raised here, or by
    every worker of a Ray Train run that failed (a bad value met in the rows, a loss that
    diverged: the run's error then names the ranks, with each one's traceback)."""
    # A failed download is the user's to fix too (no network: pass --data-dir). Imported here,
    # not at the top, so that --help and argparse errors do not pay for importing pandas.
    from recoder_dist.datasets.download import DownloadError

    return _raised(error, (*_USER_ERRORS, DownloadError))


def _outage(error: Exception) -> Exception | None:
    """The storage outage behind ``error`` (``recoder_dist.retry``: the bucket did not answer
    for the whole retry bound), here, in every failed worker or in Ray Train's controller; or
    None. Not the user's mistake, but one line says it all: resubmitted, the run resumes."""
    from recoder_dist.retry import StorageUnavailableError

    return _raised(error, (StorageUnavailableError,))


def _raised(error: Exception, kinds: tuple) -> Exception | None:
    """``error`` if it is one of ``kinds``; else, for a failed Ray Train run, the first
    failed worker's error when every worker's is (``WorkerGroupError.worker_failures``), or
    the controller's (``ControllerError.controller_failure``)."""
    if isinstance(error, kinds):
        return error
    failures = getattr(error, "worker_failures", None)
    if failures and all(isinstance(e, kinds) for e in failures.values()):
        return failures[min(failures)]
    controller = getattr(error, "controller_failure", None)
    if controller is not None and controller is not error:
        return _raised(controller, kinds)
    return None


def _without_ray_notes(error: Exception) -> str:
    """``error``'s message without what Ray Data appends to a failed task's error (its
    attempts, and how to configure retries: none of the user's business for a mistake)."""
    return re.split(r"\nFailed to .* after \d+/\d+ attempts", str(error), maxsplit=1)[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = _with_config(sys.argv[1:] if argv is None else argv)
        if args.verbose:
            # Every epoch's line, and Ray's own logs: Ray is started (or joined) now, with its
            # workers' logs on this console; otherwise a command starts it quietly when needed.
            from recoder_dist.training.driver.launcher import ensure_ray

            logging.getLogger("recoder_dist").setLevel(logging.DEBUG)
            ensure_ray(verbose=True)
        return args.run(args)
    except Exception as e:
        mistake, outage = _user_error(e), _outage(e)
        if mistake is None and outage is None:
            raise  # the traceback (a failed run's includes each failed rank's)
        logging.getLogger("recoder_dist").debug("where the error was met", exc_info=True)
        print(f"recoder-dist: error: {_without_ray_notes(mistake or outage)}", file=sys.stderr)
        return 2 if mistake is not None else 1
