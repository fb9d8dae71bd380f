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
import tempfile
from collections.abc import Callable

import pyarrow.fs
import ray.train

from recoder_dist import storage
from recoder_dist.sharded.checkpoint import load_shards, save_shard, shard_names, shards_to_read
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


def read_checkpoint(
    folder: str, model=None, optimizers=None, listing: list[str] | None = None
) -> tuple[Snapshot, list[dict]]:
    """The snapshot in ``folder``, its weights and optimizer states laid out for ``model``: a
    ShardedModel's rows (``optimizers`` are its ``Optimizers``), read from the shard files
    that hold them only (``shards_to_read``), or the whole model (``model`` None or whole); and
    the records of its epochs.

    ``listing``: the names of the checkpoint's files where ``folder`` holds only those that
    ``files_to_read`` names (a copy from remote storage); None: ``folder`` is the checkpoint.

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
    shards = shard_names(os.listdir(folder) if listing is None else listing, folder)
    if shards:
        snapshot = load_snapshot(os.path.join(folder, SHARDED_FILE))
        if sharded_model:
            layout = dict(world=model.world, rank=model.rank, tables=table_rows(model))
        else:
            layout = dict(world=1, rank=0)
        paths = [os.path.join(folder, name) for name in _shards_of(shards, model)]
        snapshot.model_state, snapshot.optimizer_state = load_shards(paths, **layout)
        return snapshot, history
    snapshot = load_snapshot(os.path.join(folder, SNAPSHOT_FILE))
    if sharded_model:
        snapshot.model_state = sharded_state(snapshot.model_state, model)
        if optimizers is not None:  # an evaluation reads the weights only
            snapshot.optimizer_state = sharded_optimizer_state(
                snapshot.optimizer_state, optimizers, model
            )
    return snapshot, history


def files_to_read(listing: list[str], model=None) -> list[str]:
    """The files of a checkpoint (its file names ``listing``) that ``read_checkpoint`` reads
    for ``model``: the snapshot, the records and, for a ShardedModel's rank, the shards that
    hold its rows (for any other reader, every shard)."""
    shards = shard_names(listing, "the checkpoint")
    if shards:
        wanted = {SHARDED_FILE, HISTORY_FILE, *_shards_of(shards, model)}
    else:
        wanted = {SNAPSHOT_FILE, HISTORY_FILE}
    return [name for name in listing if name in wanted]


def _shards_of(shards: list[str], model) -> list[str]:
    """Of a checkpoint's shard files (in rank order), those that hold rows of ``model``: a
    ShardedModel's rank's (``shards_to_read``), or every one for the whole model."""
    if not isinstance(model, ShardedModel):
        return list(shards)
    return [shards[saved] for saved in shards_to_read(len(shards), model.world, model.rank)]


def read_checkpoint_at(
    checkpoint: ray.train.Checkpoint, model=None, optimizers=None
) -> tuple[Snapshot, list[dict]]:
    """``read_checkpoint`` of a run's ``checkpoint`` where it lies (the run's storage, local or
    remote): from remote storage, only the files that ``model`` reads are downloaded (a rank of
    a sharded run, the shards of its rows: one file of the shards when it resumes on as many
    ranks as wrote them)."""
    fs, path = checkpoint.filesystem, checkpoint.path
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return read_checkpoint(path, model, optimizers)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    listing = [posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.File]
    local = pyarrow.fs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="recoder-dist-read-") as folder:
        for name in files_to_read(listing, model):
            pyarrow.fs.copy_files(
                posixpath.join(path, name),
                os.path.join(folder, name),
                source_filesystem=fs,
                destination_filesystem=local,
            )
        try:
            return read_checkpoint(folder, model, optimizers, listing)
        except ValueError as e:  # named where the files lie, not where they were copied
            raise ValueError(str(e).replace(folder, path.rstrip("/"))) from None


def read_restorable(
    checkpoint: ray.train.Checkpoint,
    model=None,
    optimizers=None,
    everyone: Callable[[bool], bool] = bool,
    note: Callable[[str], None] | None = None,
) -> tuple[Snapshot, list[dict]]:
    """``read_checkpoint_at`` of a run's ``checkpoint``; when a file of it is damaged (a
    checksum that does not match, a truncated file), of the newest earlier checkpoint of the
    run that reads whole (the run then repeats the epochs since, instead of starting over).

    Each rank of a run reads only its files, so the ranks agree on a checkpoint through
    ``everyone`` (whether a condition holds on every rank: a collective where the run has
    several ranks), called once for each checkpoint tried: one that some rank cannot read is
    nobody's. ``note`` is told of each checkpoint that this rank cannot read.

    Raises:
        ValueError: no checkpoint of the run reads whole on every rank (this rank's first
            error, or one that says so).
    """
    first_error = None
    for candidate in [checkpoint, *earlier_checkpoints(checkpoint)]:
        read = None
        try:
            read = read_checkpoint_at(candidate, model, optimizers)
        except ValueError as e:
            first_error = first_error or e
            if note is not None:
                note(f"cannot resume from {candidate.path}: {e}")
        if everyone(read is not None):
            return read
    raise first_error or ValueError(
        f"no checkpoint of the run at {posixpath.dirname(checkpoint.path)} reads whole on every "
        "rank (the others' errors are in their notes)"
    )


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
