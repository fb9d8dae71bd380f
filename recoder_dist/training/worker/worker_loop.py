"""The function every Ray Train worker runs (and a run in this process: ``run_loop`` in a
``training.worker.session``): train (and evaluate) on its shard of user rows.

Ranks agree on the number of steps of an epoch before it starts. With sharded tables
(``WorkerJob.tables``, see ``training.worker.sharded_step``) each rank holds its rows of every item
table and the dense layers' gradients are all-reduced; a new model's rows are drawn where they
live, and each rank writes its own shard of a checkpoint (``training.checkpoint``): no rank holds
the whole model. With replicated tables dense parameters are averaged by DDP, sparse embedding
rows by :class:`SparseGradSync`, and rank 0 writes the checkpoints. Metrics are summed over
ranks. What the loop returns (on rank 0) is the run's result, which Ray Train hands to
the driver as ``Result.return_value``: a training run's records, one per epoch, or an
evaluation's results. The process group is the one Ray Train set up, whatever its backend:
every tensor of a collective lives on the worker's device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import resource
import tempfile
import time

import numpy as np
import pyarrow.fs
import ray
import ray.train
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from recoder_dist import kernels, storage
from recoder_dist.data.collator import Collator
from recoder_dist.data.epoch_order import RowBlocks
from recoder_dist.data.ray_dataset import rows_from_arrow
from recoder_dist.losses import build_loss
from recoder_dist.nn.base import sharded_class
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.sharded.replicas import layout_groups
from recoder_dist.sharded.state import sharded_optimizer_state
from recoder_dist.training.batch import unwrapped
from recoder_dist.training.checkpoint import (
    export_snapshot,
    read_checkpoint_at,
    read_restorable,
    write_checkpoint,
)
from recoder_dist.training.config import EvalSettings, TrainSettings, WorkerJob
from recoder_dist.training.evaluation.scoring import batches_metric_sums, metric_means
from recoder_dist.training.evaluation.sharded import sharded_eval_sums
from recoder_dist.training.resources import worker_threads
from recoder_dist.training.snapshot import epoch_file
from recoder_dist.training.sparse_sync import SparseGradSync
from recoder_dist.training.worker.optimizers import (
    build_optimizers,
    epoch_lrs,
    sparse_parameter_names,
)
from recoder_dist.training.worker.prefetch import EpochPrefetcher
from recoder_dist.training.worker.schedule import agreed_steps, epoch_batches
from recoder_dist.training.worker.session import ProcessSession, TrainSession
from recoder_dist.training.worker.sharded_step import rank_batch, sharded_batch_loss, shards_tables
from recoder_dist.training.worker.step import batch_loss
from recoder_dist.training.worker.step_profile import StepProfile, gathered, timed_allreduce_hook

logger = logging.getLogger(__name__)


def worker_loop(config: dict) -> list[dict] | dict:
    """Entry point of ``TorchTrainer(train_loop_per_worker=...)``: :func:`run_loop` in this Ray
    Train worker's session."""
    return run_loop(config, TrainSession())


def run_loop(config: dict, session: TrainSession | ProcessSession) -> list[dict] | dict:
    """Trains (or evaluates) on this rank of ``session``.

    ``config["job"]`` is a :class:`WorkerJob` or an ObjectRef to one (a large model crosses the
    object store once); ``config["train_blocks"]`` the :class:`RowBlocks` of the training rows
    (or an ObjectRef to them); ``config["progress"]`` the actor that rank 0 sends each epoch's
    record to; ``config["storage_path"]`` the run's storage. A worker runs as many torch
    threads as the CPUs it holds allow (in-process, the caller's setting stays).

    Returns:
        An evaluation job's results (``{metric: mean, "eval_users": n}``), or a training job's
        records, one per epoch of the whole run (after a restart, the records of the epochs
        before its checkpoint come from the checkpoint). A training job reports to its session
        the epochs that evaluate (for Tune) or checkpoint.
    """
    job, blocks = (
        ray.get(value) if isinstance(value, ray.ObjectRef) else value
        for value in (config["job"], config["train_blocks"])
    )
    progress = config["progress"]
    if not job.in_process:
        held = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(worker_threads(held, session.local_world))
    device = _device(job.use_cuda, session, progress)
    if _shards(job, session.world):
        job, model = _sharded_job(job, device, session.world)
    else:
        model = job.model.to(device)

    if job.train is None:
        if job.weights is not None:
            model.load_state_dict(_read_weights(job.weights, model).model_state)
        model.eval()
        return _evaluate(model, job, device, session)
    # In-process, the loop seeds torch's global RNG: give the caller's RNG state back after.
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, enabled=job.in_process):
        return _train(model, job, blocks, progress, device, session, config["storage_path"])


