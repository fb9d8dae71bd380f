"""``prepare`` for event tables larger than one machine: read, grouped by user and split by the
cluster (Ray Data), written as the same files that :func:`~recoder_dist.datasets.prepare`
writes, which training reads (:func:`~recoder_dist.datasets.open_prepared`).

What passes through this process: the files' headers or footers, the sorted user and item ids
(8 bytes each; the id maps are built from them), and references and counts. Never the events
or the rows. Where the files are is where the work is pinned, and nowhere else: local input is
read by tasks on this node, and local output written by them, asking for no CPU (the head of a
cluster may advertise none); a URI is read and written by any node's tasks. The parts' files
go straight to their place under names of their own, and ``split.json`` then lists them, as
``prepare`` publishes (atomically: a failure halfway leaves the earlier split, and deletes the
files it wrote).

The split is drawn from seeded hashes of the ids (``draw_keys``), not from a random generator
that walks the table in order, so that it does not depend on how the cluster partitions the
table. The rule, after binarizing (events whose value is above ``positive_above``), dropping
repeated (user, item) pairs and users with fewer than ``min_items`` items:

* users are numbered ``0..n-1`` in the order of their ids; items likewise (with
  ``drop_unseen_items``, only the items of training users);
* strong split: test users are the ``num_test_users`` users with the smallest keys
  ``draw_keys(seed, user)``, validation users the next ``num_val_users``;
* a held-out user's target items are the ``floor(target_fraction * n)`` of its ``n`` items
  with the smallest ``draw_keys(seed, user, item)``;
* weak split: of each user's items in that order, the first ``floor(target_fraction * n)`` are
  test items, the next ``floor(val_fraction * n)`` validation items.

``prepare`` (in memory) draws with a sequential generator instead: the same seed gives a
different, equally random, split.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from recoder_dist import storage
from recoder_dist.data.local_files import on_this_node
from recoder_dist.data.parquet_rows import UserRowFiles, UserRowsWriter
from recoder_dist.datasets.prepare import (
    PreparedFiles,
    StrongSplitConfig,
    WeakSplitConfig,
    open_prepared,
    publish,
    write_id_maps,
)
from recoder_dist.datasets.splits import check_held_out_users

_PARQUET_SUFFIXES = (".parquet", ".pq")
# Bytes of input per block of the shuffle by user: small enough to spread over a cluster's
# cores, large enough that per-block costs stay small.
_BYTES_PER_BLOCK = 32 << 20
_PARTS = ("train", "validation", "test")
_TRAIN, _VALIDATION, _TEST = range(3)


def prepare_on_cluster(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    split: StrongSplitConfig | WeakSplitConfig,
    *,
    user_col: str = "user",
    item_col: str = "item",
    value_col: str | None = None,
    positive_above: float | None = None,
) -> PreparedFiles:
    """Builds the split of the event table at ``source`` on the cluster; writes it to
    ``out_dir`` (a folder or a URI) as ``prepare`` does.

    Args:
        source: a CSV (with a header) or Parquet file, a folder of them, a glob pattern
            (``events/part-*.csv``), or the same as a URI (``s3://bucket/events/*.parquet``).
            Local files are read on this node; URIs by the whole cluster.
        out_dir: where the split goes (earlier split's files replaced).
        split: a ``StrongSplitConfig`` or a ``WeakSplitConfig``.
        user_col, item_col: the columns of the ids: non-negative integers.
        value_col: the column of the events' values; None gives every event 1.
        positive_above: keep only events whose value is above this; None keeps every event.

    Returns:
        What ``open_prepared(out_dir)`` returns.

    Raises:
        FileNotFoundError: nothing at ``source``.
        ValueError: a file lacks a column or is not CSV/Parquet, an id is missing or not a
            non-negative integer, a value is not a finite number (each naming its file), no
            user has ``min_items`` events, or ``positive_above`` is given without
            ``value_col``.
    """
    import ray
    import ray.data

    from recoder_dist.training.driver.launcher import ensure_ray

    if type(split) not in (StrongSplitConfig, WeakSplitConfig):
        raise TypeError(f"split must be a StrongSplitConfig or WeakSplitConfig, got {split!r}")
    if positive_above is not None and value_col is None:
        raise ValueError("positive_above needs value_col: without values every event is 1")
    columns = {"user": user_col, "item": item_col}
    if value_col is not None:
        columns["value"] = value_col
    paths = _input_files(source)
    parquet = _check_headers(paths, list(dict.fromkeys(columns.values())))
    location = storage.normalized(out_dir)
    ensure_ray()
    try:
        events = _read(paths, parquet, columns, positive_above)
        rows = _rows_per_user(events, _total_bytes(paths), split.min_items)
        users, num_rows = _distinct_ids(rows, "user")
        if len(users) == 0:
            raise ValueError(f"{source}: no user has {split.min_items} or more positive events")
        if len(users) != num_rows:
            raise RuntimeError("a user's events were split over two blocks of the shuffle")
        parts = _user_parts(users, split)
        users_ref, parts_ref = ray.put(users), ray.put(parts)
        trained_only = isinstance(split, StrongSplitConfig) and split.drop_unseen_items
        items_of_blocks = rows.map_batches(
            _items_of,
            fn_args=(users_ref, parts_ref, trained_only),
            batch_size=None,
            batch_format="pyarrow",
        )
        items, _ = _distinct_ids(items_of_blocks, "item")
        split_rows = rows.map_batches(
            _split_rows,
            fn_args=(users_ref, parts_ref, ray.put(items), split),
            batch_size=None,
            batch_format="pyarrow",
        ).sort(["part", "user"])
        write = functools.partial(_write_files, split_rows, users, items, location)
        publish(location, split, positive_above, write)
    except ray.exceptions.RayTaskError as e:
        raise _cause(e) from None
    return open_prepared(location)


def _rows_per_user(events, input_bytes: int, min_items: int):
    """The events grouped by user, on the cluster: one row per user with ``min_items`` or more
    distinct items (``user``, ``items``: its item ids, sorted), in the object store."""
    num_blocks = max(1, -(-input_bytes // _BYTES_PER_BLOCK))
    # A hash shuffle by user puts every user's events in one block (as Ray's own map_groups
    # relies on), which is then processed whole, without a Python call per user.
    by_user = events.repartition(num_blocks, keys=["user"])
    return by_user.map_batches(
        _user_items, fn_args=(min_items,), batch_size=None, batch_format="pyarrow"
    ).materialize()


def _write_files(split_rows, users, items, location: str, local: str, token: str) -> dict:
    """``publish``'s writer: the parts' files straight into ``location`` (``publish`` lists
    them in ``split.json`` once they are all there), the id maps into ``local`` (for
    ``publish`` to move), and what ``split.json`` says of them."""
    if not storage.is_uri(location):
        os.makedirs(location, exist_ok=True)
    try:
        parts = _write_parts(split_rows, location, token, len(users), len(items))
    except BaseException:
        _delete_parts(location, token)
        raise
    user_id_map, item_id_map = (
        {raw: index for index, raw in enumerate(ids.tolist())} for ids in (users, items)
    )
    id_maps = write_id_maps(local, token, user_id_map, item_id_map)
    return dict(
        has_validation=parts["validation"] is not None,
        num_users=len(users),
        num_items=len(items),
        train_users=parts["train"]["num_rows"],
        test_users=parts["test"]["num_rows"],
        parts=parts,
        id_maps=id_maps,
    )


def draw_keys(seed: int, *ids: np.ndarray) -> np.ndarray:
    """Seeded pseudo-random 64-bit keys of ids (elementwise over ``ids``' arrays): splitmix64's
    mixing of the seed, then of each id in turn. The split's order of users and of items."""
    with np.errstate(over="ignore"):
        keys = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
        for column in ids:
            keys = _mix(keys ^ np.asarray(column).astype(np.uint64))
    return np.asarray(keys, dtype=np.uint64)


def _mix(x):
    """splitmix64's finalizer (Steele et al., 2014): a bijection of 64-bit words."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _input_files(source) -> list[str]:
    """The files that ``source`` names: itself, the files of a folder, or a glob's matches."""
    source = storage.normalized(source)
    fs, path = storage.filesystem(source)
    head, pattern = os.path.split(path)
    if any(c in pattern for c in "*?["):
        infos = fs.get_file_info(pafs.FileSelector(head, allow_not_found=True))
        found = [
            i.path
            for i in infos
            if fnmatch.fnmatch(os.path.basename(i.path), pattern)
            and (pattern.startswith((".", "_")) or not _hidden(i.path))
        ]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and not _hidden(i.path)]
        else:
            found = [path] if info.type == pafs.FileType.File else []
    if not found:
        raise FileNotFoundError(f"no event files at {source}")
    return [storage.with_path(source, p) for p in sorted(found)]


def _hidden(path: str) -> bool:
    """Hidden files, and what Spark and Hive write beside their parts (_SUCCESS,
    _committed_*, .crc files): not events."""
    return os.path.basename(path).startswith((".", "_"))


def _check_headers(paths: list[str], columns: list[str]) -> bool:
    """Whether the files are Parquet (else CSV: all one kind), after checking that each has
    ``columns`` (reading its footer, or its header as the CSV reader reads it: a byte-order
    mark and quotes are not part of a name)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    # The suffix of the path within the filesystem (a URI may end in a query).
    kinds = {storage.filesystem(p)[1].lower().endswith(_PARQUET_SUFFIXES) for p in paths}
    if len(kinds) > 1:
        raise ValueError(f"the event files mix Parquet and CSV: {paths[:2]}")
    parquet = kinds.pop()
    for path in paths:
        fs, fs_path = storage.filesystem(path)
        try:
            if parquet:
                names = pq.read_schema(fs_path, filesystem=fs).names
            else:
                with fs.open_input_stream(fs_path) as f:
                    first = pacsv.ReadOptions(block_size=1 << 16)
                    names = pacsv.open_csv(f, read_options=first).schema.names
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            kind = "Parquet" if parquet else "CSV"
            raise ValueError(f"{path} is not a readable {kind} file: {e}") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path} has no column {missing[0]!r} (columns: {names})")
    return parquet


def _total_bytes(paths: list[str]) -> int:
    total = 0
    for path in paths:
        fs, fs_path = storage.filesystem(path)
        total += fs.get_file_info(fs_path).size or 0
    return total


def _read(paths: list[str], parquet: bool, columns: dict, positive_above):
    """The events as a Ray Dataset of ``user``, ``item`` (int64), positives only, each block
    checked and named with its file."""
    import pyarrow.csv as pacsv
    import ray.data

    remote_args = {}
    if not storage.is_uri(paths[0]):
        # Local files are read by tasks on this node (other nodes may not see them), which ask
        # for no CPU: a cluster's head may advertise none. They only read (a task per file,
        # or per part of a large one); the checks and the grouping that follow ask for CPUs
        # and run on any node.
        remote_args = on_this_node()
    wanted = list(dict.fromkeys(columns.values()))
    fs, located = storage.for_ray_data(paths)
    if parquet:
        dataset = ray.data.read_parquet(located, filesystem=fs, include_paths=True, **remote_args)
        dataset = dataset.select_columns([*wanted, "path"])
    else:
        # Ids read as text and parsed here, so that a bad one is named with its file.
        types = {columns["user"]: pa.string(), columns["item"]: pa.string()}
        dataset = ray.data.read_csv(
            located,
            filesystem=fs,
            include_paths=True,
            convert_options=pacsv.ConvertOptions(column_types=types, include_columns=wanted),
            **remote_args,
        )
    # A bad event raises our ValueError, not Ray Data's UserCodeException without its cause
    # (this dataset's context, which the datasets derived from it share; not the process's).
    dataset.context.raise_original_map_exception = True
    return dataset.map_batches(
        _positive_events,
        fn_args=(columns, positive_above),
        batch_size=None,
        batch_format="pyarrow",
    )


def _positive_events(table: pa.Table, columns: dict, positive_above) -> pa.Table:
    where = table.column("path")[0].as_py() if table.num_rows else "?"
    out = {}
    for role in ("user", "item"):
        out[role] = _ids(table.column(columns[role]), columns[role], where)
    if "value" in columns:
        values = _values(table.column(columns["value"]), columns["value"], where)
        if positive_above is not None:
            keep = values > positive_above
            out = {role: ids[keep] for role, ids in out.items()}
    return pa.table(out)


_LARGEST_ID = 2**63 - 1  # ids are int64


def _ids(column: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"{where}: {name} is missing in {column.null_count} events")
    if pa.types.is_integer(column.type):
        raw = column.to_numpy()
        too_large = raw > _LARGEST_ID if pa.types.is_unsigned_integer(column.type) else None
        ids = raw.astype(np.int64)
        bad = ids < 0
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = np.char.strip(column.to_numpy(zero_copy_only=False).astype(str))
        digits = np.char.isdecimal(text)
        # An id of 19 digits or more may not fit in int64: those few are checked one by one.
        too_large = np.zeros(len(text), dtype=bool)
        for i in np.flatnonzero(digits & (np.char.str_len(text) >= 19)):
            too_large[i] = int(text[i]) > _LARGEST_ID
        bad = ~digits
        ids = np.zeros(len(text), dtype=np.int64)
        fits = digits & ~too_large
        ids[fits] = text[fits].astype(np.int64)
    else:
        raise ValueError(f"{where}: {name} is of type {column.type}, not integer ids")
    if too_large is not None and too_large.any():
        shown = column[int(np.flatnonzero(too_large)[0])].as_py()
        raise ValueError(f"{where}: {name} {shown!r} is larger than the largest id, 2**63 - 1")
    if bad.any():
        shown = column[int(np.flatnonzero(bad)[0])].as_py()
        raise ValueError(f"{where}: {name} {shown!r} is not a non-negative integer")
    return ids


def _values(column: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    try:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        raise ValueError(f"{where}: {name} holds values that are not numbers") from None
    bad = ~np.isfinite(values)  # nulls become NaN
    if bad.any():
        shown = column[int(np.flatnonzero(bad)[0])].as_py()
        raise ValueError(f"{where}: {name} {shown!r} is not a finite number")
    return values


def _user_items(events: pa.Table, min_items: int) -> pa.Table:
    """A block of all events of some users -> one row per user with ``min_items`` or more
    distinct items: its id and its item ids, sorted."""
    user, item = events.column("user").to_numpy(), events.column("item").to_numpy()
    order = np.lexsort((item, user))
    user, item = user[order], item[order]
    distinct = np.ones(len(user), dtype=bool)
    distinct[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    user, item = user[distinct], item[distinct]
    users, starts, counts = np.unique(user, return_index=True, return_counts=True)
    kept = counts >= min_items
    entries = np.repeat(kept, counts)
    offsets = np.concatenate([[0], np.cumsum(counts[kept])])
    return pa.table(
        {
            "user": pa.array(users[kept]),
            "items": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(item[entries])),
        }
    )


def _distinct_ids(dataset, column: str) -> tuple[np.ndarray, int]:
    """The distinct values of column ``column`` of ``dataset``, sorted, gathered here, and the
    number of values gathered."""
    batches = dataset.select_columns([column]).iter_batches(batch_format="numpy")
    chunks = [batch[column] for batch in batches]
    gathered = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return np.unique(gathered), len(gathered)


def _user_parts(users: np.ndarray, split) -> np.ndarray:
    """The part of each user (by index): everyone trains in a weak split."""
    parts = np.full(len(users), _TRAIN, dtype=np.int8)
    if isinstance(split, StrongSplitConfig):
        check_held_out_users(split.num_val_users, split.num_test_users, len(users), split.min_items)
        held_out = split.num_val_users + split.num_test_users
        order = np.argsort(draw_keys(split.seed, np.arange(len(users))), kind="stable")
        parts[order[: split.num_test_users]] = _TEST
        parts[order[split.num_test_users : held_out]] = _VALIDATION
    return parts


def _items_of(rows: pa.Table, users: np.ndarray, parts: np.ndarray, trained_only: bool):
    """The distinct items of a block's rows (of its training users' rows with
    ``trained_only``)."""
    users, parts = _resolved(users), _resolved(parts)
    if trained_only:
        training = parts[np.searchsorted(users, rows.column("user").to_numpy())] == _TRAIN
        rows = rows.filter(pa.array(training))
    flat = pc.list_flatten(rows.column("items")).to_numpy()
    return pa.table({"item": pa.array(np.unique(flat).astype(np.int64))})


def _split_rows(rows: pa.Table, users, parts, items, split) -> pa.Table:
    """A block of user rows (original ids) -> the parts' rows: ``part``, ``user``, ``items``,
    ``values`` and ``target_items``/``target_values`` (empty for training rows), in indices."""
    users, parts, items = _resolved(users), _resolved(parts), _resolved(items)
    index = np.searchsorted(users, rows.column("user").to_numpy())
    raw = pc.list_flatten(rows.column("items")).to_numpy()
    lengths = pc.list_value_length(rows.column("items")).to_numpy()
    # Items outside the map (unseen in training) are dropped; the rest become indices.
    position = np.minimum(np.searchsorted(items, raw), max(len(items) - 1, 0))
    known = items[position] == raw if len(items) else np.zeros(len(raw), dtype=bool)
    row_of = np.repeat(np.arange(len(index)), lengths)
    row_of, columns = row_of[known], position[known]
    user_of = index[row_of]
    counts = np.bincount(row_of, minlength=len(index))
    # Each entry's rank within its row in the order of its key.
    keys = draw_keys(split.seed, user_of, columns)
    order = np.lexsort((columns, keys, row_of))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - starts[row_of[order]]
    n = counts[row_of]
    out = []
    user_part = parts[index]
    if isinstance(split, StrongSplitConfig):
        is_target = rank < np.floor(split.target_fraction * n)
        train = user_part[row_of] == _TRAIN
        out.append(_part_rows(_TRAIN, row_of, columns, train, None, index))
        for part in (_VALIDATION, _TEST):
            mine = user_part[row_of] == part
            given, target = mine & ~is_target, mine & is_target
            out.append(_part_rows(part, row_of, columns, given, target, index))
    else:
        num_test = np.floor(split.target_fraction * n)
        is_test = rank < num_test
        is_val = ~is_test & (rank < num_test + np.floor(split.val_fraction * n))
        is_train = ~is_test & ~is_val
        everyone = np.ones(len(row_of), dtype=bool)
        out.append(_part_rows(_TRAIN, row_of, columns, is_train, None, index))
        if split.val_fraction > 0:
            out.append(_part_rows(_VALIDATION, row_of, columns, is_train, is_val, index))
        out.append(_part_rows(_TEST, row_of, columns, everyone & ~is_test, is_test, index))
    return pa.concat_tables(out)


def _part_rows(part, row_of, columns, given, target, index) -> pa.Table:
    """Rows of one part: the users with given entries (training) or with target entries."""
    rows = np.unique(row_of[given if target is None else target])
    table = {
        "part": pa.array(np.full(len(rows), part, dtype=np.int8)),
        "user": pa.array(index[rows].astype(np.int64)),
    }
    for prefix, mask in (("", given), ("target_", target)):
        mask = np.zeros(len(row_of), dtype=bool) if mask is None else mask
        chosen = mask & np.isin(row_of, rows)
        # Entries are in row order (then column order): each row's list is contiguous.
        counts = np.bincount(np.searchsorted(rows, row_of[chosen]), minlength=len(rows))
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        table[f"{prefix}items"] = pa.ListArray.from_arrays(
            offsets, pa.array(columns[chosen].astype(np.int32))
        )
        table[f"{prefix}values"] = pa.ListArray.from_arrays(
            offsets, pa.array(np.ones(int(chosen.sum()), dtype=np.float32))
        )
    return pa.table(table)


def _write_parts(split_rows, location: str, token: str, num_users: int, num_items: int) -> dict:
    """Writes the sorted rows of every part as Parquet files into ``location``, a file per
    block and part (``{part}-{token}-{block}-NNNNN.parquet``): by tasks on any node for a URI,
    by tasks on this node (asking for no CPU) for a local folder, which other nodes may not
    see. This process handles references and counts, never rows. Returns each part's
    description (None for validation without rows)."""
    import ray

    refs = split_rows.to_arrow_refs()  # in the order of the sort; the blocks stay where they are
    # The counts are taken where each block is (Ray places a task by its arguments' locations).
    count = ray.remote(num_cpus=0)(_part_counts)
    counts = np.array(ray.get([count.remote(ref) for ref in refs])).reshape(-1, len(_PARTS))
    starts = np.cumsum(counts, axis=0) - counts  # each block's first row within each part
    sizes = (num_users, num_items)
    if storage.is_uri(location):
        # Any node: Ray queues the tasks by CPUs, and prefers the node that holds the block.
        write, in_flight = ray.remote(_write_block), len(refs)
    else:
        # No CPU asked, so a few blocks at a time instead.
        write, in_flight = ray.remote(_write_block).options(**on_this_node()), _BLOCKS_IN_FLIGHT
    pending, written = [], []
    for index, ref in enumerate(refs):
        if len(pending) >= in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            written += ray.get(done)
        pending.append(write.remote(ref, location, token, index, starts[index].tolist(), sizes))
    written += ray.get(pending)
    described = {}
    for name in _PARTS:
        mine = (piece for block in written for piece in block if piece.name == name)
        pieces = [piece.files for piece in sorted(mine, key=lambda piece: piece.block)]
        if not pieces:
            described[name] = None
            continue
        described[name] = dataclasses.replace(
            pieces[0],
            files=tuple(file for piece in pieces for file in piece.files),
            num_rows=sum(piece.num_rows for piece in pieces),
            num_interactions=sum(piece.num_interactions for piece in pieces),
        ).description()
    for name in ("train", "test"):
        if described[name] is None:
            raise ValueError(f"the split has no {name} rows")
    return described


def _delete_parts(location: str, token: str) -> None:
    """Deletes the parts' files of the write ``token`` under ``location`` (a failed write's)."""
    fs, path = storage.filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    prefixes = tuple(f"{name}-{token}-" for name in _PARTS)
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.startswith(prefixes):
            fs.delete_file(info.path)


# Blocks that write tasks hold at once.
_BLOCKS_IN_FLIGHT = 4


@dataclasses.dataclass(frozen=True)
class _Piece:
    """The files that one block's rows of one part went to."""

    name: str
    block: int
    files: UserRowFiles


