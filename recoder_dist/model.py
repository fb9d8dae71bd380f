"""Recoder: trains a FactorizationModel on Ray Train workers, and evaluates and uses it."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from recoder_dist import storage
from recoder_dist.data.collator import UserRows, resolve_sampling_users, row_numbers
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.data.epoch_order import RowBlocks
from recoder_dist.data.loader import UsersInteractions
from recoder_dist.data.parquet_rows import UserRowFiles
from recoder_dist.data.ray_dataset import (
    TRAIN_ROWS_PER_BLOCK,
    put_blocks,
    rows_from_arrow,
    to_ray_dataset,
    user_rows_table,
)
from recoder_dist.data.training_rows import TrainingRows
from recoder_dist.kernels import compiled as compiled_kernels
from recoder_dist.legacy import NotARecoder040File, load_recoder040_file
from recoder_dist.losses import build_loss
from recoder_dist.metrics import Metric
from recoder_dist.nn.base import FactorizationModel
from recoder_dist.training.config import EvalSettings, TrainSettings, WorkerJob
from recoder_dist.training.driver.launcher import (
    RunOutput,
    cluster_gpus,
    ensure_ray,
    gpus_for,
    run_job,
)
from recoder_dist.training.evaluation.scoring import (
    batches_metric_sums,
    metric_means,
    predict_scores,
    recommend_top_k,
)
from recoder_dist.training.resources import default_workers
from recoder_dist.training.snapshot import (
    Snapshot,
    epoch_file,
    load_snapshot,
    model_class_name,
    save_snapshot,
    snapshot_prefix,
)
from recoder_dist.training.worker.optimizers import check_optimizer_type, check_optimizers
from recoder_dist.training.worker.sharded_step import check_tables, rank_batch, shards_tables

logger = logging.getLogger(__name__)

# The user x item scores above which ``Recoder.evaluate`` scores on the workers by default:
# scoring them in one process takes less time than starting a worker group (benchmarks/
# fixed_cost.py; RESULTS.md, "The fixed cost of a job").
DRIVER_EVAL_SCORES = 2**28


class Recoder:
    """Trains a :class:`~recoder_dist.nn.FactorizationModel` with mini-batch negative sampling,
    data-parallel over Ray Train workers.

    Args:
        model: the model to train (its parameters are created on the first ``train``).
        num_items: number of items; by default taken from the first training dataset.
        num_users: number of users; by default taken from the first training dataset.
        optimizer_type: 'adam' (the default), 'adamw' (decoupled weight decay), 'sgd',
            'adagrad' or 'rmsprop'. A model with sparse embeddings needs 'adam' or 'adamw'
            (SparseAdam for the embeddings, Adam or AdamW for the rest), 'sgd' or 'adagrad'.
        loss: 'logloss' (the default: multinomial log-likelihood, as Mult-DAE), 'mse',
            'logistic', or a ``torch.nn.Module`` that reduces by sum. The defaults differ from
            recsys-recoder 0.4.0's ('sgd', 'mse'): on ml-1m-implicit's validation users they
            reach NDCG@100 0.4235 against 0.3498 (``benchmarks/quality.py``'s autoencoder).
        loss_params: keyword arguments of the named loss (e.g. ``{'confidence': 3}`` for mse).
        use_cuda: one GPU per worker; an error when the cluster has no GPU.
        user_based: refuse training data with more users than the model represents.
        item_based: refuse training data with more items than the model represents.
        num_workers: Ray Train workers (DDP ranks); 0 runs the loop in this process. None
            (the default): in this process when Ray runs on this machine alone, which saves
            starting a worker group (seconds a run) where there is nothing to spread over; one
            worker on a cluster (``RAY_ADDRESS``, or more than one node), or when
            ``max_failures`` asks for restarts.
        cpus_per_worker: CPUs reserved for each worker, which runs as many torch threads (no
            more than its share of its node's cores). None (the default): the workers split
            the CPUs of the nodes alive when a run starts (less what the caller holds, when it
            is a Ray task), each taking the largest whole number that lets all of them fit
            (with a GPU each, when ``use_cuda``), 1 where they do not fit. On an autoscaling
            cluster, give it: a run resumed when more nodes are up would otherwise get more
            CPUs, so more torch threads, and weights that differ in the last bits.
        storage_path: where Ray Train keeps the runs' checkpoints: a local path, or on a cluster
            of several nodes storage that every node reaches (``s3://bucket/prefix``,
            ``gs://...``, a shared filesystem). By default a temporary folder on this machine,
            which a cluster whose training runs on other nodes refuses.
        run_name: the training run's name in ``storage_path``. ``train`` with the name of a
            run that stopped (its driver killed, ``ray job stop``) resumes it from its last
            checkpoint, with the weights that a run that never stopped reaches; by default a
            new name for every run.
        max_failures: worker-group failures (a worker process dying, a node lost) that a
            training run survives by restarting from its last checkpoint, taken every
            ``checkpoint_freq`` epochs; with ``checkpoint_freq=0`` it restarts from the start.
        seed: seed of the initial weights, the data order and the dropout noise; by default a
            random one, or the one saved in the snapshot that ``init_from_model_file`` loads.
        callbacks: Ray Train ``UserCallback``s for the runs, e.g. Ray Tune's
            ``TuneReportCallback`` so that a Tune trial sees the evaluations.
        backend: the workers' process group backend (Ray Train's ``TorchConfig``). None (the
            default) lets Ray choose where the workers run: NCCL for workers that hold a GPU,
            gloo otherwise. ``"gloo"`` for GPU workers whose torch has no NCCL (e.g. Ray's fake
            GPUs on a CPU build), ``"cpu:gloo,cuda:nccl"`` for both in one group.
        kernels: ``"compiled"`` (the default): training, evaluation, ``predict`` and
            ``recommend`` take the CPU fast paths; ``"reference"``: their plain numpy/torch
            references, which compute the same results (see ``recoder_dist.kernels``).
        tables: ``"sharded"`` (the default): with several workers, each holds and updates
            only its rows of the model's tables (item ``i`` on worker ``i % workers``: a
            DynamicAutoencoder's item tables, a MatrixFactorization's item tables and its
            user table, user ``u`` on worker ``u % workers``); ``train``'s ``batch_size``
            and ``num_sampling_users`` are then a step's global batch and sampling group,
            split over the workers, so any number of workers trains the model that one
            process trains with the same settings. ``"replicated"``: every worker holds every
            table, the touched rows are exchanged, and ``batch_size`` is per worker (each
            worker samples its negatives among its own batch's items). Other models (a
            subclass of those two too), a loss Module of the user's (it reads the whole
            output) and ``precision="bf16"`` replicate the tables either way.
        shard_group_size: with sharded tables, shard them within groups of this many workers
            (a node's GPUs) and replicate them across the groups, which average their
            gradients (the 2D layout: the exchange of codes grows with the group, not with
            every worker); a step's loss is the mean of the groups' losses, each group
            sampling its own negatives. None (the default): one group of every worker. The
            number of workers must be a multiple of it.
    """

    def __init__(
        self,
        model: FactorizationModel,
        num_items: int | None = None,
        num_users: int | None = None,
        optimizer_type: str = "adam",
        loss: str | torch.nn.Module = "logloss",
        loss_params: dict | None = None,
        use_cuda: bool = False,
        user_based: bool = True,
        item_based: bool = True,
        *,
        num_workers: int | None = None,
        cpus_per_worker: float | None = None,
        storage_path: str | None = None,
        run_name: str | None = None,
        max_failures: int = 0,
        seed: int | None = None,
        callbacks: list | None = None,
        backend: str | None = None,
        kernels: str = "compiled",
        tables: str = "sharded",
        shard_group_size: int | None = None,
    ):
        if not isinstance(model, FactorizationModel):
            raise TypeError(
                f"model must be a recoder_dist.nn.FactorizationModel, got {type(model).__name__}"
            )
        if num_workers is not None and (
            isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
        ):
            raise ValueError(f"num_workers must be None or an int >= 0, got {num_workers!r}")
        if cpus_per_worker is not None and (
            isinstance(cpus_per_worker, bool)
            or not isinstance(cpus_per_worker, (int, float))
            or not 0 < cpus_per_worker < math.inf
        ):
            raise ValueError(
                f"cpus_per_worker must be None or a finite number > 0, got {cpus_per_worker!r}"
            )
        for name, value in (("num_items", num_items), ("num_users", num_users)):
            if value is not None:
                _check_positive_int(value, name)
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0
        ):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        check_optimizer_type(optimizer_type)
        self._compiled = compiled_kernels(kernels)  # validates the mode
        self.kernels = kernels
        check_tables(tables)
        self.tables = tables
        if shard_group_size is not None and (
            isinstance(shard_group_size, bool)
            or not isinstance(shard_group_size, int)
            or shard_group_size < 1
        ):
            raise ValueError(
                f"shard_group_size must be None or an int >= 1, got {shard_group_size!r}"
            )
        self.shard_group_size = shard_group_size
        build_loss(loss, loss_params)  # validates the name and parameters now
        self._model = model
        self._shards: _SavedShards | None = None  # see the model property
        self.num_items = None if num_items is None else int(num_items)
        self.num_users = None if num_users is None else int(num_users)
        self.optimizer_type = optimizer_type
        self.loss = loss
        self.loss_params = dict(loss_params or {})
        self.use_cuda = bool(use_cuda)
        self.user_based = user_based
        self.item_based = item_based
        self.num_workers = num_workers
        self.cpus_per_worker = cpus_per_worker
        self.storage_path = storage.normalized(storage_path) if storage_path else None
        self.run_name = run_name
        self.max_failures = max_failures
        self.callbacks = list(callbacks or [])
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be None or a str, got {type(backend).__name__}")
        self.backend = backend
        self._seed_given = seed is not None
        self.seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
        self.current_epoch = 0
        self.history: list[dict] = []
        self._model_initialized = False
        self._optimizer_state: dict = {}

    @property
    def model(self) -> FactorizationModel:
        """The model. After a run with sharded tables its weights are in the run's last
        checkpoint, one file per worker, and nowhere else: they are assembled into this
        process on the first use of this attribute (or of ``predict``, ``recommend``,
        ``save_state`` and an evaluation here), and not at all when the next training or
        evaluation runs sharded on workers (each reads its rows from the files), so a catalog
        larger than this process's memory trains as long as nothing asks for the whole."""
        self._assemble()
        return self._model

    @model.setter
    def model(self, model: FactorizationModel) -> None:
        self._drop_shards()
        self._model = model

    # ---------------------------------------------------------------- training

    def train(
        self,
        train_dataset: RecommendationDataset | UserRowFiles | TrainingRows,
        val_dataset: RecommendationDataset | UserRowFiles | None = None,
        lr: float = 0.001,
        weight_decay: float = 0.0,
        num_epochs: int = 1,
        iters_per_epoch: int | None = None,
        batch_size: int = 64,
        lr_milestones: list[int] | None = None,
        negative_sampling: bool = False,
        num_sampling_users: int = 0,
        num_data_workers: int = 0,
        model_checkpoint_prefix: str | None = None,
        checkpoint_freq: int = 0,
        eval_freq: int = 0,
        eval_num_recommendations: int | None = None,
        eval_num_users: int | None = None,
        metrics: list[Metric] | None = None,
        eval_batch_size: int | None = None,
        *,
        decay_sparse_lr: bool = False,
        profile: bool = False,
        precision: str = "fp32",
    ) -> list[dict]:
        """Trains the model for ``num_epochs`` more epochs.

        Args:
            train_dataset: the users' interactions to reconstruct: a matrix, or user rows in
                Parquet files (``UserRowFiles``, e.g. ``open_prepared(uri).train``), which the
                cluster reads without passing them through this process, or rows that
                ``read_training_rows`` read once for several runs (``TrainingRows``).
            val_dataset: users with ``target`` interactions (a matrix or files), evaluated every
                ``eval_freq`` epochs with ``metrics``.
            lr: learning rate.
            weight_decay: L2 penalty of dense weights (not of biases or sparse embeddings).
            num_epochs: epochs to train, counted from the current epoch: a model restored from
                a snapshot of epoch 10 and trained with ``num_epochs=5`` ends at epoch 15.
            lr_milestones: epochs at whose start the dense parameters' learning rate is
                multiplied by 0.1 (the sparse embeddings' too with ``decay_sparse_lr``).
            iters_per_epoch: cap on the training batches of an epoch (per worker).
            batch_size: users per training batch: a step's global batch, split over the
                workers, with sharded tables (see ``tables``); per worker with replicated ones.
            negative_sampling: score each batch only on the items its sampling group touched.
            num_sampling_users: users per sampling group (a multiple of ``batch_size``; 0 means
                ``batch_size``); a group is sliced into batches that share its items.
            num_data_workers: accepted for compatibility; Ray Data feeds the workers.
            model_checkpoint_prefix: write ``{prefix}_epoch_{N}.model`` snapshots.
            checkpoint_freq: epochs between snapshots (the last epoch is always written).
            eval_freq: epochs between evaluations of ``val_dataset``.
            eval_num_recommendations: length of the recommendation lists evaluated.
            eval_num_users: evaluate a fixed random sample of this many users.
            metrics: :class:`~recoder_dist.metrics.Metric` instances.
            eval_batch_size: users per evaluation batch (default ``batch_size``).
            decay_sparse_lr: let ``lr_milestones`` decay the sparse embeddings' optimizer too.
                recsys-recoder 0.4.0 decays only the dense optimizer, which is the default.
            profile: time the phases of the training steps on every rank (see
                ``recoder_dist.training.worker.step_profile``); a profiled step waits for the other
                ranks before its collectives, so it runs a little slower.
            precision: ``"fp32"``, or ``"bf16"``: the model's forward under autocast to
                bfloat16 (weights, gradients, optimizer states and evaluation stay float32).

        Returns:
            One dict per epoch: epoch, loss, seconds, and metrics when evaluated; with
            ``profile``, ``"profile"``: phase -> seconds of the epoch, one value per rank.
        """
        _check_dataset(train_dataset, "train_dataset")
        if _num_interactions(train_dataset) == 0:
            raise ValueError("train_dataset has no interactions")
        if isinstance(train_dataset, RecommendationDataset) and isinstance(self.loss, str):
            _warn_of_values_the_loss_misreads(self.loss, train_dataset.interactions.data)
        evaluating = val_dataset is not None and eval_freq > 0
        if val_dataset is not None and not evaluating:
            logger.warning(
                "val_dataset is evaluated every eval_freq epochs, and eval_freq is %s: this "
                "run does not evaluate it",
                eval_freq,
            )
        if lr_milestones is not None and (
            isinstance(lr_milestones, (str, bytes)) or not isinstance(lr_milestones, Iterable)
        ):
            raise TypeError(f"lr_milestones must be a list of epochs, got {lr_milestones!r}")
        settings = TrainSettings(  # validates every setting
            lr=lr,
            weight_decay=weight_decay,
            num_epochs=num_epochs,
            batch_size=batch_size,
            num_sampling_users=resolve_sampling_users(batch_size, num_sampling_users),
            negative_sampling=negative_sampling,
            iters_per_epoch=iters_per_epoch,
            lr_milestones=tuple(lr_milestones) if lr_milestones else None,
            decay_sparse_lr=decay_sparse_lr,
            checkpoint_freq=checkpoint_freq,
            eval_freq=eval_freq if evaluating else 0,
            num_train_rows=len(train_dataset),
            profile=profile,
            precision=precision,
        )
        eval_settings = None
        if evaluating:
            _check_dataset(val_dataset, "val_dataset", needs_target=True)
            eval_settings = EvalSettings.of(
                metrics,
                eval_num_recommendations,
                batch_size if eval_batch_size is None else eval_batch_size,
            )
            _check_eval_users(eval_num_users, "eval_num_users")
        workers = self.workers  # resolved once: the log, the job and the run agree
        loss = build_loss(self.loss, self.loss_params)
        sharded = shards_tables(self._model, loss, self.tables, workers, precision)
        if sharded:
            # The global batch's split and the groups, refused now rather than in the workers.
            rank_batch(batch_size, settings.num_sampling_users, workers)
            if self.shard_group_size is not None and workers % self.shard_group_size:
                raise ValueError(
                    f"{workers} workers do not split into groups of "
                    f"shard_group_size={self.shard_group_size}"
                )
        self._init_training(train_dataset, weightless=sharded)
        if evaluating:
            self._check_eval_data(val_dataset)
        use_gpus = self._use_gpus(workers)
        check_optimizers(self._model, self.optimizer_type)  # a mismatch fails now, not in a worker

        ensure_ray()
        blocks = _train_blocks(train_dataset)
        if blocks.num_rows != settings.num_train_rows:
            raise ValueError(
                f"train_dataset holds {blocks.num_rows} rows, but its description says "
                f"{settings.num_train_rows}"
            )
        datasets = {}
        if evaluating:
            datasets["eval"] = self._eval_dataset(
                val_dataset, eval_num_users, eval_settings.batch_size, here=workers == 0
            )
        prefix = snapshot_prefix(model_checkpoint_prefix) if model_checkpoint_prefix else None
        logger.info(
            "training %s on %d users x %d items, %d worker(s), epochs %d..%d",
            type(self._model).__name__,
            settings.num_train_rows,
            self.num_items,
            workers,
            self.current_epoch + 1,
            self.current_epoch + num_epochs,
        )
        job = self._job(
            workers,
            sharded=sharded,
            use_cuda=use_gpus,
            train=settings,
            eval=eval_settings,
            checkpoint_prefix=prefix,
        )
        try:
            output = self._run(job, datasets, workers, blocks)
        except BaseException:
            if self._weightless() and self._shards is None:  # the next call draws them again
                self._model_initialized = False
            raise
        history = output.value  # rank 0's records, one per epoch of the run
        if sharded:  # the weights stay in the run's checkpoint (see the model property)
            self._keep_shards(output, history[-1]["epoch"])
        else:
            try:
                self._restore(output.final_snapshot(), restore_model=True)
            finally:
                output.discard()
        self.history.extend(history)
        return history

    # -------------------------------------------------------------- evaluation

    def evaluate(
        self,
        eval_dataset: RecommendationDataset | UserRowFiles,
        num_recommendations: int | None = None,
        metrics: list[Metric] | None = None,
        batch_size: int = 500,
        num_users: int | None = None,
        *,
        on_workers: bool | None = None,
    ) -> dict[str, float]:
        """Evaluates the model on ``eval_dataset`` (inputs and targets: a matrix, or
        ``UserRowFiles`` that the cluster reads).

        Each user's recommendations exclude the items of its input; users without target
        items are not counted. Every placement gives the same numbers.

        Args:
            on_workers: score the users on the Ray Train workers (``num_workers`` of them)
                rather than in this process. None (the default): on the workers when the
                evaluation computes more than ``DRIVER_EVAL_SCORES`` user x item scores,
                otherwise here, which saves starting a worker group (seconds, against
                milliseconds of scoring). Here, rows in files are read by the cluster into
                Ray's object store, and this process takes them from there.

        Returns:
            ``{metric name: mean over users}``, and ``eval_users``: how many users counted.
        """
        self._require_model()
        _check_dataset(eval_dataset, "eval_dataset", needs_target=True)
        settings = EvalSettings.of(metrics, num_recommendations, batch_size)
        _check_eval_users(num_users, "num_users")
        self._check_eval_data(eval_dataset)
        if isinstance(eval_dataset, RecommendationDataset):
            users = self._eval_users(eval_dataset, num_users)
            scores = len(users) * self.num_items
        else:
            scores = min(num_users or eval_dataset.num_rows, eval_dataset.num_rows) * self.num_items
        if on_workers is None:
            on_workers = scores > DRIVER_EVAL_SCORES
        if not on_workers:
            if isinstance(eval_dataset, RecommendationDataset):
                batches = _csr_batches(eval_dataset, users, settings.batch_size)
            else:
                ensure_ray()
                rows = self._eval_dataset(eval_dataset, num_users, settings.batch_size, here=True)
                batches = _arrow_batches(rows, settings.batch_size)
            return self._evaluate_here(batches, settings)
        workers = self.workers
        # A sharded run's model is evaluated from its shards where the tables would shard.
        sharded = self._shards is not None and shards_tables(
            self._model, build_loss(self.loss, self.loss_params), self.tables, workers, "fp32"
        )
        job = self._job(workers, sharded=sharded, use_cuda=self._use_gpus(workers), eval=settings)
        rows = self._eval_dataset(eval_dataset, num_users, settings.batch_size, workers == 0)
        output = self._run(job, {"eval": rows}, workers)
        output.discard()
        return output.value  # each metric's mean, and the users counted

    def predict(self, users_interactions, return_input: bool = False):
        """Scores of every item for each row of ``users_interactions``.

        Args:
            users_interactions: users x items sparse matrix, a RecommendationDataset, or a
                ``UsersInteractions`` (0.4.0's: its users' ids, which a MatrixFactorization
                reads, and their items). A matrix's rows are users 0..n-1: a model of user
                rows takes every user's (some users: a ``UsersInteractions``).
            return_input: also return the dense input.

        Returns:
            ``users x num_items`` numpy array (and the dense input when ``return_input``).
        """
        self._require_model()
        rows = self._user_rows(users_interactions)
        model = self.model.eval()
        scores = predict_scores(
            model, rows, self.num_items, torch.device("cpu"), compiled=self._compiled
        )
        scores = scores.numpy()
        if not return_input:
            return scores
        dense = np.zeros((len(rows), self.num_items), dtype=np.float32)
        dense[row_numbers(rows.indptr), rows.indices] = rows.values
        return scores, dense

    def recommend(self, users_interactions, num_recommendations: int) -> list[list[int]]:
        """Top ``num_recommendations`` items for each row of ``users_interactions`` (as in
        ``predict``), excluding the row's own items."""
        self._require_model()
        _check_positive_int(num_recommendations, "num_recommendations")
        rows = self._user_rows(users_interactions)
        model = self.model.eval()
        items, valid = recommend_top_k(
            model,
            rows,
            self.num_items,
            num_recommendations,
            torch.device("cpu"),
            compiled=self._compiled,
        )
        return [row[ok].tolist() for row, ok in zip(items.numpy(), valid.numpy())]

    # --------------------------------------------------------------- snapshots

    def save_state(self, model_checkpoint_prefix: str) -> str:
        """Writes ``{prefix}_epoch_{current_epoch}.model`` and returns its path."""
        self._require_model()
        path = epoch_file(model_checkpoint_prefix, self.current_epoch)
        save_snapshot(self._snapshot(), path)
        logger.info("saved %s", path)
        return path

    def init_from_model_file(self, model_file: str) -> None:
        """Loads a snapshot: hyper-parameters, weights, optimizer states and epoch, so that
        ``train`` continues where the snapshot stopped.

        Also reads a model file written by recsys-recoder 0.4.0's ``save_state`` (see
        :func:`recoder_dist.legacy.load_recoder040_file`): its DynamicAutoencoder or
        MatrixFactorization (``activation_type='none'``), epoch, optimizer type and loss, but
        not its optimizer states (training continues with fresh ones); the model's own
        ``sparse`` setting is kept. Either kind is read with ``torch.load(weights_only=True)``.

        Raises:
            FileNotFoundError: no file at ``model_file``.
            ValueError: the file is neither kind, cannot be read safely, or does not fit this
                Recoder's model.
        """
        try:
            snapshot = load_snapshot(model_file)
        except ValueError as not_a_snapshot:
            # A 0.4.0 file fails our reader (its numpy arrays are not allowed there); it is read
            # again with numpy's integer arrays allowed, and converted.
            try:
                with storage.local_copy(model_file) as path:
                    sparse = bool(getattr(self._model, "sparse", False))
                    snapshot = load_recoder040_file(path, sparse=sparse)
            except NotARecoder040File:
                raise not_a_snapshot from None
        mine = model_class_name(self._model)
        if snapshot.model_class != mine:
            raise ValueError(f"{model_file} holds a {snapshot.model_class}, not a {mine}")
        self._check_fits(snapshot, model_file)
        self._restore(snapshot, restore_model=True, load_params=True)
        logger.info("loaded %s (epoch %d)", model_file, self.current_epoch)

    def _check_fits(self, snapshot: Snapshot, model_file: str) -> None:
        """A snapshot replaces the hyper-parameters of a fresh model, but must not silently
        replace what this Recoder was explicitly built or trained for."""
        for attr in ("num_items", "num_users"):
            mine, theirs = getattr(self, attr), getattr(snapshot, attr)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"{model_file} was trained with {attr}={theirs}, this Recoder has {mine}"
                )
        if self._model_initialized and snapshot.model_params is not None:
            mine = self._model.model_params()
            differ = sorted(
                k for k in snapshot.model_params if mine.get(k) != snapshot.model_params[k]
            )
            if differ:
                details = ", ".join(
                    f"{k}={snapshot.model_params[k]!r} (model: {mine.get(k)!r})" for k in differ
                )
                raise ValueError(f"{model_file} does not fit the initialized model: {details}")

    # ---------------------------------------------------------------- internals

    def _init_training(self, dataset: RecommendationDataset, weightless: bool = False) -> None:
        """Sizes the model for ``dataset`` and, the first time, initializes it.
        ``weightless``: on the meta device, with no weights, for a run with sharded tables,
        whose workers draw their rows of the same initial weights (see
        ``ShardedAutoencoder.like``): no process ever holds the whole tables."""
        for based, attr, count in (
            (self.item_based, "num_items", dataset.num_items),
            (self.user_based, "num_users", dataset.num_users),
        ):
            current = getattr(self, attr)
            if current is None:
                setattr(self, attr, count)
            elif based and count > current:
                raise ValueError(
                    f"the training data has {count} {attr[4:]} but the model represents "
                    f"{current}; set {attr[4:-1]}_based=False if the model does not depend on them"
                )
        if self.num_items is None or self.num_items < dataset.num_items:
            self.num_items = dataset.num_items
        if self._model_initialized:
            self._check_known_users(dataset, "training")  # whatever user_based says
            return
        # The initial weights are drawn from the seed too: one seed, one run.
        meta = torch.device("meta") if weightless else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), meta:
            torch.manual_seed(self.seed)
            self._model.init_model(num_items=self.num_items, num_users=self.num_users)
        self._model_initialized = True

    def _weightless(self) -> bool:
        """Whether the model was initialized without weights (see ``_init_training``), or
        its weights are in a sharded run's checkpoint (``_keep_shards``)."""
        return any(p.is_meta for p in self._model.parameters())

    def _keep_shards(self, output: RunOutput, epoch: int) -> None:
        """Keeps the sharded run ``output``'s last checkpoint as the model's weights (and its
        optimizers' states): the model stays without weights here. A temporary storage is
        deleted once the weights are assembled or replaced, or with this Recoder."""
        self._drop_shards()
        self._shards = _SavedShards(output, weakref.finalize(self, output.discard))
        self._model.to("meta")  # weights from before the run are stale
        self.current_epoch = epoch
        self._optimizer_state = {}

    def _assemble(self) -> None:
        """The whole model and its optimizers' states, from the kept shards, in this process."""
        if self._shards is None:
            return
        saved = self._shards
        self._restore(saved.output.final_snapshot(), restore_model=True)
        self._drop_shards()

    def _drop_shards(self) -> None:
        if self._shards is not None:
            self._shards.discard()
            self._shards = None

    def _check_eval_data(self, dataset: RecommendationDataset | UserRowFiles) -> None:
        if dataset.num_items > self.num_items:
            raise ValueError(
                f"the evaluation data has {dataset.num_items} items but the model knows "
                f"{self.num_items}"
            )
        self._check_known_users(dataset, "evaluation")

    def _check_known_users(self, dataset, what: str) -> None:
        """Refuses data with users beyond a model's user table (a model of user rows)."""
        known = self._model.known_users
        if known is not None and dataset.num_users > known:
            raise ValueError(
                f"the {what} data has {dataset.num_users} users but "
                f"{type(self._model).__name__} knows {known} (its user table): it scores the "
                "users it was trained on, by their row"
            )

    def _use_gpus(self, workers: int) -> bool:
        """Whether the run's workers ask for a GPU each. ``use_cuda=True`` means GPUs where
        present: in this process or on the local Ray when it has them; on a cluster reached at
        ``RAY_ADDRESS`` always, since its autoscaler may add GPU nodes on demand. Without any,
        training runs on CPU, with a warning."""
        present = gpus_for(self.use_cuda, in_process=workers == 0)
        local = workers > 0 and not os.environ.get("RAY_ADDRESS")
        if present and local and cluster_gpus() < workers:
            raise ValueError(
                f"use_cuda=True with {workers} workers needs as many GPUs, but the local Ray "
                f"cluster has {cluster_gpus():g}; lower num_workers"
            )
        return present

    def _eval_dataset(
        self,
        dataset: RecommendationDataset | UserRowFiles,
        num_users: int | None,
        batch_size: int,
        here: bool = False,
    ):
        """The evaluation users' rows (a fixed random sample of ``num_users`` of them), in the
        object store in blocks of about ``batch_size`` rows, in a fixed order: the launcher
        deals blocks out to the workers, who score them a batch at a time. ``here``: this
        process scores them (a run in process, an evaluation in the driver), and reads files
        itself instead of asking the cluster's tasks to."""
        if isinstance(dataset, UserRowFiles):  # its rows are the users with target items
            if dataset.num_rows == 0:
                raise ValueError("the evaluation dataset has no user with target interactions")
            keep = None
            if num_users is not None and num_users < dataset.num_rows:
                keep = np.zeros(dataset.num_rows, dtype=bool)
                chosen = np.random.default_rng(self.seed).choice(dataset.num_rows, num_users, False)
                keep[chosen] = True

            def sample(table):
                return table if keep is None else table.filter(keep[table["position"].to_numpy()])

            if here:
                return to_ray_dataset(sample(dataset.table()), rows_per_block=batch_size)
            rows = dataset.ray_dataset()
            if keep is not None:
                rows = rows.map_batches(sample, batch_format="pyarrow")
            # Read once, by the cluster, into the object store: every evaluation of every
            # worker then reads its blocks, instead of starting read tasks of its own (which
            # would wait for CPUs that the workers hold).
            rows.context.execution_options.preserve_order = True
            return rows.repartition(target_num_rows_per_block=batch_size).materialize()
        users = self._eval_users(dataset, num_users)
        return to_ray_dataset(user_rows_table(dataset, users), rows_per_block=batch_size)

    def _eval_users(self, dataset: RecommendationDataset, num_users: int | None) -> np.ndarray:
        """The users with target items (a fixed random sample of ``num_users`` of them)."""
        users = np.flatnonzero(np.diff(dataset.target.indptr))
        if len(users) == 0:
            raise ValueError("the evaluation dataset has no user with target interactions")
        if num_users is not None and num_users < len(users):
            users = np.sort(np.random.default_rng(self.seed).choice(users, num_users, False))
        return users

    def _evaluate_here(self, batches, settings: EvalSettings) -> dict[str, float]:
        """``evaluate`` in this process: the workers' batches (pairs of input and target
        ``UserRows``), summed the workers' way."""
        model = self.model.eval()
        metrics = list(settings.metrics)
        sums, count = batches_metric_sums(
            model,
            batches,
            metrics,
            settings.num_recommendations,
            self.num_items,
            torch.device("cpu"),
            compiled=self._compiled,
        )
        return metric_means(sums, count, metrics)

    @property
    def workers(self) -> int:
        """The Ray Train workers that a run uses: ``num_workers``, or what None stands for on
        this Ray (see the class's docstring); 0 means in this process."""
        if self.num_workers is not None:
            return self.num_workers
        ensure_ray()
        return default_workers(self.max_failures)

    def _job(
        self, workers: int = 0, *, sharded: bool = False, use_cuda: bool = False, **kwargs
    ) -> WorkerJob:
        """The job of a run on ``workers`` (0: in this process; a snapshot's job runs nowhere).
        ``sharded``: the run shards the tables, so kept shards (``_keep_shards``) go as they
        are; otherwise the job carries the whole model."""
        weights = self._shards.output.checkpoint if sharded and self._shards else None
        # First: assembling the model sets the epoch and optimizer states read below.
        model = self._model if weights is not None else self.model
        return WorkerJob(
            model=model,
            weights=weights,
            num_items=self.num_items,
            num_users=self.num_users,
            optimizer_type=self.optimizer_type,
            loss=self.loss,
            loss_params=self.loss_params,
            use_cuda=use_cuda,
            in_process=workers == 0,
            seed=self.seed,
            start_epoch=self.current_epoch,
            optimizer_state=self._optimizer_state,
            kernels=self.kernels,
            tables=self.tables,
            shard_group_size=self.shard_group_size,
            **kwargs,
        )

    def _run(self, job: WorkerJob, datasets: dict, workers: int, train_blocks=None):
        return run_job(
            job,
            datasets,
            train_blocks,
            num_workers=workers,
            cpus_per_worker=self.cpus_per_worker,
            storage_path=self.storage_path,
            run_name=self.run_name if job.train is not None else None,
            max_failures=self.max_failures,
            callbacks=self.callbacks,
            backend=self.backend,
        )

    def _snapshot(self) -> Snapshot:
        return self._job().snapshot(self.model, self.current_epoch, self._optimizer_state)

    def _restore(self, snapshot: Snapshot, restore_model: bool, load_params: bool = False):
        if load_params:
            self._drop_shards()
            if snapshot.model_params is not None:
                self._model.load_model_params(snapshot.model_params)
            self.num_items, self.num_users = snapshot.num_items, snapshot.num_users
            self._model.init_model(num_items=self.num_items, num_users=self.num_users)
            self._model_initialized = True
            if snapshot.optimizer_type:
                self.optimizer_type = snapshot.optimizer_type
            if snapshot.loss is not None:
                self.loss, self.loss_params = snapshot.loss, dict(snapshot.loss_params)
            if snapshot.seed is not None and not self._seed_given:
                self.seed = snapshot.seed  # the seeds that a run that never stopped uses
        if restore_model:
            if self._weightless():
                self._model.to_empty(device="cpu")
            try:
                self._model.load_state_dict(snapshot.model_state)
            except RuntimeError as e:  # torch lists every missing key and size mismatch
                raise ValueError(f"the snapshot does not fit the model: {e}") from None
        self._model.cpu()
        self.current_epoch = snapshot.epoch
        self._optimizer_state = snapshot.optimizer_state

    def _require_model(self) -> None:
        if not self._model_initialized:
            raise ValueError("the model is not initialized: train it or load a snapshot first")

    def _user_rows(self, users_interactions) -> UserRows:
        # A UsersInteractions (0.4.0's argument) names each row's user, which a model of user
        # rows (MatrixFactorization) scores; a bare matrix's rows are users 0..n-1, so such a
        # model takes a bare matrix of every user only (rows 5..7 would be read as users 0..2).
        known, name = self._model.known_users, type(self._model).__name__
        if isinstance(users_interactions, UsersInteractions):
            rows = users_interactions.user_rows()
            num_items = users_interactions.interactions_matrix.shape[1]
            if known is not None and len(rows) and int(rows.users.max()) >= known:
                raise ValueError(
                    f"users_interactions names user {int(rows.users.max())}; {name} knows "
                    f"users 0..{known - 1} (its user table)"
                )
        else:
            if isinstance(users_interactions, RecommendationDataset):
                users_interactions = users_interactions.interactions
            matrix = RecommendationDataset(users_interactions).interactions
            rows, num_items = UserRows.from_csr(matrix), matrix.shape[1]
            if known is not None and matrix.shape[0] != known:
                raise ValueError(
                    f"{name} scores users by id, and a matrix's rows are read as users 0..n-1: "
                    f"give all {known} users' rows, or UsersInteractions(user_ids, rows) for "
                    f"some of them (got {matrix.shape[0]} rows)"
                )
        if num_items > self.num_items:
            raise ValueError(
                f"users_interactions has {num_items} items; the model knows {self.num_items}"
            )
        return rows