def _device(use_cuda: bool, session, progress) -> torch.device:
    """This worker's GPU when ``use_cuda`` and torch sees one; otherwise the CPU, with a
    warning when a GPU was asked for (``use_cuda=True`` means GPUs where present)."""
    if use_cuda and torch.cuda.is_available():
        return session.cuda_device()
    if use_cuda and session.rank == 0:
        node = ray.util.get_node_ip_address()
        _note(
            progress,
            f"use_cuda=True but torch {torch.__version__} sees no CUDA device on "
            f"{node}: training on CPU",
        )
    return torch.device("cpu")


def _shards(job: WorkerJob, world: int) -> bool:
    """Whether this job runs with the tables sharded over its ``world`` ranks: a training job
    whose model shards them (``shards_tables``), or any job whose weights are a sharded run's
    checkpoint (the driver sends them only to a job that shards: it holds no whole model)."""
    if job.weights is not None:
        return True
    if job.train is None or world < 2 or not dist.is_initialized():
        return False
    loss_fn = build_loss(job.loss, job.loss_params)
    return shards_tables(job.model, loss_fn, job.tables, world, job.train.precision)


def _sharded_job(job: WorkerJob, device, world: int) -> tuple[WorkerJob, ShardedModel]:
    """This rank's shard of the job's model, on ``device``, and the job with a model of the
    same class and hyper-parameters but no weights in place of the whole one (what a snapshot
    names). The whole model never reaches the device, and nothing holds it once its shard is
    taken: evaluation and snapshots read the shards."""
    whole = job.model
    shard_group = replica_group = None
    if job.shard_group_size is not None and job.shard_group_size < world:  # the 2D layout
        shard_group, replica_group = layout_groups(job.shard_group_size)
    model = sharded_class(whole).like(
        whole,
        group=shard_group,
        device=device,
        replica_group=replica_group,
        draw=job.weights is None,  # the rows are read from the weights' checkpoint instead
    )
    return dataclasses.replace(job, model=type(whole)(**whole.model_params())), model


def _note(progress, message: str) -> None:
    """A warning for the user: on the driver's console (this worker's own log is not shown
    there), and in this worker's log."""
    logger.warning(message)
    progress.note.remote(message)  # not waited for: a lost actor never fails the run


