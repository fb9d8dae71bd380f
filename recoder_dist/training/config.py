"""What the driver sends to every worker: plain, picklable settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from recoder_dist.metrics import Metric


@dataclass(frozen=True)
class TrainSettings:
    """The arguments of ``Recoder.train`` that shape the training loop."""

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
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    metrics: tuple[Metric, ...]
    num_recommendations: int
    batch_size: int


@dataclass
class WorkerJob:
    """Everything a worker needs. ``model`` is the initialized model with its current weights
    (identical on every rank); ``train`` is None for an evaluation-only job."""

    model: object
    num_items: int
    num_users: int | None
    optimizer_type: str
    loss: object
    loss_params: dict
    use_cuda: bool
    in_process: bool
    start_epoch: int = 0
    checkpoint_prefix: str | None = None
    progress: object = None  # ProgressLog actor handle: rank 0 sends per-epoch metrics there
    optimizer_state: dict = field(default_factory=dict)
    train: TrainSettings | None = None
    eval: EvalSettings | None = None
