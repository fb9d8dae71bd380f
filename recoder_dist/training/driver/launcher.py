"""Starting (or joining) Ray and running the worker loop with Ray Train (or in this process)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid

import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from recoder_dist import storage
from recoder_dist.data.epoch_order import RowBlocks
from recoder_dist.training.checkpoint import read_checkpoint
from recoder_dist.training.config import WorkerJob
from recoder_dist.training.driver.lease import RunLease
from recoder_dist.training.driver.progress import ProgressPrinter, epochs_between_lines
from recoder_dist.training.driver.storage_check import check_storage_reaches_workers
from recoder_dist.training.resources import nodes_for_workers, split_cpus
from recoder_dist.training.snapshot import Snapshot
from recoder_dist.training.worker.session import ProcessSession
from recoder_dist.training.worker.worker_loop import run_loop, worker_loop

logger = logging.getLogger(__name__)


# The Train controller picks up each worker's report on its polling tick (2 s by default);
# on a local machine a shorter tick costs nothing and ends short runs seconds sooner.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}}


def ensure_ray(*, verbose: bool = False) -> None:
    """Connects to ``RAY_ADDRESS`` when set, else starts a local embedded Ray. With
    ``verbose``, Ray's own logs (the workers' included) reach this console too; otherwise they
    stay in Ray's log files. A no-op when Ray is up already."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**_console_settings(verbose))
        if not verbose:
            _quiet_ray_data_console()
    else:
        init_local_ray(verbose=verbose)


