"""User rows in Parquet files: read by the cluster, trained on exactly as the matrix they hold,
and refused with a clear error when they are not what training takes on trust."""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recoder_dist.data.parquet_rows import UserRowFiles, checked, write_user_rows
from recoder_dist.data.ray_dataset import rows_from_arrow, user_rows_table
from recoder_dist.datasets import load_prepared, open_prepared
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder

# The module (the package exports its function of the same name).
prepare_module = importlib.import_module("recoder_dist.datasets.prepare")


def train(split, workers: int):
    """Two epochs of a small autoencoder with negative sampling, evaluated at the end."""
    recoder = Recoder(DynamicAutoencoder([16], sparse=True), num_workers=workers, seed=5)
    history = recoder.train(
        split.train,
        split.validation,
        batch_size=50,
        num_sampling_users=100,
        num_epochs=2,
        negative_sampling=True,
        eval_freq=2,
        metrics=[Recall(k=20), NDCG(k=100)],
        eval_num_users=60,
    )
    return recoder, history[-1]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_training_from_files_is_training_from_the_matrix(ray_session, prepared_ml100k, workers):
    """The same rows in the same blocks: the same weights to the bit, and the same evaluation
    (of the same sampled users), whether the rows come from the files or from memory."""
    from_files, files_epoch = train(open_prepared(prepared_ml100k), workers)
    from_memory, memory_epoch = train(load_prepared(prepared_ml100k).split, workers)
    for name, weight in from_memory.model.state_dict().items():
        assert torch.equal(from_files.model.state_dict()[name], weight), name
    assert files_epoch["loss"] == memory_epoch["loss"]
    assert files_epoch["eval_users"] == memory_epoch["eval_users"] == 60
    # The same users, but not shared between the ranks alike (the files' rows keep their
    # positions among all evaluation users): sums in another order, equal to rounding.
    for key in ("Recall@20", "NDCG@100"):
        assert files_epoch[key] == pytest.approx(memory_epoch[key], rel=1e-12, abs=0)
    if workers == 0:  # evaluate's own: here, from the files and from memory, and on a worker
        metric = [NDCG(k=100)]
        files, memory = (
            open_prepared(prepared_ml100k).test,
            load_prepared(prepared_ml100k).split.test,
        )
        expected = from_memory.evaluate(memory, 100, metric, num_users=50)
        assert expected["eval_users"] == 50
        assert from_files.evaluate(files, 100, metric, num_users=50) == expected
        on_worker = from_files.evaluate(files, 100, metric, num_users=50, on_workers=True)
        assert on_worker == pytest.approx(expected, rel=1e-12, abs=0)


def test_the_files_hold_the_matrix(prepared_ml100k):
    files = open_prepared(prepared_ml100k)
    split = load_prepared(prepared_ml100k).split
    assert files.train.num_rows == len(split.train)
    assert files.train.num_interactions == split.train.interactions.nnz
    assert files.test.num_rows == 100 and files.test.has_target and not files.train.has_target
    matrix = files.train.to_dataset().interactions
    assert (matrix != split.train.interactions).nnz == 0


def small_table():
    import scipy.sparse as sp

    from recoder_dist.data import RecommendationDataset

    matrix = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]))
    dataset = RecommendationDataset(matrix, matrix)
    return dataset, user_rows_table(dataset)


def files_of(folder, table, dataset) -> UserRowFiles:
    folder.mkdir(exist_ok=True)
    return write_user_rows(table, str(folder), "rows", dataset)


