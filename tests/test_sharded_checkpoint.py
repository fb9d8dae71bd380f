"""Checkpoints written shard by shard: 3 gloo ranks each write their file after an Adam step;
the files load as the whole model in one process, and as the shards of 2 ranks, equal to the
state gathered from the 3 ranks (the collective path, itself checked against one process in
test_sharded_step)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from recoder_dist import storage
from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.checkpoint import load_shards, save_shard, shard_file, shard_files
from recoder_dist.sharded.state import (
    sharded_optimizer_state,
    sharded_state,
    table_rows,
)
from recoder_dist.training.checkpoint import SHARDED_FILE, export_snapshot
from recoder_dist.training.optimizers import build_optimizers
from recoder_dist.training.snapshot import Snapshot, load_snapshot, save_snapshot
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
    meta = Snapshot(
        model_class="recoder_dist.nn.autoencoder.DynamicAutoencoder",
        model_params={},
        model_state={},
        num_items=NUM_ITEMS,
        num_users=None,
        epoch=3,
    )
    save_snapshot(meta, folder / SHARDED_FILE)
    for path in folder.iterdir():
        storage.upload(str(path), s3_server.uri(f"runs/r/epoch_3/{path.name}"))

    exported = export_snapshot(s3_server.uri("runs/r/epoch_3"), s3_server.uri("out/m.model"))
    snapshot = load_snapshot(exported)
    assert snapshot.epoch == 3
    assert_equal_states(snapshot.model_state, whole_model)
    local = load_snapshot(export_snapshot(str(folder), str(tmp_path / "local.model")))
    assert_equal_states(local.model_state, whole_model)
