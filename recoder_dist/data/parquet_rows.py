"""User rows in Parquet files: what ``prepare`` writes and the cluster reads.

A table of user rows (``ray_dataset.user_rows_table``'s schema: ``user``, ``position``,
``items: list<int32>``, ``values: list<float32>``, and ``target_items``/``target_values`` for
evaluation users) is written as a few Parquet files, in row groups of
``DEFAULT_ROWS_PER_BLOCK`` rows. :class:`UserRowFiles` describes them: where they are, their
sizes, and the catalog's. Training hands that description to the cluster, whose Ray tasks read
the files into blocks in the object store (``UserRowFiles.row_blocks``); evaluation reads them
as a Ray Dataset (``UserRowFiles.ray_dataset``). Either way the driver reads the files'
footers only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recoder_dist import storage
from recoder_dist.data.collator import UserRows
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.data.epoch_order import RowBlocks
from recoder_dist.data.ray_dataset import DEFAULT_ROWS_PER_BLOCK, rows_from_arrow
from recoder_dist.retry import with_retries

# Interactions per file: about 64 MB of item ids and values, so that a large table is many
# files (read in parallel, spread over the nodes) and a small one is one file.
INTERACTIONS_PER_FILE = 8_000_000

_REQUIRED = {
    "user": pa.int64(),
    "position": pa.int64(),
    "items": pa.list_(pa.int32()),
    "values": pa.list_(pa.float32()),
}
_TARGET = {"target_items": pa.list_(pa.int32()), "target_values": pa.list_(pa.float32())}


@dataclass(frozen=True)
class UserRowFiles:
    """A table of user rows in Parquet files, at ``location`` (a folder or a URI).

    Pass it to ``Recoder.train``/``evaluate`` in place of a ``RecommendationDataset``: the
    cluster reads the rows; the driver holds this description only.
    """

    location: str
    files: tuple[str, ...]  # names under location, in row order
    num_users: int  # the catalog's: user ids are below it
    num_items: int  # item ids are below it
    num_rows: int
    num_interactions: int
    has_target: bool

    @property
    def paths(self) -> list[str]:
        return [storage.join(self.location, name) for name in self.files]

    def __len__(self) -> int:
        return self.num_rows

    def description(self) -> dict:
        """What ``prepare``'s ``split.json`` records of it (its location aside)."""
        fields = dataclasses.asdict(self)
        del fields["location"]
        fields["files"] = list(self.files)
        return fields

    @classmethod
    def described(cls, location: str, description: dict) -> UserRowFiles:
        try:
            fields = {
                f.name: description[f.name] for f in dataclasses.fields(cls) if f.name != "location"
            }
        except (KeyError, TypeError) as e:
            raise ValueError(f"the description of the user rows at {location} lacks {e}") from None
        fields["files"] = tuple(fields["files"])
        return cls(location=storage.normalized(location), **fields)

    def ray_dataset(self):
        """The rows as a Ray Dataset: read by the cluster (``read_parquet``) from a URI; from a
        local folder, which other nodes may not see, by tasks on this node, a row group each,
        into the object store. Either way this process reads the files' footers only. Every
        block is checked (``checked_table``) as it is read, once: training and evaluation then
        take the rows on trust.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the files do not hold user rows (a column missing or of another type);
                when the rows are read, a row that training cannot take (named with its file).
        """
        import ray
        import ray.data

        for path in self.paths:
            if not storage.is_file(path):
                raise FileNotFoundError(f"the user rows' file {path} is missing")
        if storage.is_uri(self.location):
            fs, paths = storage.for_ray_data(self.paths)
            for path, location in zip(paths, self.paths):  # footers, read here
                check_schema(pq.read_schema(path, filesystem=fs), self.has_target, location)
            # Each row carries its file's path, so that a bad row names its file.
            dataset = ray.data.read_parquet(paths, filesystem=fs, shuffle=None, include_paths=True)
            # A bad row raises checked_table's ValueError, not Ray Data's UserCodeException
            # (which drops its cause); this dataset's context, not the process's.
            dataset.context.raise_original_map_exception = True
            return dataset.map_batches(
                _checked_by_file,
                fn_args=(self.num_items, self.has_target, self.location),
                batch_format="pyarrow",
                batch_size=None,  # whole blocks
                zero_copy_batch=True,
            )
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Read by tasks on this node (no CPU asked: a head may have none), a row group each.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        read = ray.remote(num_cpus=0)(_read_row_group).options(scheduling_strategy=here)
        refs = []
        for path in self.paths:
            parquet = pq.ParquetFile(path)  # its footer only
            check_schema(parquet.schema_arrow, self.has_target, path)
            refs += [
                read.remote(path, i, self.num_items, self.has_target)
                for i in range(parquet.num_row_groups)
            ]
        return ray.data.from_arrow_refs(refs)

    def row_blocks(self, rows_per_block: int) -> RowBlocks:
        """The rows in the object store, in blocks of ``rows_per_block`` rows (the last of a
        read shorter), with their row counts: read by Ray tasks, which check the rows
        (``checked_table``) as they read them. From a URI the tasks run anywhere in the
        cluster; from a local folder, which other nodes may not see, on this node, asking no
        CPU (a head may have none). This process reads the files' footers, and holds an object
        reference, a start and a count a block, never rows; it waits for the reads, so that a
        bad row fails here, before any worker starts.

        A task reads consecutive row groups of a file, at least ``_MIN_READ_BYTES`` of them
        where the file has as many, and returns them as one table, whose blocks are slices:
        Ray returns an object under 100 KB (a block of 256 users of 50 items is about that)
        inside the reply to its owner, this process, which would then hold every row.

        Not Ray Data: it hands out a dataset's blocks only through DeveloperAPIs (see
        ``ray_dataset.row_blocks``), its executor runs in this process, and its small blocks
        come back inline as well. The blocks, in row order, are the same on every call, so
        the epochs' orders (``epoch_order``), which permute them, are too.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the files do not hold user rows, hold another number of rows than
                this description says, or hold a row that training cannot take (named with
                its file).
        """
        import ray

        if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int):
            raise TypeError(f"rows_per_block must be an int, got {rows_per_block!r}")
        if rows_per_block < 1:
            raise ValueError(f"rows_per_block must be >= 1, got {rows_per_block}")
        reads = []  # (path, row groups, rows), in row order
        for path in self.paths:
            metadata = _footer(path)
            check_schema(metadata.schema.to_arrow_schema(), self.has_target, path)
            reads += _reads_of(path, metadata)
        total = sum(count for _, _, count in reads)
        if total != self.num_rows:
            raise ValueError(
                f"{self.location}: the files hold {total} rows, the description says "
                f"{self.num_rows}"
            )
        read = ray.remote(num_returns=2)(_read_row_groups)
        where, in_flight = {}, len(reads)  # from a URI, Ray's defaults: 1 CPU, anywhere
        if not storage.is_uri(self.location):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node = ray.get_runtime_context().get_node_id()
            where = dict(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            )
            # Tasks that ask no CPU all run at once, a worker process each: a few at a time.
            in_flight = _LOCAL_READS_IN_FLIGHT
        refs, starts, rows, pending = [], [], [], {}
        for path, groups, count in reads:
            if len(pending) >= in_flight:
                _check_reads(pending, wait_for=1)
            table, read_rows = read.options(**where).remote(
                path, groups, self.num_items, self.has_target
            )
            pending[read_rows] = (count, path)
            for start in range(0, count, rows_per_block):
                refs.append(table)
                starts.append(start)
                rows.append(min(rows_per_block, count - start))
        _check_reads(pending, wait_for=len(pending))
        return RowBlocks(tuple(refs), tuple(rows), tuple(starts))

    def table(self) -> pa.Table:
        """Every row, read here and checked, in the files' order (for rows that this process
        uses itself, with no Ray task: a Tune trial that trains in its process may hold every
        CPU that a task would wait for)."""
        tables = []
        for path in self.paths:  # as row_blocks' tasks read them: retried, checked
            metadata = _footer(path)
            check_schema(metadata.schema.to_arrow_schema(), self.has_target, path)
            groups = tuple(range(metadata.num_row_groups))
            tables.append(_read_row_groups(path, groups, self.num_items, self.has_target)[0])
        return pa.concat_tables(tables)

    def to_dataset(self) -> RecommendationDataset:
        """The rows read here, as a matrix (for data that fits this machine)."""
        shape = (self.num_users, self.num_items)
        table = self.table()
        matrix = _csr([rows_from_arrow(table)], shape)
        targets = _csr([rows_from_arrow(table, "target_")], shape) if self.has_target else None
        return RecommendationDataset(matrix, targets)