@pytest.mark.parametrize("read_bytes", [0, 1 << 30])  # a read a row group; a read a file
@pytest.mark.parametrize("rows_per_block", [1, 5, 64])
def test_the_files_blocks_hold_their_rows_in_order(
    ray_session, tmp_path, monkeypatch, rows_per_block, read_bytes
):
    """Several files, of several row groups each (the last ones short): the blocks, laid end
    to end, are the files' rows as pyarrow reads them (the reference), each block no longer
    than asked, and each count its block's."""
    from recoder_dist.data import parquet_rows
    from recoder_dist.data.parquet_rows import UserRowsWriter
    from tests.test_data import random_dataset

    monkeypatch.setattr(parquet_rows, "_MIN_READ_BYTES", read_bytes)
    dataset = random_dataset(300, 40, 0.2, seed=3)
    table = user_rows_table(dataset)
    writer = UserRowsWriter(str(tmp_path), "rows", 300, 40, True, per_file=900)
    for start in range(0, table.num_rows, 70):  # row groups end where a write ends
        writer.write(table.slice(start, 70))
    files = writer.close()
    groups = [pq.ParquetFile(path).metadata.num_row_groups for path in files.paths]
    assert len(groups) > 2 and max(groups) > 1  # the case this test is about
    blocks = files.row_blocks(rows_per_block)
    got = [blocks.block(i, ray_session.get) for i in range(len(blocks.rows))]
    assert [t.num_rows for t in got] == list(blocks.rows)
    assert max(blocks.rows) <= rows_per_block and blocks.num_rows == table.num_rows
    reference = pa.concat_tables(pq.read_table(path) for path in files.paths)
    assert pa.concat_tables(got).equals(reference)
    assert reference.drop_columns(["position"]).equals(table.drop_columns(["position"]))
    # A read a row group, or a read a file: the blocks share that many objects.
    assert len(set(blocks.refs)) == (sum(groups) if read_bytes == 0 else len(groups))


def test_the_files_blocks_are_refused_when_the_files_disagree(ray_session, tmp_path):
    dataset, table = small_table()
    files = files_of(tmp_path, table, dataset)
    with pytest.raises(ValueError, match="hold 3 rows, the description says 5"):
        UserRowFiles(**{**files.__dict__, "num_rows": 5}).row_blocks(2)
    with pytest.raises(ValueError, match="rows_per_block must be >= 1"):
        files.row_blocks(0)
    (tmp_path / files.files[0]).unlink()
    with pytest.raises(FileNotFoundError, match="rows-00000.parquet is missing"):
        files.row_blocks(2)


def test_a_missing_file_is_named(ray_session, tmp_path):
    dataset, table = small_table()
    files = files_of(tmp_path, table, dataset)
    (tmp_path / files.files[0]).unlink()
    with pytest.raises(FileNotFoundError, match="rows-00000.parquet is missing"):
        files.ray_dataset()
    with pytest.raises(FileNotFoundError, match="holds no split.json"):
        open_prepared(tmp_path / "nowhere")


def test_a_file_of_the_wrong_schema_is_refused(ray_session, tmp_path):
    dataset, table = small_table()
    files = files_of(tmp_path, table, dataset)
    wrong = table.set_column(
        table.schema.get_field_index("items"),
        "items",
        table.column("items").cast(pa.list_(pa.int64())),
    )
    pq.write_table(wrong, tmp_path / files.files[0])
    with pytest.raises(ValueError, match=r"column 'items' is list<\w+: int64>"):
        files.ray_dataset()
    # Evaluation rows without targets.
    inputs_only = user_rows_table(type(dataset)(dataset.interactions))
    files = files_of(tmp_path / "inputs", inputs_only, dataset)
    with pytest.raises(ValueError, match="no column 'target_items'"):
        UserRowFiles(**{**files.__dict__, "has_target": True}).to_dataset()


def test_rows_that_training_cannot_take_are_refused(tmp_path):
    dataset, table = small_table()
    rows = rows_from_arrow(table)
    assert checked(rows, 4, "here") is rows
    with pytest.raises(ValueError, match="here: item id 3 is out of range for 3 items"):
        checked(rows, 3, "here")
    unsorted = type(rows)(rows.users, rows.indptr, rows.indices[::-1].copy(), rows.values)
    with pytest.raises(ValueError, match="not sorted and distinct"):
        checked(unsorted, 4, "here")
    # Out of range in a file: named with the file.
    files = files_of(tmp_path, table, dataset)
    narrow = UserRowFiles(**{**files.__dict__, "num_items": 3})
    with pytest.raises(ValueError, match="rows-00000.parquet: item id 3 is out of range"):
        narrow.to_dataset()


