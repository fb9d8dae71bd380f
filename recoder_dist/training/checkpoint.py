"""A training run's checkpoint folder: the model's snapshot at an epoch and the records of the
epochs up to it (a restarted run returns the whole run's records).

Two layouts, told apart by their files:
- one snapshot of the whole model (``SNAPSHOT_FILE``), written by rank 0: runs whose ranks hold
  whole tables, and the in-process run;
- a sharded run's: one file per rank with its rows (``recoder_dist.sharded.checkpoint``),
  beside a snapshot of the rest (``SHARDED_FILE``: class, hyper-parameters, epoch, seeds, no
  weights). No rank ever holds the whole model to write it.

Either layout reads as the whole model, or as any rank's shard of any world size.
"""

from __future__ import annotations

import json
import os
import posixpath
import re

import pyarrow.fs
import ray.train

from recoder_dist import storage
from recoder_dist.sharded.checkpoint import load_shards, save_shard, shard_files
from recoder_dist.sharded.model import ShardedModel
from recoder_dist.sharded.state import sharded_optimizer_state, sharded_state, table_rows
from recoder_dist.training.snapshot import Snapshot, copy_snapshot, load_snapshot, save_snapshot

SNAPSHOT_FILE = "snapshot.pt"
SHARDED_FILE = "sharded_snapshot.pt"
HISTORY_FILE = "history.json"
_EPOCH_FOLDER = re.compile(r"epoch_(\d+)")  # the run's checkpoints (see worker_loop)


def write_checkpoint(
    folder: str, job, model, optimizers, epoch: int, history: list[dict], rank: int
) -> None:
    """Writes this rank's part of the checkpoint of ``epoch`` into ``folder``: each rank of a
    sharded ``model`` its shard (of the first group's, in the 2D layout: the others hold
    replicas of them); rank 0 the snapshot (whole, or without weights beside the shards) and
    the records. ``job`` is the run's ``WorkerJob``."""
    sharded = isinstance(model, ShardedModel)
    if sharded and model.first_replica():
        save_shard(folder, model, optimizers)
    if rank != 0:
        return
    if sharded:  # the job's model: the class and hyper-parameters, no weights (see _sharded_job)
        snapshot = job.snapshot(job.model, epoch, {})
        save_snapshot(snapshot, os.path.join(folder, SHARDED_FILE))
    else:
        snapshot = job.snapshot(model, epoch, optimizers.state_dict())
        save_snapshot(snapshot, os.path.join(folder, SNAPSHOT_FILE))
    with open(os.path.join(folder, HISTORY_FILE), "w") as f:
        json.dump(history, f)


def read_checkpoint(folder: str, model=None, optimizers=None) -> tuple[Snapshot, list[dict]]:
    """The snapshot in ``folder``, its weights and optimizer states laid out for ``model``: a
    ShardedModel's rows (``optimizers`` are its ``Optimizers``), or the whole model
    (``model`` None or whole); and the records of its epochs.

    Raises:
        FileNotFoundError: a folder with no snapshot.
        ValueError: damaged or incomplete files.
    """
    history = []  # a checkpoint of a recoder_dist that kept no records
    records = os.path.join(folder, HISTORY_FILE)
    if os.path.exists(records):
        with open(records) as f:
            try:
                history = json.load(f)
            except ValueError as e:  # a truncated or altered file
                raise ValueError(f"{records} is damaged: {e}") from None
    sharded_model = isinstance(model, ShardedModel)
    shards = shard_files(folder)
    if shards:
        snapshot = load_snapshot(os.path.join(folder, SHARDED_FILE))
        if sharded_model:
            layout = dict(world=model.world, rank=model.rank, tables=table_rows(model))
        else:
            layout = dict(world=1, rank=0)
        snapshot.model_state, snapshot.optimizer_state = load_shards(shards, **layout)
        return snapshot, history
    snapshot = load_snapshot(os.path.join(folder, SNAPSHOT_FILE))
    if sharded_model:
        snapshot.model_state = sharded_state(snapshot.model_state, model)
        if optimizers is not None:  # an evaluation reads the weights only
            snapshot.optimizer_state = sharded_optimizer_state(
                snapshot.optimizer_state, optimizers, model
            )
    return snapshot, history


def export_snapshot(location: str, destination: str) -> str:
    """The whole model of the checkpoint at ``location`` (a path or a URI) as one snapshot file
    at ``destination``, for the paths that read single files (``init_from_model_file``,
    recsys-recoder's users): the snapshot copied as it is (within one bucket, by the store), or
    assembled from the shards in this process, which then holds the whole model."""
    location = storage.normalized(location)
    if storage.is_file(storage.join(location, SNAPSHOT_FILE)):
        return copy_snapshot(storage.join(location, SNAPSHOT_FILE), destination)
    fs, path = storage.retrying_filesystem(location)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as folder:  # downloaded
        return save_snapshot(read_checkpoint(folder)[0], destination)


def earlier_checkpoints(checkpoint: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The run's checkpoints before ``checkpoint`` (its ``epoch_N`` siblings in the run's
    storage with a lower N), newest first: where a run goes back to when its last checkpoint
    is damaged (Ray Train keeps the last two)."""
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = posixpath.split(path)
    latest = _EPOCH_FOLDER.fullmatch(name)
    if latest is None:
        return []
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(parent)):
        match = _EPOCH_FOLDER.fullmatch(posixpath.basename(info.path))
        directory = info.type == pyarrow.fs.FileType.Directory
        if directory and match and int(match[1]) < int(latest[1]):
            found.append((int(match[1]), info.path))
    return [ray.train.Checkpoint(p, filesystem=fs) for _, p in sorted(found, reverse=True)]