def _read_row_group(path: str, index: int, num_items: int, has_target: bool) -> pa.Table:
    return checked_table(pq.ParquetFile(path).read_row_group(index), num_items, has_target, path)


# Read tasks of a local folder's row groups at once (see UserRowFiles.row_blocks).
_LOCAL_READS_IN_FLIGHT = 4


def _check_reads(pending: dict, wait_for: int) -> None:
    """Waits for ``wait_for`` of the ``pending`` reads (rows' ref -> (rows, path)), removes
    them, and checks that each read the rows that its footer promised.

    Raises:
        ValueError: a read refused a row (``checked_table``'s error, as raised there), or
            read another number of rows than the footer says.
    """
    import ray

    done, _ = ray.wait(list(pending), num_returns=wait_for, fetch_local=True)
    for ref in done:
        rows, path = pending.pop(ref)
        try:
            got = ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            raise error.cause if isinstance(error.cause, ValueError) else error from None
        if got != rows:
            raise ValueError(f"{path}: its row groups hold {got} rows, its footer says {rows}")


# Uncompressed bytes that a read task gathers at least (where a file has them): far above
# the 100 KB under which Ray returns an object to its owner's memory instead of the store.
_MIN_READ_BYTES = 4 << 20


def _reads_of(path: str, metadata: pq.FileMetaData) -> list[tuple[str, tuple[int, ...], int]]:
    """The file's row groups, gathered in order into reads of at least ``_MIN_READ_BYTES``
    (the last read of the file may be smaller): (path, row groups, rows) each."""
    reads, groups, rows, size = [], [], 0, 0
    for group in range(metadata.num_row_groups):
        if metadata.row_group(group).num_rows == 0:
            continue
        groups.append(group)
        rows += metadata.row_group(group).num_rows
        size += metadata.row_group(group).total_byte_size
        if size >= _MIN_READ_BYTES:
            reads.append((path, tuple(groups), rows))
            groups, rows, size = [], 0, 0
    if groups:
        reads.append((path, tuple(groups), rows))
    return reads


