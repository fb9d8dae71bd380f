"""Checkpoints written shard by shard: 3 gloo ranks each write their file after an Adam step;
the files load as the whole model in one process, and as the shards of 2 ranks, equal to the
state gathered from the 3 ranks (the collective path, itself checked against one process in
test_sharded_step)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.fs
import pytest
import ray.train
import torch
import torch.distributed as dist

from recoder_dist import storage
from recoder_dist.retrying_fs import RetryingHandler
from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.checkpoint import (
    load_shards,
    save_shard,
    shard_file,
    shard_files,
    shards_to_read,
)
from recoder_dist.sharded.state import (
    sharded_optimizer_state,
    sharded_state,
    table_rows,
)
from recoder_dist.training.checkpoint import (
    HISTORY_FILE,
    SHARDED_FILE,
    export_snapshot,
    read_restorable,
)
from recoder_dist.training.snapshot import Snapshot, load_snapshot, save_snapshot
from recoder_dist.training.worker.optimizers import build_optimizers
from tests.damage import alter_a_tensor_byte
from tests.sharded_harness import (
    assert_equal_states,
    gathered_optimizer_state,
    gathered_state,
    interactions,
    rank_entries,
    run_ranks,
)

NUM_ITEMS = 23


def _model(sparse: bool, constrained: bool, seed: int | None = 4) -> ShardedAutoencoder:
    return ShardedAutoencoder(
        NUM_ITEMS, [6, 4], is_constrained=constrained, sparse=sparse, seed=seed
    )


def _save(rank, world, folder, sparse, constrained):
    """An Adam step on every rank's users (so that the moments are not zeros), then each
    rank's shard file; rank 0 also saves the whole state gathered by collectives."""
    model = _model(sparse, constrained)
    optimizers = build_optimizers(model, "adam", 0.05, 0.0)
    matrix = interactions(12, NUM_ITEMS, 20, seed=rank)
    share, _ = model.loss(*rank_entries(matrix, torch.arange(12).numpy()), loss="logloss")
    share.backward()
    model.all_reduce_dense_grads()
    optimizers.step()
    save_shard(folder, model, optimizers)
    whole = gathered_state(model), gathered_optimizer_state(optimizers, model)
    if rank == 0:
        torch.save(whole, os.path.join(folder, "whole.pt"))


def _load(rank, world, folder, sparse, constrained):
    """Each rank's rows of the 3-rank files, as slicing the whole state gives them."""
    whole_model, whole_optimizers = torch.load(os.path.join(folder, "whole.pt"))
    model = _model(sparse, constrained, seed=None)
    optimizers = build_optimizers(model, "adam", 0.05, 0.0)
    model_state, optimizer_state = load_shards(
        shard_files(folder), model.world, rank, table_rows(model)
    )
    assert_equal_states(model_state, sharded_state(whole_model, model))
    expected_optimizers = sharded_optimizer_state(whole_optimizers, optimizers, model)
    assert_equal_states(optimizer_state, expected_optimizers)
    model.load_state_dict(model_state)  # the states fit the model and its optimizers
    optimizers.load_state_dict(optimizer_state)


def _meta(epoch: int) -> Snapshot:
    """The snapshot beside the shards: class, hyper-parameters and epoch, no weights."""
    return Snapshot(
        model_class="recoder_dist.nn.autoencoder.DynamicAutoencoder",
        model_params={},
        model_state={},
        num_items=NUM_ITEMS,
        num_users=None,
        epoch=epoch,
    )