def _quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (each dataset that this process executes, e.g. reading the
    training rows) stay in its log file, off the console."""
    import ray.data  # sets up Ray Data's logging

    ray.data.DataContext.get_current().print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.WARNING)
            # The launcher turns progress bars off for the datasets it runs on; Ray Data warns
            # about that when one of them runs in this process (num_workers=0).
            handler.addFilter(_drop_progress_bar_notice)
            # A task's error is logged with its whole traceback as the dataset aborts, then
            # raised to whoever executes the dataset: once is enough (the log file keeps it).
            handler.addFilter(_drop_task_errors)


def _drop_progress_bar_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def _drop_task_errors(record: logging.LogRecord) -> bool:
    """Drops what Ray Data logs of an error that it then raises: the aborting task's error
    and ``ray.data.exceptions``' notes as the error propagates. Errors that it logs and goes
    on from (blocks skipped under ``max_errored_blocks``) stay on the console."""
    if record.name == "ray.data.exceptions":
        return False
    return "Dataset execution will now abort" not in record.getMessage()


def init_local_ray(*, verbose: bool = False, **kwargs) -> None:
    """Starts a local embedded Ray tuned for this library (``kwargs`` go to ``ray.init``)."""
    # The dashboard stays on: it serves the state API, through which a sweep's driver
    # (recoder_dist.training.driver.release) and Ray Train's PlacementGroupCleaner see that a run's
    # controller has died (a Tune trial stopped by its scheduler kills it) and free the run's
    # CPUs. Without it they stay reserved for good, and the next trial waits for them forever.
    for key, value in _console_settings(verbose).items():
        kwargs.setdefault(key, value)
    if not verbose:
        # Ray >= 2.59 turns token authentication on for a new local cluster, and says so with a
        # warning that this local cluster makes no decision about. Ray's console handlers hang
        # on its top logger, "ray", whichever of its modules logs.
        for handler in logging.getLogger("ray").handlers:
            handler.addFilter(_drop_token_auth_notice)
    ray.init(runtime_env=LOCAL_RUNTIME_ENV, **kwargs)
    if not verbose:
        _quiet_ray_data_console()


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def _console_settings(verbose: bool) -> dict:
    """Workers' output (Ray Data's and Ray Train's logs, which are in Ray's log files anyway)
    reaches the driver's console only when verbose."""
    return {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def gpus_for(use_cuda: bool, in_process: bool = False) -> bool:
    """Whether work that asks for GPUs (``use_cuda``) gets them. ``use_cuda=True`` means GPUs
    where present: in this process (``in_process``) or on the local Ray when it has them; on a
    cluster reached at ``RAY_ADDRESS`` always, since its autoscaler may add GPU nodes on
    demand. Without any, the work runs on CPU, with a warning (rather than waiting for GPUs
    that never come)."""
    if not use_cuda:
        return False
    ensure_ray()
    if in_process:
        present = torch.cuda.is_available()
    elif os.environ.get("RAY_ADDRESS"):
        return True
    else:
        present = cluster_gpus() > 0
    if not present:
        logger.warning("use_cuda=True but no GPU is present here: running on CPU")
    return present


def run_job(
    job: WorkerJob,
    datasets: dict,
    train_blocks: RowBlocks | None = None,
    *,
    num_workers: int,
    cpus_per_worker: float | None,
    storage_path: str | None,
    run_name: str | None = None,
    max_failures: int = 0,
    callbacks: list | None = None,
    backend: str | None = None,
) -> RunOutput:
    """Runs ``job`` on ``num_workers`` Ray Train workers (in this process when 0, which the
    job must say too), training on ``train_blocks`` and evaluating the users of
    ``datasets["eval"]`` (a materialized dataset, dealt out to the workers once by
    :class:`EvalSplit`), logging rank 0's per-epoch progress on the driver as it arrives. Each
    worker holds ``cpus_per_worker`` CPUs; None splits the nodes' CPUs over the workers
    (``recoder_dist.training.resources``). ``backend`` is the process group's (Ray Train's
    ``TorchConfig``); None lets Ray choose where the workers run: NCCL for workers that hold a
    GPU, gloo otherwise.

    The run keeps its checkpoints under ``storage_path`` (a temporary folder on this machine
    when None) as ``run_name`` (a new name when None), in folders named by epoch; a run of that
    name that stopped there resumes from its last checkpoint (Ray Train restores it).

    Raises:
        ValueError: ``storage_path`` (or the default) is a folder that nodes which may run the
            workers cannot see.
    """
    if job.in_process != (num_workers == 0):
        raise ValueError(f"a job with in_process={job.in_process} on {num_workers} workers")
    ensure_ray()
    for dataset in datasets.values():
        dataset.context.print_on_execution_start = False
        dataset.context.enable_progress_bars = False
    num_epochs = job.train.num_epochs if job.train else 1
    if job.in_process:
        held = storage.join(storage_path, run_name) if run_name and storage_path else None
        return _run_here(job, datasets, train_blocks, num_epochs, held, callbacks)
    if cpus_per_worker is None:
        cpus_per_worker = split_cpus(nodes_for_workers(), num_workers, job.use_cuda)
    resources = {"CPU": cpus_per_worker}
    if job.use_cuda:
        resources["GPU"] = 1
    own_storage = storage_path is None
    if own_storage:
        storage_path = tempfile.mkdtemp(prefix="recoder-dist-run-")
    try:
        check_storage_reaches_workers(storage_path, default=own_storage)
    except ValueError:
        if own_storage:
            shutil.rmtree(storage_path, ignore_errors=True)
        raise
    name = run_name or f"recoder-dist-{uuid.uuid4().hex[:8]}"
    # A named run is held on the cluster while it goes on (two jobs must not train one run).
    held = storage.join(storage_path, run_name) if run_name else None
    with ProgressPrinter(epochs_between_lines(num_epochs), run=held) as progress, _leased(held):
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={
                "job": ray.put(job),
                "train_blocks": ray.put(train_blocks),
                "progress": progress.log,
                "storage_path": storage_path,
            },
            torch_config=TorchConfig(backend=backend),
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=job.use_cuda, resources_per_worker=resources
            ),
            datasets=datasets,
            dataset_config=EvalSplit(),
            run_config=RunConfig(
                name=name,
                **run_storage(storage_path),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=max_failures),
                callbacks=list(callbacks or []),
            ),
        )
        result = trainer.fit()
    return RunOutput(result.return_value, result.checkpoint, storage_path if own_storage else None)