def _footer(path: str) -> pq.FileMetaData:
    """The Parquet metadata of the file at ``path`` (local or a URI), read from its footer."""
    if not storage.is_file(path):
        raise FileNotFoundError(f"the user rows' file {path} is missing")
    fs, fs_path = storage.filesystem(path)

    def read() -> pq.FileMetaData:  # again from the start at each try
        with fs.open_input_file(fs_path) as file:
            return pq.ParquetFile(file).metadata

    return with_retries(read, path, "read the footer of")


def _read_row_groups(path: str, groups: tuple[int, ...], num_items: int, has_target: bool):
    """Row groups ``groups`` of the file at ``path``, as one checked table, and its rows."""
    fs, fs_path = storage.filesystem(path)

    def read() -> pa.Table:  # again from the start at each try (a storage outage)
        with fs.open_input_file(fs_path) as file:
            return pq.ParquetFile(file).read_row_groups(list(groups))

    table = with_retries(read, path, "read")
    checked_table(table, num_items, has_target, path)
    return table, table.num_rows


def write_user_rows(table: pa.Table, folder: str, name: str, dataset: RecommendationDataset):
    """Writes ``table`` (rows of ``dataset``) as ``{name}-NNNNN.parquet`` files in the local
    ``folder``; returns their description (with ``folder`` as its location)."""
    writer = UserRowsWriter(
        folder, name, dataset.num_users, dataset.num_items, "target_items" in table.column_names
    )
    writer.write(table)
    return writer.close()


