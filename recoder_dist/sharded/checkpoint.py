"""A sharded model's checkpoint, written shard by shard: each rank writes one file with its rows
of every sharded table (item tables, and MatrixFactorization's user table) and of their
optimizer states, and its copy of the rest (dense layers, step
counts: the same on every rank). No rank gathers the whole model to save it.

The files of a checkpoint load on any number of ranks (resharding: each rank takes its rows
under its own layout from every saved shard, one file in memory at a time), and in one process
as the whole model (world 1), which is how a checkpoint becomes today's single-file snapshot.
Each file carries a checksum of its content (``recoder_dist.checksum``), verified on reading.
"""

from __future__ import annotations

import math
import os
import re

import torch

from recoder_dist.checksum import verify, with_checksum
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.state import map_optimizer_rows, table_names, table_rows

FORMAT = "recoder_dist.shard"
VERSION = 2  # 1 (session 11) had item tables only: "num_items" for all, read as such
_NAME = re.compile(r"shard_(\d+)_of_(\d+)\.pt")


def shard_file(rank: int, world: int) -> str:
    """The file name of rank ``rank``'s shard of a ``world``-rank checkpoint."""
    return f"shard_{rank:05d}_of_{world:05d}.pt"


def shard_files(folder: str) -> list[str]:
    """The shard files in ``folder``, in rank order (empty when it holds none).

    Raises:
        ValueError: shards of different world sizes, or some rank's file missing.
    """
    return [os.path.join(folder, name) for name in shard_names(os.listdir(folder), folder)]


def shard_names(names, where: str) -> list[str]:
    """The shard files among the file ``names`` of one folder (``where``, for errors), in rank
    order: a folder's listing, local or in a bucket, checked before any file is read.

    Raises:
        ValueError: shards of different world sizes, or some rank's file missing.
    """
    found = sorted((int(m[2]), int(m[1]), name) for name in names if (m := _NAME.fullmatch(name)))
    if not found:
        return []
    worlds = {world for world, _, _ in found}
    ranks = [rank for _, rank, _ in found]
    if len(worlds) > 1 or ranks != list(range(found[0][0])):
        raise ValueError(
            f"{where} holds shards {ranks} of world sizes {sorted(worlds)}: a checkpoint needs "
            "one file for every rank of one run"
        )
    return [name for _, _, name in found]


def shards_to_read(saved_world: int, world: int, rank: int) -> list[int]:
    """The saved ranks (of ``saved_world``) whose files may hold rows of rank ``rank`` of
    ``world``: row ``i`` was saved by rank ``i % saved_world`` and is now rank ``i % world``'s,
    and some ``i`` satisfies both exactly when the two ranks agree modulo the worlds' greatest
    common divisor (the Chinese remainder theorem). One file when the world is the saved one;
    every file for ``world=1``."""
    step = math.gcd(saved_world, world)
    return list(range(rank % step, saved_world, step))


def save_shard(folder: str, model, optimizers) -> str:
    """Writes this rank's shard of ``model`` (a ``ShardedModel``) and of ``optimizers`` (its
    ``Optimizers``) into ``folder``; returns the file's path. On a GPU the shard is copied to
    the CPU first (its size, not the model's)."""
    tables = table_names(model)
    first = next(iter(tables.values()))
    rank, world = first.rank, first.ownership.world
    row_entries: list[list] = []

    def per_row(value, table, key):
        row_entries.append([*key, table.num_items])
        return value.cpu()

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "rank": rank,
        "world": world,
        # state_dict keys (a tied table under each of its names) -> the whole table's rows
        "tables": table_rows(model),
        "model_state": {key: value.cpu() for key, value in model.state_dict().items()},
        "optimizer_state": map_optimizer_rows(
            _cpu(optimizers.state_dict()), optimizers, model, per_row
        ),
        "optimizer_rows": row_entries,  # [kind, index, name, rows] of the per-row states
    }
    path = os.path.join(folder, shard_file(rank, world))
    torch.save(with_checksum(payload), path)
    return path


