"""The launcher's parts that Ray runs: the evaluation users dealt out to the workers once, live
progress that a lost actor cannot break, checkpoints uploaded once per epoch, and Ray's
deprecations as test failures."""

from __future__ import annotations

import logging
import os
import time
import warnings

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from ray.util.annotations import RayDeprecationWarning

from recoder_dist.data import RecommendationDataset
from recoder_dist.data.ray_dataset import to_ray_dataset
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.checkpoint import read_checkpoint
from recoder_dist.training.driver.launcher import EvalSplit
from recoder_dist.training.driver.progress import ProgressPrinter
from recoder_dist.training.snapshot import load_snapshot
from tests.ml100k import ml100k_split


def users_of(iterator) -> list[int]:
    return [u for t in iterator.iter_batches(batch_format="pyarrow") for u in t["user"].to_pylist()]


@pytest.mark.parametrize("rows, rows_per_block", [(1000, 64), (10, 64), (130, 1)])
def test_eval_split_gives_every_user_to_exactly_one_worker(ray_session, rows, rows_per_block):
    table = pa.table({"user": np.arange(rows) * 7, "position": np.arange(rows)})
    dataset = to_ray_dataset(table, rows_per_block).materialize()
    for world in (1, 2, 3, 5):
        shards = EvalSplit().configure({"eval": dataset}, world, None, None)
        parts = [users_of(shard["eval"]) for shard in shards]
        assert len(parts) == world
        assert sorted(u for part in parts for u in part) == list(np.arange(rows) * 7), world
        blocks = -(-rows // rows_per_block)
        if blocks >= world:  # runs of whole blocks, one more in some, the short last in one
            sizes = [len(part) for part in parts]
            assert max(sizes) - min(sizes) < 2 * rows_per_block, (world, sizes)
        # The same worker gets the same users every time (every evaluation of a run).
        again = EvalSplit().configure({"eval": dataset}, world, None, None)
        assert [users_of(shard["eval"]) for shard in again] == parts


def test_a_lost_progress_actor_stops_the_lines_not_the_driver(ray_session, caplog):
    record = {"epoch": 1, "last_epoch": 2, "loss": 1.5, "seconds": 0.1}
    with (
        caplog.at_level(logging.INFO, logger="recoder_dist"),
        ProgressPrinter(interval_s=0.05) as p,
    ):
        ray.get(p.log.append.remote(record))
        p._drain()
        ray.kill(p.log)  # asynchronous: calls sent just after it may still be served
        deadline = time.monotonic() + 30
        while "progress lines stop here" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)  # the printer's thread notices the loss on its own
        p.log.append.remote({**record, "epoch": 2})  # what a worker sends on: never waited for
    assert "epoch 1/2  loss 1.5000" in caplog.text
    assert "progress lines stop here" in caplog.text
    assert "epoch 2/2" not in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_checkpoints_are_named_by_epoch_and_the_users_copy_is_the_uploaded_snapshot(
    ray_session, tmp_path, workers
):
    """One worker's checkpoint is one whole snapshot. Two workers shard the tables: each
    writes its own rows (no whole snapshot in the run's storage), and the user's copy is the
    model assembled from the shard files."""
    data = RecommendationDataset(ml100k_split().train.interactions[:200])
    model = DynamicAutoencoder(hidden_layers=[16], sparse=True)
    recoder = Recoder(
        model, num_workers=workers, seed=3, storage_path=str(tmp_path / "runs"), run_name="r"
    )
    history = recoder.train(
        data,
        batch_size=50,
        num_epochs=3,
        checkpoint_freq=1,
        model_checkpoint_prefix=str(tmp_path / "model"),
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    run = tmp_path / "runs" / "r"
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("epoch_"))
    assert kept == ["epoch_2", "epoch_3"]  # num_to_keep=2
    files = {p.name for p in (run / "epoch_3").iterdir()}
    if workers == 1:
        assert files == {"snapshot.pt", "history.json"}
    else:
        assert files == {
            "sharded_snapshot.pt",
            "history.json",
            "shard_00000_of_00002.pt",
            "shard_00001_of_00002.pt",
        }
    for epoch in (2, 3):
        ours = load_snapshot(tmp_path / f"model_epoch_{epoch}.model")
        theirs, _ = read_checkpoint(str(run / f"epoch_{epoch}"))
        assert ours.epoch == theirs.epoch == epoch
        for name, tensor in theirs.model_state.items():
            assert torch.equal(ours.model_state[name], tensor), name
        assert ours.optimizer_state["sparse"]["state"].keys() == (
            theirs.optimizer_state["sparse"]["state"].keys()
        )
    # The trained model is the last checkpoint's.
    last, records = read_checkpoint(str(run / "epoch_3"))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for name, tensor in recoder.model.state_dict().items():
        assert torch.equal(last.model_state[name], tensor), name


def test_ray_deprecations_fail_the_tests():
    """pyproject.toml turns Ray's deprecation warnings into errors: an API of Ray that Ray
    deprecates fails the test that reaches it, instead of scrolling by."""
    with pytest.raises(RayDeprecationWarning):
        warnings.warn("a deprecated Ray API", RayDeprecationWarning, stacklevel=1)
    assert os.environ.get("RECODER_DIST_VERBOSE") is None  # no switch through the environment


class RaisesOnFirstBatch(torch.nn.Module):
    """A loss that raises in the worker, as a bad value met there would."""

    def forward(self, input, target):
        raise ValueError("a mistake met on the worker")


@pytest.mark.slow
def test_a_workers_mistake_reaches_the_driver_as_one_line(ray_session):
    from ray.train import TrainingFailedError

    from recoder_dist.cli import _user_error

    data = RecommendationDataset(ml100k_split().train.interactions[:100])
    recoder = Recoder(DynamicAutoencoder([8]), loss=RaisesOnFirstBatch(), num_workers=1, seed=1)
    with pytest.raises(TrainingFailedError) as failed:
        recoder.train(data, batch_size=50)
    assert "a mistake met on the worker" in str(failed.value)  # with the rank's traceback
    mistake = _user_error(failed.value)  # what the CLI prints, in one line, exit status 2
    assert isinstance(mistake, ValueError) and str(mistake) == "a mistake met on the worker"
    assert _user_error(RuntimeError("a bug")) is None  # a bug keeps its traceback


def test_a_node_gone_since_it_was_listed_is_not_a_node_that_cannot_see(ray_session, tmp_path):
    """The storage check asks every other node whether it sees the run's folder. A node that
    an autoscaler removed between the listing and the question runs no worker: it is skipped,
    not reported as blind (the fake GPU cluster's test met this race)."""
    from recoder_dist.training.driver.storage_check import _nodes_that_cannot_see

    here = ray.get_runtime_context().get_node_id()
    gone = {"NodeID": "ab" * 28, "NodeManagerAddress": "10.9.9.9"}  # no such node
    alive = {"NodeID": here, "NodeManagerAddress": "this node"}
    assert _nodes_that_cannot_see(str(tmp_path / "runs"), [gone, alive]) == []