@pytest.mark.parametrize("sparse,constrained", [(True, False), (False, True)])
def test_shard_files_load_whole_and_on_another_world(tmp_path, sparse, constrained):
    run_ranks(3, _save, str(tmp_path), sparse, constrained)
    assert [os.path.basename(p) for p in shard_files(str(tmp_path))] == [
        shard_file(rank, 3) for rank in range(3)
    ]
    whole_model, whole_optimizers = torch.load(tmp_path / "whole.pt")
    model_state, optimizer_state = load_shards(shard_files(str(tmp_path)), 1, 0)
    assert_equal_states(model_state, whole_model)
    assert_equal_states(optimizer_state, whole_optimizers)
    if constrained:  # a tied table stays one tensor
        assert model_state["encoder_embedding.weight"] is model_state["decoder_embedding.weight"]
    run_ranks(2, _load, str(tmp_path), sparse, constrained)


def test_shards_of_format_1_still_load(tmp_path):
    """Format 1 (item tables only: one "num_items", no rows per optimizer state) is read as
    format 2: the same files, rewritten as format 1 wrote them, load to the same state."""
    run_ranks(2, _save, str(tmp_path), True, False)
    files = shard_files(str(tmp_path))
    expected = load_shards(files, 1, 0)
    for path in files:
        shard = torch.load(path)
        del shard["checksum"]  # format 1 had none
        shard.update(
            version=1,
            num_items=NUM_ITEMS,
            tables=sorted(shard["tables"]),
            optimizer_rows=[entry[:3] for entry in shard["optimizer_rows"]],
        )
        torch.save(shard, path)
    for actual, wanted in zip(load_shards(files, 1, 0), expected):  # model, optimizers
        assert_equal_states(actual, wanted)


def test_incomplete_or_damaged_shards_are_refused(tmp_path):
    run_ranks(2, _save, str(tmp_path), True, False)
    files = shard_files(str(tmp_path))
    intact = Path(files[1]).read_bytes()
    alter_a_tensor_byte(files[1])  # torch.load would not notice
    with pytest.raises(ValueError, match=f"{files[1]} is damaged"):
        load_shards(files, 1, 0)
    Path(files[1]).write_bytes(intact)
    with pytest.raises(ValueError, match="rows"):
        load_shards(files[:1], 1, 0)
    other_catalog = {key: NUM_ITEMS + 1 for key in torch.load(files[0])["tables"]}
    with pytest.raises(ValueError, match="a shard of tables"):
        load_shards(files, 1, 0, other_catalog)
    os.rename(files[1], tmp_path / "elsewhere.pt")
    (tmp_path / shard_file(2, 3)).write_bytes(b"")
    with pytest.raises(ValueError, match="one file for every rank"):
        shard_files(str(tmp_path))
    (tmp_path / shard_file(2, 3)).unlink()
    (tmp_path / shard_file(1, 2)).write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="not a readable shard"):
        load_shards(shard_files(str(tmp_path)), 1, 0)


def test_a_sharded_checkpoint_in_a_bucket_exports_one_snapshot(s3_server, tmp_path, monkeypatch):
    """What rank 0 and the sweep do with a sharded run's checkpoint in S3 storage: the files
    downloaded and assembled into one snapshot, equal to the state gathered from the ranks."""
    for name, value in s3_server.credentials_env().items():
        monkeypatch.setenv(name, value)
    folder = tmp_path / "epoch_3"
    folder.mkdir()
    run_ranks(2, _save, str(folder), True, False)
    whole_model, _ = torch.load(folder / "whole.pt")
    (folder / "whole.pt").unlink()
    save_snapshot(_meta(3), folder / SHARDED_FILE)
    for path in folder.iterdir():
        storage.upload(str(path), s3_server.uri(f"runs/r/epoch_3/{path.name}"))

    exported = export_snapshot(s3_server.uri("runs/r/epoch_3"), s3_server.uri("out/m.model"))
    snapshot = load_snapshot(exported)
    assert snapshot.epoch == 3
    assert_equal_states(snapshot.model_state, whole_model)
    local = load_snapshot(export_snapshot(str(folder), str(tmp_path / "local.model")))
    assert_equal_states(local.model_state, whole_model)


