"""Where the worker loop runs, and whom it tells: a Ray Train worker's session, or this
process's (a run on no workers, ``num_workers=0``).

The loop asks its session for its rank and world, its device, the evaluation users dealt to
it, the checkpoint that it restarts from, and hands it each report (the epochs that evaluate
or checkpoint) with this rank's part of the checkpoint.

A run in this process does not go through Ray Train's local mode (``ScalingConfig(
num_workers=0)``): inside a Ray Tune trial, Ray Train refuses ``ray.train.get_context()`` and
``ray.train.report`` (a function trainable reports to Tune), and its local mode keeps no
callbacks and no storage anyway. So ``ProcessSession`` reports to Tune itself when the run is
a Tune trial's (``TuneReportCallback`` among the run's callbacks): the trial trains in its own
process, with no Train controller or worker process to start, and Tune keeps its checkpoints
in the trial's storage and hands the last one back when it restarts the trial.
"""

from __future__ import annotations

import os
import shutil

import ray.train
import ray.train.torch
import torch


class TrainSession:
    """A Ray Train worker's: its rank in the run's worker group, the evaluation shard that the
    launcher's ``EvalSplit`` dealt it, and Ray Train's checkpoints in the run's storage."""

    def __init__(self):
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.local_world = context.get_local_world_size()

    def cuda_device(self) -> torch.device:
        return ray.train.torch.get_device()

    def eval_shard(self):
        return ray.train.get_dataset_shard("eval")

    def checkpoint(self) -> ray.train.Checkpoint | None:
        """The run's last persisted checkpoint: at the loop's start, the one to resume from
        (after a worker failure, or a run of the same name started again); after a report
        that carried one, that one (in the run's storage)."""
        return ray.train.get_checkpoint()

    def report(self, metrics: dict, folder: str | None = None, name: str | None = None) -> None:
        """Reports ``metrics``; with ``name``, as the checkpoint of that name (its folder in the
        run's storage), of which ``folder`` holds this rank's part (None: no part). Ray Train
        uploads the folder and deletes it."""
        if folder is not None:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=name,
                delete_local_checkpoint_after_upload=True,
            )
        else:
            ray.train.report(metrics, checkpoint_dir_name=name)


class ProcessSession:
    """This process's: rank 0 of 1. The evaluation users are ``eval_dataset`` (a materialized
    Ray Dataset, or None); the checkpoints stay in local folders, the last one kept (the
    run's result), until ``discard``. With ``to_tune`` (the run is a Tune trial's), each report
    also goes to Tune with its checkpoint, and the run resumes from the checkpoint that Tune
    restored the trial with."""

    rank, world, local_world = 0, 1, 1

    def __init__(self, eval_dataset=None, to_tune: bool = False):
        self._eval = eval_dataset
        self._to_tune = to_tune
        self._last = None
        self._own = None  # the local folder of self._last, when it is one of this run's
        if to_tune:
            from ray import tune

            self._last = tune.get_checkpoint()

    def cuda_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def eval_shard(self):
        return self._eval

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return self._last

    def report(self, metrics: dict, folder: str | None = None, name: str | None = None) -> None:
        if self._to_tune:
            from ray import tune

            checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
            tune.report(metrics, checkpoint=checkpoint)  # Tune copies it to the trial's storage
        if folder is not None:
            self.discard()
            self._last, self._own = ray.train.Checkpoint.from_directory(folder), folder

    def discard(self) -> None:
        """Deletes the local folder of the last checkpoint."""
        if self._own is not None and os.path.isdir(self._own):
            shutil.rmtree(self._own, ignore_errors=True)
        self._own = None