class UserRowsWriter:
    """Writes user rows, given in order a table at a time, as ``{name}-NNNNN.parquet`` files
    in the local ``folder``: files of about ``per_file`` interactions (a file ends after the
    row that reaches it), row groups of ``DEFAULT_ROWS_PER_BLOCK`` rows. Each row's
    ``position`` is its place in the whole sequence."""

    def __init__(
        self,
        folder: str,
        name: str,
        num_users: int,
        num_items: int,
        has_target: bool,
        per_file: int = INTERACTIONS_PER_FILE,
        first_position: int = 0,
    ):
        self._folder, self._name, self._per_file = folder, name, per_file
        self._sizes = dict(num_users=num_users, num_items=num_items, has_target=has_target)
        self._schema = pa.schema({**_REQUIRED, **(_TARGET if has_target else {})})
        self._files: list[str] = []
        self._writer = None
        self._in_file = 0  # interactions in the open file
        self._first_position = first_position
        self._rows = 0
        self._interactions = 0

    def write(self, table: pa.Table) -> None:
        if "position" in table.column_names:
            table = table.drop_columns(["position"])
        start = self._first_position + self._rows
        positions = pa.array(np.arange(start, start + table.num_rows))
        table = table.add_column(1, "position", positions).select(self._schema.names)
        table = table.cast(self._schema)
        lengths = pc.list_value_length(table.column("items")).to_numpy(zero_copy_only=False)
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._files.append(f"{self._name}-{len(self._files):05d}.parquet")
                path = storage.join(self._folder, self._files[-1])
                self._writer = pq.ParquetWriter(path, self._schema)
            # The rows up to the one at which the open file reaches per_file interactions.
            ends = self._in_file + np.cumsum(lengths[start:])
            full = np.searchsorted(ends, self._per_file)
            stop = table.num_rows if full == len(ends) else start + int(full) + 1
            self._writer.write_table(
                table.slice(start, stop - start), row_group_size=DEFAULT_ROWS_PER_BLOCK
            )
            written = int(lengths[start:stop].sum())
            self._in_file += written
            self._interactions += written
            self._rows += stop - start
            start = stop
            if self._in_file >= self._per_file:
                self._close_file()

    def close(self) -> UserRowFiles:
        """Closes the last file (an empty table is one file) and describes them all."""
        if self._writer is None and not self._files:
            self._files.append(f"{self._name}-00000.parquet")
            pq.write_table(self._schema.empty_table(), storage.join(self._folder, self._files[0]))
        self._close_file()
        return UserRowFiles(
            location=self._folder,
            files=tuple(self._files),
            num_rows=self._rows,
            num_interactions=self._interactions,
            **self._sizes,
        )

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_file = None, 0


_PATH = "path"  # the column of Ray Data's read_parquet(include_paths=True)


def check_schema(schema: pa.Schema, needs_target: bool, where: str) -> None:
    """A clear error for a table that is not user rows."""
    wanted = {**_REQUIRED, **(_TARGET if needs_target else {})}
    for column, kind in wanted.items():
        index = schema.get_field_index(column)
        if index < 0:
            raise ValueError(f"{where} is not a table of user rows: no column {column!r}")
        if not schema.field(index).type.equals(kind):
            raise ValueError(
                f"{where}: column {column!r} is {schema.field(index).type}, expected {kind}"
            )


def checked_table(table: pa.Table, num_items: int, has_target: bool, where: str) -> pa.Table:
    """``table`` (user rows read from ``where``) after ``checked`` of its items, and of its
    target items when it has them."""
    checked(rows_from_arrow(table), num_items, where)
    if has_target:
        checked(rows_from_arrow(table, "target_"), num_items, where)
    return table


def _checked_by_file(table: pa.Table, num_items: int, has_target: bool, location: str):
    """``checked_table`` of a block read with ``include_paths``, naming its file (as a
    location like ``location``), without the path column."""
    files = table.column(_PATH).unique().to_pylist()
    where = ", ".join(storage.with_path(location, path) for path in files)
    return checked_table(table.drop_columns([_PATH]), num_items, has_target, where)


def checked(rows: UserRows, num_items: int, where: str) -> UserRows:
    """``rows`` after checking what training takes on trust from a file: item ids in
    ``[0, num_items)``, sorted and distinct within each row."""
    indices = rows.indices
    if len(indices):
        low, high = indices.min(), indices.max()
        if low < 0 or high >= num_items:
            raise ValueError(
                f"{where}: item id {high if high >= num_items else low} is out of "
                f"range for {num_items} items"
            )
        steps = np.diff(indices)
        within_row = np.ones(len(steps), dtype=bool)
        row_starts = rows.indptr[1:-1]
        within_row[row_starts[(row_starts > 0) & (row_starts < len(indices))] - 1] = False
        if (steps[within_row] <= 0).any():
            raise ValueError(f"{where}: a row's item ids are not sorted and distinct")
    return rows


def _csr(blocks: list[UserRows], shape: tuple[int, int]):
    import scipy.sparse as sp

    if not blocks:
        return sp.csr_matrix(shape, dtype=np.float32)
    users = np.concatenate([b.users for b in blocks])
    counts = np.concatenate([np.diff(b.indptr) for b in blocks])
    if len(users) and (users.min() < 0 or users.max() >= shape[0]):
        raise ValueError(f"a user id is out of range for {shape[0]} users")
    rows = np.repeat(users, counts)
    cols = np.concatenate([b.indices for b in blocks]).astype(np.int64)
    values = np.concatenate([b.values for b in blocks])
    return sp.csr_matrix((values, (rows, cols)), shape=shape, dtype=np.float32)