def test_rows_out_of_range_are_refused_when_the_cluster_reads_them(ray_session, tmp_path):
    """Training and evaluation take the rows on trust: the read checks them, once, and names
    the file, before any worker starts."""
    dataset, table = small_table()
    files = files_of(tmp_path, table, dataset)
    narrow = UserRowFiles(**{**files.__dict__, "num_items": 3})
    with pytest.raises(ValueError, match="rows-00000.parquet: item id 3 is out of range"):
        Recoder(DynamicAutoencoder([4]), num_workers=0).train(narrow, batch_size=2)
    recoder = Recoder(DynamicAutoencoder([4]), num_workers=0, seed=0)
    recoder.train(type(dataset)(dataset.interactions[:, :3]), batch_size=2)  # 3 items
    with pytest.raises(ValueError, match="rows-00000.parquet: item id 3 is out of range"):
        recoder.evaluate(narrow, metrics=[NDCG(k=2)])


def test_an_earlier_format_asks_for_prepare_again(tmp_path):
    (tmp_path / "split.json").write_text(
        json.dumps({"format": "recoder_dist.prepared", "version": 1})
    )
    with pytest.raises(ValueError, match="run prepare again"):
        open_prepared(tmp_path)


def test_a_prepare_that_fails_halfway_leaves_the_earlier_split(
    prepared_ml100k, monkeypatch, tmp_path
):
    folder = tmp_path / "prepared"
    shutil.copytree(prepared_ml100k, folder)
    before = json.loads((folder / "split.json").read_text())
    files_before = sorted(p.name for p in folder.iterdir())
    written = []

    def fail_at_test(table, folder, name, dataset):
        if name.startswith("test"):
            raise OSError("disk full")
        written.append(name)
        return write_user_rows(table, folder, name, dataset)

    monkeypatch.setattr(prepare_module, "write_user_rows", fail_at_test)
    pairs = load_prepared(folder).split.train.interactions.tocoo()
    events = pd.DataFrame({"user": pairs.row, "item": pairs.col, "value": 1.0})
    with pytest.raises(OSError, match="disk full"):
        prepare_module.prepare(events, folder, prepare_module.StrongSplitConfig(50, 50, seed=3))
    assert written  # it got halfway
    assert json.loads((folder / "split.json").read_text()) == before
    assert sorted(p.name for p in folder.iterdir()) == files_before
    assert len(load_prepared(folder).split.test) == 100


def test_bad_rows_in_a_bucket_get_the_local_paths_errors(
    ray_session, s3_server, tmp_path, monkeypatch
):
    """The files read from S3 (moto) are refused as the local ones are, each error naming the
    file: a missing file, a column of the wrong type, an item id beyond the catalog, and a
    description that disagrees with the files."""
    from recoder_dist import storage

    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)

    dataset, table = small_table()
    files = files_of(tmp_path, table, dataset)

    def uploaded(name: str, table_or_none) -> UserRowFiles:
        location = s3_server.uri(f"rows/{name}")
        if table_or_none is not None:
            local = tmp_path / f"{name}.parquet"
            pq.write_table(table_or_none, local)
            storage.upload(str(local), storage.join(location, files.files[0]))
        return UserRowFiles(**{**files.__dict__, "location": location})

    missing = uploaded("missing", None)
    with pytest.raises(FileNotFoundError, match=r"rows-00000.parquet\S* is missing"):
        missing.ray_dataset()
    wrong = table.set_column(
        table.schema.get_field_index("items"),
        "items",
        table.column("items").cast(pa.list_(pa.int64())),
    )
    with pytest.raises(ValueError, match=r"rows-00000.parquet\S*.*column 'items' is list<\w+"):
        uploaded("wrong", wrong).ray_dataset()
    narrow = UserRowFiles(**{**uploaded("narrow", table).__dict__, "num_items": 3})
    with pytest.raises(ValueError, match=r"rows-00000.parquet\S*: item id 3 is out of range"):
        narrow.to_dataset()
    with pytest.raises(ValueError, match="hold 3 rows, the description says 5"):
        UserRowFiles(**{**uploaded("counted", table).__dict__, "num_rows": 5}).row_blocks(2)