def _train(
    model, job: WorkerJob, blocks: RowBlocks, progress, device, session, storage_path
) -> list[dict]:
    settings: TrainSettings = job.train
    rank, world = session.rank, session.world
    distributed = world > 1 and dist.is_initialized()
    loss_fn = build_loss(job.loss, job.loss_params).to(device)
    sharded = isinstance(model, ShardedModel)  # see _sharded_job
    sparse_names = sparse_parameter_names(model)
    dense_names = [n for n, p in model.named_parameters() if n not in sparse_names]
    profile = StepProfile(settings.profile, device)
    net, sync = model, None
    if sharded:
        sync = _DenseGradSum(model)
    elif distributed:
        if dense_names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sparse_names)
            net = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
            )
            if settings.profile:
                net.register_comm_hook(None, timed_allreduce_hook(profile))
        if sparse_names:
            sync = SparseGradSync([model.get_parameter(n) for n in sparse_names])

    optimizers = build_optimizers(model, job.optimizer_type, settings.lr, settings.weight_decay)
    start_epoch, history = _resume(model, optimizers, job, session, progress, device)
    batch_size, group_size = settings.batch_size, settings.num_sampling_users
    if sharded:  # the global batch, split over the ranks
        batch_size, group_size = rank_batch(batch_size, group_size, world)
    collator = Collator(
        num_items=job.num_items,
        batch_size=batch_size,
        num_sampling_users=group_size,
        negative_sampling=settings.negative_sampling,
    )
    if sharded:

        def loss_of(batch, step, *, epoch, first_step):
            # ``step`` counts the epoch's steps; the model's own terms get the run's (its
            # schedules run over the run's updates)
            return sharded_batch_loss(
                model,
                batch,
                device,
                loss_fn,
                job.loss_params,
                settings.negative_sampling,
                collator.num_sampling_users > collator.batch_size,
                epoch,
                first_step + step,
            )

    else:
        bf16, compiled = settings.precision == "bf16", kernels.compiled(job.kernels)

        def loss_of(batch, step, *, epoch, first_step):
            loss = batch_loss(
                net,
                loss_fn,
                batch,
                device,
                bf16,
                compiled=compiled,
                epoch=epoch,
                step=first_step + step,
            )
            return loss, loss.detach()

    steps = agreed_steps(settings, collator, world, device)

    last_epoch = job.start_epoch + settings.num_epochs
    epochs = range(start_epoch + 1, last_epoch + 1)
    # Made ahead in a thread: fetching the next blocks overlaps the steps.
    data = (
        epoch_batches(
            blocks,
            collator,
            steps,
            (job.seed, epoch, rank),
            world,
            note=lambda m: _note(progress, m),
        )
        for epoch in epochs
    )
    with EpochPrefetcher(data) as prefetcher:
        for epoch in epochs:
            started = time.perf_counter()
            torch.manual_seed(_epoch_seed(job.seed, epoch, rank))
            optimizers.set_lr(
                *epoch_lrs(settings.lr, settings.lr_milestones, epoch, settings.decay_sparse_lr)
            )
            model.train()
            profile.restart()
            loss_total, users = _run_steps(
                functools.partial(loss_of, epoch=epoch, first_step=(epoch - 1) * steps),
                unwrapped(net),
                optimizers,
                sync,
                prefetcher.next_epoch(),
                device,
                sparse_names,
                profile,
            )
            loss_sum = torch.stack([loss_total, torch.tensor(float(users), device=device).double()])
            if distributed:
                dist.all_reduce(loss_sum)
            step_seconds = None
            if settings.profile:
                step_seconds = profile.epoch_seconds()
                step_seconds["batches_cpu"] = prefetcher.last_epoch_cpu_seconds
            loss_value = (loss_sum[0] / loss_sum[1].clamp(min=1)).item()
            if not np.isfinite(loss_value):
                raise FloatingPointError(f"epoch {epoch}: training loss is {loss_value}; lower lr")

            metrics = {"epoch": epoch, "last_epoch": last_epoch, "loss": loss_value, "seconds": 0.0}
            metrics.update(_memory_mb(distributed, device))
            if step_seconds is not None:
                metrics["profile"] = gathered(step_seconds, world if distributed else 1, device)
            if isinstance(sync, SparseGradSync):
                # Bytes this rank contributed to the sparse sync, against the dense gradients that
                # DDP would all-reduce for the same parameters.
                metrics["sync_bytes_per_step"] = sync.bytes_sent / steps
                metrics["dense_sync_bytes_per_step"] = float(sync.dense_bytes)
                sync.bytes_sent = 0
            # Every eval_freq epochs, and the last epoch: a run's (and a Tune trial's) last
            # report always carries its metrics.
            if (
                job.eval is not None
                and settings.eval_freq > 0
                and (epoch % settings.eval_freq == 0 or epoch == last_epoch)
            ):
                model.eval()
                metrics.update(_evaluate(model, job, device, session))
            evaluated = "eval_users" in metrics
            wants_checkpoint = epoch == last_epoch or (
                settings.checkpoint_freq > 0 and epoch % settings.checkpoint_freq == 0
            )
            if wants_checkpoint and job.checkpoint_prefix:
                metrics["snapshot"] = epoch_file(job.checkpoint_prefix, epoch)
            metrics["seconds"] = time.perf_counter() - started
            history.append(metrics)
            if rank == 0:
                progress.append.remote(metrics)  # not waited for: only the console needs it
            if wants_checkpoint:  # what Ray Train (and Tune) must see
                _report_checkpoint(metrics, history, model, optimizers, job, session, storage_path)
            elif evaluated:
                session.report(metrics)
    return history


