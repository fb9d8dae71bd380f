"""What the driver sends to every worker: plain, picklable settings, validated once, here."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from recoder_dist.data.collator import resolve_sampling_users
from recoder_dist.metrics import Metric
from recoder_dist.training.evaluation.scoring import check_metrics
from recoder_dist.training.snapshot import Snapshot, model_class_name

# The training step's arithmetic: float32, or the forward under autocast to bfloat16.
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainSettings:
    """The arguments of ``Recoder.train`` that shape the training loop.

    Raises:
        ValueError: a setting out of range (named).
    """

    lr: float
    weight_decay: float
    num_epochs: int
    batch_size: int
    num_sampling_users: int
    negative_sampling: bool
    iters_per_epoch: int | None = None
    lr_milestones: tuple[int, ...] | None = None
    decay_sparse_lr: bool = False
    checkpoint_freq: int = 0
    eval_freq: int = 0
    num_train_rows: int = 0
    profile: bool = False
    precision: str = "fp32"

    def __post_init__(self):
        if not (isinstance(self.lr, numbers.Real) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, numbers.Real) and 0 <= self.weight_decay < math.inf):
            raise ValueError(
                f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}"
            )
        _check_int(self.num_epochs, "num_epochs", 1)
        # The batch geometry: batch_size >= 1, num_sampling_users a multiple of it.
        resolve_sampling_users(self.batch_size, self.num_sampling_users)
        if self.iters_per_epoch is not None:
            _check_int(self.iters_per_epoch, "iters_per_epoch", 1)
        for milestone in self.lr_milestones or ():
            _check_int(milestone, "every lr_milestones entry", 1)
        _check_int(self.checkpoint_freq, "checkpoint_freq", 0)
        _check_int(self.eval_freq, "eval_freq", 0)
        for name in ("negative_sampling", "decay_sparse_lr", "profile"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class EvalSettings:
    """How evaluation runs: ``metrics`` of the top ``num_recommendations`` items of each user,
    ``batch_size`` users at a time.

    Raises:
        ValueError, TypeError: no metrics, a non-Metric, a list shorter than a metric's k, or a
            batch size below 1.
    """

    metrics: tuple[Metric, ...]
    num_recommendations: int
    batch_size: int

    @classmethod
    def of(cls, metrics, num_recommendations: int | None, batch_size: int) -> EvalSettings:
        """Settings whose list length defaults to the largest k of ``metrics``."""
        if metrics is None:
            raise ValueError("evaluation needs metrics, e.g. [Recall(k=20), NDCG(k=100)]")
        k = check_metrics(metrics, num_recommendations)
        return cls(metrics=tuple(metrics), num_recommendations=k, batch_size=batch_size)

    def __post_init__(self):
        check_metrics(self.metrics, self.num_recommendations)
        _check_int(self.batch_size, "eval batch_size", 1)

    @property
    def metric_names(self) -> list[str]:
        return [metric.name for metric in self.metrics]


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, built once by the driver and never changed.

    ``model`` is the initialized model with its current weights (identical on every rank), or,
    for a new model whose tables are to be sharded, initialized on the meta device: no weights,
    and each rank draws its rows from its ``init_seed`` (``ShardedAutoencoder.like``);
    ``train`` is None for an evaluation-only job. ``seed`` fixes the data order and dropout
    noise of every (epoch, rank), so that a resumed run repeats what a straight one does.
    ``kernels``: the CPU fast paths ("compiled") or their references ("reference"), see
    ``recoder_dist.kernels``. ``tables``: the item tables sharded by row over the ranks
    ("sharded") or whole on every rank ("replicated"), see ``training.worker.sharded_step``;
    ``shard_group_size``: sharded within groups of that many ranks and replicated across
    them (the 2D layout, ``sharded.replicas``), None for one group of every rank.
    ``weights``: the checkpoint of an earlier run with sharded tables (a
    ``ray.train.Checkpoint``) that holds the weights and optimizer states, shard by shard,
    when ``model`` has none (meta): each rank takes its rows from it.
    """

    model: object
    num_items: int
    num_users: int | None
    optimizer_type: str
    loss: object
    loss_params: dict
    use_cuda: bool
    in_process: bool
    seed: int
    start_epoch: int = 0
    checkpoint_prefix: str | None = None
    optimizer_state: dict = field(default_factory=dict)
    train: TrainSettings | None = None
    eval: EvalSettings | None = None
    kernels: str = "compiled"
    tables: str = "sharded"
    shard_group_size: int | None = None
    weights: object = None

    def snapshot(self, model, epoch: int, optimizer_state: dict) -> Snapshot:
        """The snapshot of ``model`` (this job's model, or its copy on a worker) at ``epoch``.
        A loss given as a Module is not saved (only names are): restoring it is the caller's
        business."""
        named_loss = isinstance(self.loss, str)
        return Snapshot(
            model_class=model_class_name(model),
            model_params=model.model_params(),
            model_state=model.state_dict(),
            num_items=self.num_items,
            num_users=self.num_users,
            epoch=epoch,
            optimizer_type=self.optimizer_type,
            optimizer_state=optimizer_state,
            loss=self.loss if named_loss else None,
            loss_params=dict(self.loss_params) if named_loss else {},
            seed=self.seed,
        )


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