def _csr_batches(dataset: RecommendationDataset, users: np.ndarray, batch_size: int):
    """The inputs and targets of ``users``, ``batch_size`` users at a time."""
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        yield (
            UserRows.from_csr(dataset.interactions, batch),
            UserRows.from_csr(dataset.target, batch),
        )


def _arrow_batches(rows, batch_size: int):
    """The inputs and targets of a Ray Dataset of user rows, ``batch_size`` users at a time."""
    rows.context.print_on_execution_start = False  # as on the workers (launcher.run_job)
    rows.context.enable_progress_bars = False
    for table in rows.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        yield rows_from_arrow(table), rows_from_arrow(table, "target_")


def _check_dataset(dataset, name: str, needs_target: bool = False) -> None:
    if isinstance(dataset, TrainingRows):  # training rows only: they carry no targets
        if needs_target:
            raise TypeError(f"{name}: TrainingRows hold training rows, which have no target items")
        return
    if isinstance(dataset, UserRowFiles):
        if needs_target and not dataset.has_target:
            raise ValueError(f"{name}: the user rows at {dataset.location} have no target items")
        return
    if not isinstance(dataset, RecommendationDataset):
        raise TypeError(
            f"{name} must be a RecommendationDataset, UserRowFiles or TrainingRows, got "
            f"{type(dataset).__name__}"
        )
    if needs_target and dataset.target is None:
        raise ValueError(f"{name} needs target interactions: RecommendationDataset(input, target)")


