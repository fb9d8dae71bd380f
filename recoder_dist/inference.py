"""Batch inference with Ray Data, to Parquet: the top-K items of every user of a prepared
split's part (``write_recommendations``), and every item's K most similar items
(``write_similar_items``).

The part's rows are read by the cluster (``UserRowFiles.ray_dataset``); the model (or its item
vectors) goes to the object store once, and so do the id maps, read there by a task: this
process holds neither rows nor ids. For recommendations a pool of actors each takes a copy of
the model (on a GPU each when asked), and ``map_batches`` streams user rows through them; for
similar items, tasks take slices of item numbers. The Parquet files are written by any node to
a URI, by tasks on this node to a local folder (other nodes may not see it), into a fresh
sibling of the output that replaces the output once complete: a second run replaces the first,
and a run that fails leaves the earlier output as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import ActorPoolStrategy

from recoder_dist import storage
from recoder_dist.data.local_files import on_this_node
from recoder_dist.data.ray_dataset import rows_from_arrow
from recoder_dist.similarity import item_vectors, similar_items_table, top_k_cosine
from recoder_dist.training.driver.launcher import ensure_ray, gpus_for
from recoder_dist.training.evaluation.scoring import recommend_top_k
from recoder_dist.utils import load_id_map

# Rows per block that the actors take at a time.
_ROWS_PER_BLOCK = 1024
# Items whose neighbours a task finds at once: 1024 x a catalog of 1M items is 4 GiB of scores.
_ITEMS_PER_BATCH = 1024


class _TopK:
    """A Ray Data actor: restores the model once, then scores batches of user rows."""

    def __init__(self, model, k: int, num_items: int, user_ids, item_ids, use_gpu: bool):
        import torch

        model, user_ids, item_ids = _fetched(model, user_ids, item_ids)
        gpu = use_gpu and torch.cuda.is_available()  # Ray gave this actor a GPU: it is cuda:0
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = model.to(self.device).eval()
        self.k, self.num_items = k, num_items
        self.user_ids, self.item_ids = user_ids, item_ids

    def __call__(self, table: pa.Table) -> pa.Table:
        # Users with no input items (an evaluation part may hold some) get no recommendation.
        table = table.filter(pc.greater(pc.list_value_length(table.column("items")), 0))
        rows = rows_from_arrow(table)
        if len(rows.users):
            items, valid = recommend_top_k(self.model, rows, self.num_items, self.k, self.device)
            items, valid = items.cpu().numpy(), valid.cpu().numpy()
        else:
            items, valid = np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=bool)
        lengths = valid.sum(1)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        flat = self.item_ids[items[valid]]
        return pa.table(
            {
                "user": pa.array(self.user_ids[rows.users]),
                "rank_items": pa.ListArray.from_arrays(offsets, pa.array(flat)),
            }
        )


def write_recommendations(
    recoder,
    prepared,
    output: str | os.PathLike,
    *,
    k: int,
    part: str,
    workers: int = 1,
    use_gpu: bool = False,
) -> int:
    """Writes ``user, rank_items`` (original ids, best first; the user's own items excluded)
    for every user of ``prepared.<part>`` with input items as Parquet files in ``output`` (a
    folder or a URI), replacing what was there; returns how many users. ``workers`` actors
    score them, with a GPU each when ``use_gpu``.

    Args:
        recoder: a ``Recoder`` holding the model.
        prepared: the split, as :func:`~recoder_dist.datasets.open_prepared` describes it.
        output: the folder (or URI) of the Parquet files; what it held is replaced once the
            new files are all written (a local folder by two renames; a URI's files are
            deleted, then the new ones copied in by the store).
        k: items per user.
        part: ``train``, ``validation`` or ``test``.
        workers: the actors that score.
        use_gpu: a GPU for each actor.

    Raises:
        ValueError: no such part, ``k`` below 1, a model for another number of items, or an
            output that is a file.
    """
    parts = {"train": prepared.train, "validation": prepared.validation, "test": prepared.test}
    if part not in parts:
        raise ValueError(f"part must be one of {sorted(parts)}, got {part!r}")
    files = parts[part]
    if files is None:
        raise ValueError(f"the prepared split has no {part} part")
    if k < 1:
        raise ValueError(f"--top-k must be >= 1, got {k}")
    if files.num_items != recoder.num_items:
        raise ValueError(
            f"the model scores {recoder.num_items} items; the split at {prepared.location} "
            f"has {files.num_items}: a checkpoint of another dataset"
        )
    output = _output_folder(output)
    ensure_ray()  # quietly: Ray Data would start it with its console logs
    use_gpu = gpus_for(use_gpu)
    rows = files.ray_dataset().select_columns(["user", "items", "values"])
    # The files' blocks (row groups) are large: smaller ones spread the users over the actors.
    rows = rows.repartition(target_num_rows_per_block=_ROWS_PER_BLOCK)
    # The id maps, read into the object store by a task on this node (which sees the split's
    # folder); the actors fetch them from there.
    read_ids = ray.remote(_ids_of).options(**on_this_node())
    ids = [read_ids.remote(prepared.id_map_path(kind)) for kind in ("user", "item")]
    model = ray.put(recoder.model)
    scored = rows.map_batches(
        _TopK,
        fn_constructor_args=(model, k, recoder.num_items, *ids, use_gpu),
        batch_size=256,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0,
    )
    return _replaced(output, lambda fresh: _write(scored, fresh))


def _neighbours(batch: dict, vectors, item_ids, k: int, use_gpu: bool) -> pa.Table:
    """A Ray Data task: a batch of item numbers' nearest items by cosine over the whole
    catalog, on the task's GPU when it holds one. Tasks, not actors: the vectors and ids are
    read from the object store without a copy, and a task holds its CPU (or GPU) only while it
    runs, so the reads and writes of the job are never starved by actors that hold every CPU
    of a small cluster."""
    import torch

    vectors, item_ids = _fetched(vectors, item_ids)
    gpu = use_gpu and torch.cuda.is_available()  # Ray gave this task a GPU: it is cuda:0
    rows = batch["id"]
    neighbours, similarities = top_k_cosine(
        vectors, vectors[rows], k, exclude=rows, device="cuda" if gpu else "cpu"
    )
    return similar_items_table(item_ids[rows], item_ids[neighbours], similarities)


def write_similar_items(
    recoder, prepared, output: str | os.PathLike, *, k: int, workers: int = 1, use_gpu=False
) -> int:
    """Writes ``item, similar_items, similarities`` for every item of the model's catalog: its
    ``k`` nearest other items by cosine over the model's item vectors (see
    :func:`~recoder_dist.similarity.item_vectors`), best first (equal cosines by the lower
    item number), in the prepared split's original item ids, as Parquet files in ``output``
    (replaced as ``write_recommendations`` replaces it); returns how many items. At most
    ``workers`` tasks at a time answer a slice of the catalog each, so a task holds
    ``_ITEMS_PER_BATCH x num_items`` scores; with ``use_gpu``, each on a GPU of its own.

    Raises:
        ValueError: ``k`` not in ``[1, num_items - 1]``, a model without item vectors or for
            another number of items, or an output that is a file.
    """
    vectors = item_vectors(recoder)
    num_items = len(vectors)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_items:
        raise ValueError(
            f"--top-k must be in [1, {num_items - 1}]: each of the {num_items} items has "
            f"{num_items - 1} other items, got {k!r}"
        )
    if prepared.train.num_items != num_items:
        raise ValueError(
            f"the model has {num_items} item vectors; the split at {prepared.location} has "
            f"{prepared.train.num_items} items: a checkpoint of another dataset"
        )
    output = _output_folder(output)
    ensure_ray()
    use_gpu = gpus_for(use_gpu)
    read_ids = ray.remote(_ids_of).options(**on_this_node())
    item_ids = read_ids.remote(prepared.id_map_path("item"))
    items = ray.data.range(num_items, override_num_blocks=max(1, -(-num_items // _ITEMS_PER_BATCH)))
    answered = items.map_batches(
        _neighbours,
        fn_args=(ray.put(vectors), item_ids, k, use_gpu),
        batch_size=_ITEMS_PER_BATCH,
        batch_format="numpy",
        concurrency=workers,
        num_gpus=1 if use_gpu else 0,
    )
    return _replaced(output, lambda fresh: _write(answered, fresh))


def _fetched(*values) -> list:
    """``values``, each ObjectRef among them replaced by its object."""
    return [ray.get(value) if isinstance(value, ray.ObjectRef) else value for value in values]


def _output_folder(output: str | os.PathLike) -> str:
    """``output`` normalized; a ValueError when it is a file."""
    output = storage.normalized(output)
    if storage.is_file(output):
        raise ValueError(f"the output {output} is a file, not a folder")
    return output


def _ids_of(id_map_path: str) -> np.ndarray:
    """The original ids of an id map file, in the order of their indices."""
    with storage.local_copy(id_map_path) as local:
        return np.asarray(list(load_id_map(local)))  # a map's keys are in index order


def _write(dataset, folder: str) -> int:
    """Writes ``dataset`` as Parquet files into ``folder`` (a new one); returns its rows, as
    the files' footers count them."""
    fs, path = storage.filesystem(folder)
    # A local folder is written by tasks on this node; a URI by any node's.
    remote_args = {} if storage.is_uri(folder) else on_this_node()
    dataset.write_parquet(path, filesystem=fs, ray_remote_args=remote_args)
    rows = 0
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                rows += pq.ParquetFile(f).metadata.num_rows
    return rows