def test_a_rank_reads_the_saved_shards_that_hold_its_rows():
    """Against every row's saved and new rank, for worlds 1-6 (rows enough for every pair)."""
    for saved in range(1, 7):
        for world in range(1, 7):
            for rows in (saved * world, saved * world + 5):
                for rank in range(world):
                    holding = {i % saved for i in range(rows) if i % world == rank}
                    assert shards_to_read(saved, world, rank) == sorted(holding), (saved, world)


class CountingHandler(RetryingHandler):
    """This machine's disk read as remote storage (each file downloaded before it is read),
    noting the files opened for reading."""

    def __init__(self, location: str, opened: list[str]):
        super().__init__(location)
        self.opened = opened

    def open_input_stream(self, path):
        self.opened.append(path)
        return super().open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return super().open_input_file(path)


def _resume(rank, world, run, whole_file, expected_epoch, out):
    """Rank ``rank`` of 2 restores the run's last checkpoint from its storage, the ranks
    agreeing by an all-reduce; writes the files it opened and its notes to ``out``."""
    model = _model(True, False, seed=None)
    optimizers = build_optimizers(model, "adam", 0.05, 0.0)
    opened, notes = [], []
    fs = pyarrow.fs.PyFileSystem(CountingHandler(f"file://{run}", opened))

    def everyone(ok: bool) -> bool:
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    checkpoint = ray.train.Checkpoint(os.path.join(run, "epoch_2"), filesystem=fs)
    snapshot, history = read_restorable(checkpoint, model, optimizers, everyone, notes.append)
    assert snapshot.epoch == expected_epoch and history == [{"epoch": expected_epoch}]
    whole_model, whole_optimizers = torch.load(whole_file)
    assert_equal_states(snapshot.model_state, sharded_state(whole_model, model))
    expected_optimizers = sharded_optimizer_state(whole_optimizers, optimizers, model)
    assert_equal_states(snapshot.optimizer_state, expected_optimizers)
    torch.save((opened, notes), os.path.join(out, f"rank{rank}.pt"))


def test_each_rank_downloads_only_its_shards_and_the_ranks_agree_on_a_checkpoint(tmp_path):
    """A 4-rank run's checkpoints (epochs 1 and 2, the same rows) in remote storage, restored
    on 2 ranks: rank r downloads the shards r and r + 2 of the last checkpoint, the snapshot and
    the records, nothing else. Then one shard of epoch 2 is damaged: only rank 1 reads it, and
    both ranks restore epoch 1 (a rank that went on alone with epoch 2 would train another
    model than its peer)."""
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    run_ranks(4, _save, str(tmp_path), True, False)
    whole = tmp_path / "whole.pt"
    for epoch in (1, 2):
        folder = run / f"epoch_{epoch}"
        folder.mkdir(parents=True)
        for path in shard_files(str(tmp_path)):
            shutil.copy(path, folder)
        save_snapshot(_meta(epoch), str(folder / SHARDED_FILE))
        (folder / HISTORY_FILE).write_text(json.dumps([{"epoch": epoch}]))

    run_ranks(2, _resume, str(run), str(whole), 2, str(out))
    last = run / "epoch_2"
    for rank in (0, 1):
        opened, notes = torch.load(out / f"rank{rank}.pt")
        names = [shard_file(rank, 4), shard_file(rank + 2, 4), SHARDED_FILE, HISTORY_FILE]
        assert sorted(opened) == sorted(str(last / name) for name in names)
        assert notes == []

    damaged = last / shard_file(3, 4)
    alter_a_tensor_byte(damaged)
    run_ranks(2, _resume, str(run), str(whole), 1, str(out))
    opened, notes = torch.load(out / "rank0.pt")
    assert str(damaged) not in opened and notes == []  # rank 0's own files read whole
    opened, notes = torch.load(out / "rank1.pt")
    assert len(notes) == 1 and f"cannot resume from {last}" in notes[0]
    assert f"{damaged} is damaged" in notes[0]