def _run_steps(loss_of, model, optimizers, sync, batches, device, sparse_names, profile):
    """One epoch's training steps, their phases timed by ``profile``; returns the loss summed
    over its users (on the device: no sync per step) and the number of users.

    ``loss_of(batch, step)`` gives the tensor to call ``backward`` on and the batch's mean
    loss (the global batch's with sharded tables), ``step`` counting the epoch's steps from 0;
    ``sync`` adds up the gradients over the ranks."""
    loss_total, users = torch.zeros((), dtype=torch.float64, device=device), 0
    for step, batch in enumerate(profile.timed(batches, "data")):
        optimizers.zero_grad()
        with profile.phase("forward"):
            loss, value = loss_of(batch, step)
        with profile.phase("backward"):
            loss.backward()
        if step == 0:
            _check_gradients_are_where_expected(model, sparse_names)
        if sync is not None:
            profile.barrier()
            with profile.phase("sparse_sync"):
                sync.synchronize()
        with profile.phase("optimizer"):
            optimizers.step()
        loss_total += value * batch.shape[0]
        users += batch.shape[0]
    return loss_total, users


class _DenseGradSum:
    """The gradient sync of a sharded model: its dense layers' gradients summed over the ranks
    (the tables' rows have their gradients where they live), and its replicas' averaged in the
    2D layout."""

    def __init__(self, model: ShardedModel):
        self.model = model

    def synchronize(self) -> None:
        self.model.synchronize_grads()


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed that depends only on (seed, epoch, rank): a run resumed at an epoch boundary
    draws the same data order and dropout noise as one that never stopped."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**31