def _replaced(output: str, write) -> int:
    """``write(fresh)`` into a fresh sibling folder of ``output``, which then takes the place of
    ``output``; returns what ``write`` returns. A failure deletes the fresh folder and leaves
    ``output`` as it was. Once replaced, the fresh folders that earlier runs left beside it
    (a driver lost mid-write) are deleted: an output has one writer at a time (another that
    writes it meanwhile fails, and leaves the output to this one)."""
    token = uuid.uuid4().hex[:8]
    fresh = storage.suffixed(output, f".tmp-{token}")
    try:
        result = write(fresh)
    except BaseException:
        _delete_folder(fresh)
        raise
    if storage.is_uri(output):
        _move_objects(fresh, output)
    else:
        os.makedirs(fresh, exist_ok=True)  # no rows: Ray Data may have written no file
        old = f"{output}.old-{token}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(output, old)
        os.rename(fresh, output)
        shutil.rmtree(old, ignore_errors=True)
    _delete_abandoned(output)
    return result


def _delete_abandoned(output: str) -> None:
    """Deletes the folders beside ``output`` that runs left mid-write (``<output>.tmp-*``, and
    locally ``<output>.old-*``)."""
    fs, path = storage.filesystem(output)
    if "/" not in path.rstrip("/"):  # a bucket itself: nothing can be beside it
        return
    parent, name = path.rstrip("/").rsplit("/", 1)
    selector = pafs.FileSelector(parent, allow_not_found=True)
    for info in fs.get_file_info(selector):
        left = info.base_name.startswith((f"{name}.tmp-", f"{name}.old-"))
        if info.type == pafs.FileType.Directory and left:
            _delete_folder(storage.with_path(output, info.path))


def _move_objects(fresh: str, output: str) -> None:
    """An object store has no rename: deletes what is under ``output``, then copies the objects
    under ``fresh`` there (the store copies them, nothing passes through here), then deletes
    ``fresh``. Between the two, ``output`` holds part of the new files, never old ones."""
    fs, source = storage.filesystem(fresh)
    _, target = storage.filesystem(output)
    infos = fs.get_file_info(pafs.FileSelector(source, recursive=True, allow_not_found=True))
    fs.delete_dir_contents(target, missing_dir_ok=True)
    for info in infos:
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, target + info.path[len(source) :])
    fs.delete_dir_contents(source, missing_dir_ok=True)
    with contextlib.suppress(OSError):
        fs.delete_dir(source)


def _delete_folder(folder: str) -> None:
    fs, path = storage.filesystem(folder)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)