def _num_interactions(dataset: RecommendationDataset | UserRowFiles | TrainingRows) -> int:
    if isinstance(dataset, (UserRowFiles, TrainingRows)):
        return dataset.num_interactions
    return dataset.interactions.nnz


def _train_blocks(dataset: RecommendationDataset | UserRowFiles | TrainingRows) -> RowBlocks:
    """A training set's rows in the object store, in blocks of ``TRAIN_ROWS_PER_BLOCK`` rows:
    read by the cluster from files (Ray tasks), or put there from this process's matrix; rows
    that ``read_training_rows`` read are there already."""
    if isinstance(dataset, TrainingRows):
        return dataset.blocks
    if isinstance(dataset, UserRowFiles):
        return dataset.row_blocks(TRAIN_ROWS_PER_BLOCK)
    return put_blocks(user_rows_table(dataset), TRAIN_ROWS_PER_BLOCK)


def read_training_rows(dataset: RecommendationDataset | UserRowFiles) -> TrainingRows:
    """Reads a training set's rows into the object store once, for several ``Recoder.train``
    calls (the trials of a sweep): each of them then trains from the same blocks instead of
    reading and repartitioning the files again. The rows live as long as the returned value
    does, in this process (their owner); keep it until the runs are over.

    Raises:
        TypeError: ``dataset`` is neither a ``RecommendationDataset`` nor ``UserRowFiles``.
        ValueError: ``dataset`` has no interactions.
    """
    if isinstance(dataset, TrainingRows):
        return dataset
    if not isinstance(dataset, (RecommendationDataset, UserRowFiles)):
        raise TypeError(
            f"dataset must be a RecommendationDataset or UserRowFiles, got {type(dataset).__name__}"
        )
    if _num_interactions(dataset) == 0:
        raise ValueError("the training dataset has no interactions")
    ensure_ray()
    return TrainingRows(
        blocks=_train_blocks(dataset),
        num_users=dataset.num_users,
        num_items=dataset.num_items,
        num_interactions=_num_interactions(dataset),
    )