def _run_here(job: WorkerJob, datasets: dict, train_blocks, num_epochs: int, held, callbacks):
    """``run_job`` in this process (not Ray Train's local mode: see ``training.worker.session``),
    reporting to Ray Tune when ``callbacks`` hold Tune's ``TuneReportCallback`` (the run is a
    trial's). Its checkpoints stay in local folders; the run ``held`` (a named run's storage
    and name) is held on the cluster while it goes on."""
    to_tune = False
    if callbacks:  # Ray Tune is imported only where a run may be a trial's
        from ray.tune.integration.ray_train import TuneReportCallback

        to_tune = any(isinstance(c, TuneReportCallback) for c in callbacks)
    session = ProcessSession(datasets.get("eval"), to_tune=to_tune)
    config = {"job": job, "train_blocks": train_blocks, "storage_path": None}
    with ProgressPrinter(epochs_between_lines(num_epochs), run=held) as progress, _leased(held):
        value = run_loop({**config, "progress": progress.log}, session)
    return RunOutput(value, session.checkpoint(), None, session)


def _leased(run: str | None):
    """A named run (``run``: its storage and name) is held in its storage too, against drivers
    of other clusters that share it (``training.driver.lease``); this cluster's are refused by the
    progress actor's name, taken first."""
    return RunLease(run) if run is not None else contextlib.nullcontext()


def run_storage(storage_path: str) -> dict:
    """``RunConfig``'s storage arguments (Ray Train's, and Ray Tune's): a URI with a filesystem
    that retries through outages, so that Ray's own checkpoint uploads, run-state writes and
    downloads outlast one as ours do (``recoder_dist.storage``); a local path as it is."""
    if not storage.is_uri(storage_path):
        return {"storage_path": storage_path}
    fs, path = storage.retrying_filesystem(storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


class EvalSplit(DataConfig):
    """Deals the evaluation users out to the workers once: worker r of W reads the r-th of W
    consecutive runs of the (materialized) dataset's blocks, so every user is scored by exactly
    one worker, and the same worker on every evaluation of the run. Ray Train's own split
    (``streaming_split(equal=True)``) would drop tail rows, and no split would send every row to
    every worker.

    ``DataConfig.configure`` is a DeveloperAPI (tests/test_training.py runs it on 1, 2 and 3
    workers against one worker's numbers, so a change in it fails there)."""

    def __init__(self):
        super().__init__(datasets_to_split=[])

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        shards = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            parts = dataset.split(world_size)  # no task: block references, in their order
            for shard, part in zip(shards, parts, strict=True):
                shard[name] = part.iterator()
        return shards


class RunOutput:
    """What a run left: ``value``, what rank 0's loop returned (a training run's records, one
    per epoch, or an evaluation's results), and, for training, ``checkpoint``, the last one
    (a ``ray.train.Checkpoint``), until ``discard``: in the run's storage, or for a run in this
    process (``session``), a local folder."""

    def __init__(self, value, checkpoint, own_storage: str | None, session=None):
        self.value = value
        self.checkpoint = checkpoint
        self._own_storage = own_storage
        self._session = session

    def final_snapshot(self) -> Snapshot:
        """The snapshot of the run's last checkpoint, wherever its storage is."""
        if self.checkpoint is None:
            raise RuntimeError("the training run ended without a final snapshot")
        with self.checkpoint.as_directory() as folder:  # a download from remote storage
            return read_checkpoint(folder)[0]

    def discard(self) -> None:
        """Deletes the run's temporary files."""
        if self._session is not None:
            self._session.discard()
        if self._own_storage:
            shutil.rmtree(self._own_storage, ignore_errors=True)