def _memory_mb(distributed: bool, device) -> dict[str, float]:
    """The largest of any rank's process so far, in MB: ``peak_rss_mb``, the peak resident
    memory (``VmHWM``: ``ru_maxrss`` would carry the raylet's across the worker's exec), and
    ``private_rss_mb``, the private part resident now (``RssAnon``: the heap, without the
    object store's shared pages that the rank has read its rows from). Where ``/proc`` is
    absent: ``ru_maxrss``, and no private figure (NaN)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        values = [int(fields[key].split()[0]) / 1024.0 for key in ("VmHWM", "RssAnon")]
    except (OSError, KeyError):
        # macOS, the one platform here without /proc, gives ru_maxrss in bytes.
        values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, float("nan")]
    memory = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    peak, private = memory.tolist()  # one device-to-host copy
    return {"peak_rss_mb": peak, "private_rss_mb": private}


def _resume(model, optimizers, job: WorkerJob, session, progress, device) -> tuple[int, list[dict]]:
    """After a worker failure, or when a run of the same name and storage is started again (its
    driver was lost), Ray Train starts the loop with the run's last checkpoint: load this
    rank's part of its weights and optimizer states (from any world size), and return its
    epoch and the records of the epochs up to it. Otherwise start from the job: its epoch, its
    optimizer states, no records."""
    checkpoint, rank = session.checkpoint(), session.rank
    if checkpoint is None and job.weights is not None:  # continues a sharded run's model
        snapshot = _read_weights(job.weights, model, optimizers)
        model.load_state_dict(snapshot.model_state)
        optimizers.load_state_dict(snapshot.optimizer_state)
        return job.start_epoch, []
    if checkpoint is None:
        state = job.optimizer_state
        if isinstance(model, ShardedModel):
            state = sharded_optimizer_state(state, optimizers, model)
        optimizers.load_state_dict(state)
        return job.start_epoch, []
    snapshot, history = read_restorable(
        checkpoint,
        model,
        optimizers,
        everyone=functools.partial(_everyone, session=session, device=device),
        # each rank reads its own files of a sharded model, and its errors; a whole one, rank 0's
        note=functools.partial(_note, progress)
        if rank == 0 or isinstance(model, ShardedModel)
        else None,
    )
    model.load_state_dict(snapshot.model_state)
    optimizers.load_state_dict(snapshot.optimizer_state)
    if rank == 0:
        _note(progress, f"resuming from the checkpoint of epoch {snapshot.epoch}")
    return snapshot.epoch, history


def _everyone(ok: bool, session, device) -> bool:
    """Whether ``ok`` holds on every rank (a collective where the run has several)."""
    if session.world == 1 or not dist.is_initialized():
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _read_weights(checkpoint: ray.train.Checkpoint, model, optimizers=None):
    """The snapshot of ``checkpoint`` (an earlier sharded run's) laid out for this rank's
    sharded ``model`` (and its ``optimizers``): each rank reads its rows from the shards that
    hold them, one file at a time (only those downloaded from remote storage)."""
    return read_checkpoint_at(checkpoint, model, optimizers)[0]


def _check_gradients_are_where_expected(model, sparse_names: list[str]) -> None:
    """A parameter with a sparse gradient that was not detected as sparse would be averaged
    by nobody (or crash DDP): refuse to go on."""
    for name, param in model.named_parameters():
        if param.grad is not None and param.grad.is_sparse and name not in sparse_names:
            raise RuntimeError(
                f"parameter {name!r} has a sparse gradient but is not the weight of an "
                "nn.Embedding/EmbeddingBag(sparse=True); use those modules for sparse lookups"
            )


def _evaluate(model, job: WorkerJob, device, session) -> dict:
    """Metric means over all evaluation users: each rank scores its own share of them (dealt
    out once, by the launcher's ``EvalSplit``), and the sums and counts are added up. A
    sharded ``model``'s ranks score their items for every rank's users (collectives: every
    rank takes part in as many batches as the rank of the most)."""
    settings: EvalSettings = job.eval
    metrics, k = list(settings.metrics), settings.num_recommendations
    compiled = kernels.compiled(job.kernels)
    shard, world = session.eval_shard(), session.world
    tables = shard.iter_batches(batch_size=settings.batch_size, batch_format="pyarrow")
    batches = ((rows_from_arrow(t), rows_from_arrow(t, "target_")) for t in tables)
    if isinstance(model, ShardedModel):  # the top k merged from the owners' top k
        sums, count = sharded_eval_sums(model, list(batches), metrics, k, device, compiled=compiled)
    else:
        sums, count = batches_metric_sums(
            model, batches, metrics, k, job.num_items, device, compiled=compiled
        )
    totals = torch.tensor([*sums, count], dtype=torch.float64, device=device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(totals)
    totals = totals.cpu().numpy()
    return metric_means(totals[:-1], int(totals[-1]), metrics)


def _report_checkpoint(
    metrics: dict, history: list[dict], model, optimizers, job: WorkerJob, session, storage_path
) -> None:
    """Every rank reports ``metrics`` with its part of the checkpoint of ``metrics["epoch"]``
    (see ``training.checkpoint``: a sharded model's ranks each their shard, rank 0 the
    snapshot and the records), which Ray Train uploads into one folder of the run's storage,
    ``epoch_<N>``, and keeps for restarts, deleting the local folders (in-process, the folder
    is the checkpoint: ``session``). The user's own copy (``metrics["snapshot"]``, named by
    model_checkpoint_prefix) is then exported from the uploaded one by rank 0: a whole
    snapshot is copied (within one bucket, by the store itself), shards are assembled into one
    file."""
    epoch = metrics["epoch"]
    folder = tempfile.mkdtemp(prefix="recoder-dist-ckpt-")
    write_checkpoint(folder, job, model, optimizers, epoch, history, session.rank)
    if not os.listdir(folder):  # a rank with no part of it
        os.rmdir(folder)
        folder = None
    session.report(metrics, folder, name=f"epoch_{epoch}")
    if "snapshot" not in metrics:
        return
    if isinstance(model, ShardedModel):
        dist.barrier()  # a rank's report returns once its own files are uploaded: all are now
    if session.rank == 0:
        uploaded = session.checkpoint()  # the persisted checkpoint, once report returns
        export_snapshot(_location(uploaded, storage_path), metrics["snapshot"])


def _location(checkpoint: ray.train.Checkpoint, storage_path: str) -> str:
    """The location (a path or a URI) of ``checkpoint``, which lives in the run's storage
    (``storage_path``) or, in-process, in a local folder."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return storage.with_path(storage_path, checkpoint.path)