def _warn_of_values_the_loss_misreads(loss: str, values: np.ndarray) -> None:
    """Says when the training values are outside what ``loss`` reads: its loss then falls
    without bound, and training goes on (as recsys-recoder 0.4.0's, which does not look).
    In-memory data only: rows in files are read by the cluster, not here."""
    low, high = float(values.min()), float(values.max())
    if loss == "logistic" and (low < 0 or high > 1):
        logger.warning(
            "loss 'logistic' reads the values as probabilities in [0, 1], but the training "
            "data's span %g..%g: its loss falls without bound; binarize them "
            "(matrix.data[:] = 1) or use loss='mse'",
            low,
            high,
        )
    elif loss == "logloss" and low < 0:
        logger.warning(
            "loss 'logloss' reads the values as non-negative weights, but the training data "
            "holds %g: its loss falls without bound",
            low,
        )


def _check_eval_users(value, name: str) -> None:
    """A sample size of evaluation users: None (every user) or a positive int."""
    if value is not None:
        _check_positive_int(value, name)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class _SavedShards:
    """A sharded run's output whose last checkpoint holds the model's weights, and the
    finalizer that deletes its temporary storage (run at most once)."""

    output: RunOutput
    finalizer: weakref.finalize

    def discard(self) -> None:
        self.finalizer()


__all__ = ["Recoder", "TrainingRows", "read_training_rows"]