def load_shards(
    paths: list[str], world: int, rank: int, tables: dict[str, int] | None = None
) -> tuple[dict, dict]:
    """The model state and the optimizers' state of rank ``rank`` of ``world`` (any world
    size; ``world=1`` gives the whole model) from the shard files ``paths`` of one checkpoint,
    read one at a time. Each table's rows are laid out as ``Ownership(its rows, world)``.

    Args:
        paths: the checkpoint's shard files (``shard_files``).
        world: the ranks of the layout to load into.
        rank: the rank whose rows to load.
        tables: the tables expected (``state_dict`` key -> rows of the whole table), those of
            the model being loaded; None: the first file's.

    Raises:
        ValueError: a file that is not a shard, a shard of other tables, or rows missing.
    """
    model_state: dict | None = None
    optimizer_state: dict | None = None
    filled: dict[str, int] = {}
    for path in paths:
        shard = _read(path)
        if tables is None:
            tables = shard["tables"]
        if shard["tables"] != tables:
            raise ValueError(f"{path} is a shard of tables {shard['tables']}, not of {tables}")
        if model_state is None:  # the rest is the same on every rank: the first file's
            model_state, optimizer_state = _empty_rows(shard, world, rank)
        placed = {}  # rows -> (this shard's rows that are mine, their local index)
        for rows in {*tables.values(), *(entry[3] for entry in shard["optimizer_rows"])}:
            ownership = Ownership(rows, world)
            ids = Ownership(rows, shard["world"]).global_ids(shard["rank"])
            mine = ownership.owner(ids) == rank
            placed[rows] = mine, ownership.local_index(ids[mine])
        for key, rows in tables.items():
            mine, local = placed[rows]
            model_state[key][local] = shard["model_state"][key][mine]
            filled[key] = filled.get(key, 0) + int(mine.sum())
        for kind, index, name, rows in shard["optimizer_rows"]:
            mine, local = placed[rows]
            saved = shard["optimizer_state"][kind]["state"][index][name]
            optimizer_state[kind]["state"][index][name][local] = saved[mine]
    for key, rows in (tables or {}).items():
        expected = Ownership(rows, world).rows_of(rank)
        if filled.get(key, 0) != expected:
            raise ValueError(
                f"the shards gave {filled.get(key, 0)} of rank {rank}'s {expected} rows of {key}"
            )
    if model_state is None:
        raise ValueError("no shard to load")
    return model_state, optimizer_state


def _read(path: str) -> dict:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler
        raise ValueError(f"{path} is not a readable shard: {type(e).__name__}: {e}") from None
    if not isinstance(shard, dict) or shard.get("format") != FORMAT:
        raise ValueError(f"{path} is not a recoder_dist shard")
    verify(shard, path)
    if shard.get("version") == 1:  # every table had the catalog's rows
        rows = shard["num_items"]
        shard["tables"] = {key: rows for key in shard["tables"]}
        shard["optimizer_rows"] = [[*entry, rows] for entry in shard["optimizer_rows"]]
    elif shard.get("version") != VERSION:
        raise ValueError(f"{path} is shard format version {shard.get('version')}, not {VERSION}")
    return shard


def _empty_rows(shard: dict, world: int, rank: int) -> tuple[dict, dict]:
    """The first shard's states, copied out of its file, with a fresh tensor of rank
    ``rank``'s rows (of ``world``) in place of every per-row one (a tied table's names share
    one)."""

    def rows_of(rows: int) -> int:
        return Ownership(rows, world).rows_of(rank)

    tables: dict[int, torch.Tensor] = {}  # by the saved tensor's storage: ties stay tied
    model_state = {}
    for key, value in shard["model_state"].items():
        if key not in shard["tables"]:
            model_state[key] = value.clone()
            continue
        storage_id = value.untyped_storage().data_ptr()
        if storage_id not in tables:
            rows = rows_of(shard["tables"][key])
            tables[storage_id] = value.new_empty((rows, *value.shape[1:]))
        model_state[key] = tables[storage_id]
    per_row = {(kind, index, name): rows for kind, index, name, rows in shard["optimizer_rows"]}
    optimizer_state = {}
    for kind, state in shard["optimizer_state"].items():
        if state is not None:
            entries = {
                index: {
                    name: value.new_empty((rows_of(per_row[kind, index, name]), *value.shape[1:]))
                    if (kind, index, name) in per_row
                    else (value.clone() if torch.is_tensor(value) else value)
                    for name, value in entry.items()
                }
                for index, entry in state["state"].items()
            }
            state = {**state, "state": entries}
        optimizer_state[kind] = state
    return model_state, optimizer_state


def _cpu(state):
    """``state`` (nested dicts and lists) with its tensors on the CPU."""
    if torch.is_tensor(state):
        return state.cpu()
    if isinstance(state, dict):
        return {key: _cpu(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_cpu(value) for value in state]
    return state