def _part_counts(block: pa.Table) -> list[int]:
    return np.bincount(block.column("part").to_numpy(), minlength=len(_PARTS)).tolist()


def _write_block(block: pa.Table, location: str, token: str, index: int, starts, sizes) -> list:
    """Writes the rows of each part in ``block`` (the ``index``-th of the sorted rows) into
    ``location``, their positions counted from ``starts[part]``."""
    parts = block.column("part").to_numpy()
    pieces = []
    for part in np.unique(parts):
        name = _PARTS[part]
        rows = block.filter(pa.array(parts == part)).drop_columns(["part"])
        if name == "train":
            rows = rows.drop_columns(["target_items", "target_values"])
        writer = UserRowsWriter(
            location,
            f"{name}-{token}-{index:05d}",
            *sizes,
            has_target=name != "train",
            first_position=starts[part],
        )
        writer.write(rows)
        pieces.append(_Piece(name, index, writer.close()))
    return pieces


def _resolved(value):
    """``value``, fetched if it is a reference to an object in Ray's store (Ray Data passes
    ``fn_args`` on as given: the arrays go to the store once, not with every task)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _cause(error: Exception) -> Exception:
    """The error that our code raised in a Ray task (the task's traceback stays in the log)."""
    seen = error
    while seen is not None:
        if isinstance(seen, (ValueError, TypeError, OSError)) and not isinstance(
            seen, ray_exceptions()
        ):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return error


def ray_exceptions() -> tuple:
    import ray.exceptions

    return (ray.exceptions.RayError,)
