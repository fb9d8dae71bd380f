"""Training with sharded tables through Ray Train against one process fed the same global
batches: N workers train the model that one process trains on their batches together
(``batch_size`` users a step in all, split over the workers).

The reference rebuilds every rank's batches of every epoch (``epoch_batches``, the workers'
own function, from the same row blocks and seeds), joins each step's batches into the global
batch (its users in rank order, scored on the union of the ranks' sampled items) and takes
DynamicAutoencoder's plain step on it. No noise or dropout: their draws differ by rank.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray.train
import torch

from recoder_dist.data import RecommendationDataset
from recoder_dist.data.collator import Collator, SparseBatch
from recoder_dist.losses import build_loss
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder, read_training_rows
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.sharded.checkpoint import shard_files
from recoder_dist.training.checkpoint import read_checkpoint
from recoder_dist.training.config import TrainSettings
from recoder_dist.training.worker.optimizers import build_optimizers
from recoder_dist.training.worker.schedule import agreed_steps, epoch_batches
from recoder_dist.training.worker.sharded_step import rank_batch
from recoder_dist.training.worker.step import batch_loss
from recoder_dist.training.worker.worker_loop import _epoch_seed
from tests.ml100k import ml100k_split

pytestmark = pytest.mark.slow
MODEL = dict(hidden_layers=[16, 8], activation_type="tanh", sparse=True)
# A step's global batch and sampling group (42 and 84 users a rank on 2 workers, 28 and 56
# on 3).
TRAIN = dict(batch_size=84, num_sampling_users=168, lr=0.01, negative_sampling=True)
SEED = 3


def _joined(batches: list[SparseBatch]) -> SparseBatch:
    """The global batch of the ranks' ``batches``: users in rank order, scored on the union
    of their sampled items."""
    items = np.unique(np.concatenate([b.items for b in batches]))
    offsets = np.cumsum([0] + [b.shape[0] for b in batches])
    return SparseBatch(
        users=np.concatenate([b.users for b in batches]),
        items=items,
        rows=np.concatenate([b.rows + o for b, o in zip(batches, offsets)]),
        cols=np.concatenate([np.searchsorted(items, b.items[b.cols]) for b in batches]),
        values=np.concatenate([b.values for b in batches]),
        shape=(int(offsets[-1]), len(items)),
    )


def _reference_epochs(
    model, optimizers, rows, num_items, world, epochs, loss="logloss", groups: int = 1
):
    """One process's epochs ``epochs`` on the global batches of ``world`` ranks; the mean
    loss of each epoch. With ``groups`` groups of ranks (the 2D layout: tables sharded within
    a group, replicated across), a step's loss is the mean of the groups' losses, each on the
    joined batch of its ranks (scored on its own sampled items). Each epoch seeds torch as a
    worker of rank 0 does, and each step gets the run's step count (a model's own terms)."""
    settings = TrainSettings(
        lr=TRAIN["lr"],
        weight_decay=0.0,
        num_epochs=1,
        batch_size=TRAIN["batch_size"],
        num_sampling_users=TRAIN["num_sampling_users"],
        negative_sampling=True,
        num_train_rows=rows.blocks.num_rows,
    )
    collators = [
        Collator(
            num_items=num_items,
            **dict(
                zip(
                    ("batch_size", "num_sampling_users"),
                    rank_batch(TRAIN["batch_size"], TRAIN["num_sampling_users"], world),
                )
            ),
        )
        for rank in range(world)
    ]
    steps = min(agreed_steps(settings, c, world, torch.device("cpu")) for c in collators)
    loss_fn = build_loss(loss)
    losses = []
    for epoch in epochs:
        ranks = [
            epoch_batches(rows.blocks, collators[rank], steps, (SEED, epoch, rank), world)
            for rank in range(world)
        ]
        total, users = 0.0, 0
        size = world // groups
        torch.manual_seed(_epoch_seed(SEED, epoch, 0))
        for step, batches in enumerate(zip(*ranks), start=(epoch - 1) * steps):
            optimizers.zero_grad()
            for start in range(0, world, size):
                batch = _joined(list(batches[start : start + size]))
                loss = batch_loss(
                    model, loss_fn, batch, torch.device("cpu"), epoch=epoch, step=step
                )
                (loss / groups).backward()
                total += loss.item() * batch.shape[0]
                users += batch.shape[0]
            optimizers.step()
        losses.append(total / users)
    return losses


def _close(actual: dict, expected: dict):
    # Summed in another order, a few of the 23,152 rows' elements (11-13 with seed 3) differ
    # by up to 2e-5 after Adam divides a near-zero gradient by its near-zero second moment,
    # and no more after 2 epochs than after 1; a step of lr=0.01 that went wrong or was lost
    # moves an element by up to 1e-2.
    for key, value in expected.items():
        gap = (actual[key] - value).abs().max().item()
        assert torch.allclose(actual[key], value, rtol=1e-4, atol=5e-5), f"{key}: {gap}"


def test_workers_train_the_model_of_one_process_on_their_joined_batches(straight):
    split = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split.train.interactions[:400]))
    num_items = split.train.num_items
    reference = DynamicAutoencoder(**MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # the initial weights that Recoder draws from its seed
        reference.init_model(num_items=num_items)
    optimizers = build_optimizers(reference, "adam", TRAIN["lr"], 0.0)
    losses = _reference_epochs(reference, optimizers, rows, num_items, 2, [1, 2, 3])
    _close(straight.model.state_dict(), reference.state_dict())
    history = straight.history
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-5)
    # The evaluation of the last epoch (every rank with the whole model) is one process's.
    straight.num_workers = 0  # the module's run: put back for the other test
    try:
        expected = straight.evaluate(split.test, 50, [Recall(k=20), NDCG(k=50)], batch_size=40)
    finally:
        straight.num_workers = 2
    for name in ("Recall@20", "NDCG@50"):
        assert history[-1][name] == pytest.approx(expected[name], abs=1e-6)


def test_a_three_worker_checkpoint_resumes_on_two(ray_session, tmp_path):
    """A run of 3 workers leaves its checkpoint of epoch 1 (three shard files); the run
    started again under its name on 2 workers resumes from it, each rank taking its rows of
    the weights and Adam's moments from every file, and trains epoch 2 as one process
    continues the checkpoint's model on the 2 ranks' batches."""
    split = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split.train.interactions[:300]))
    num_items = split.train.num_items

    def run(workers: int, epochs: int) -> Recoder:
        recoder = Recoder(
            DynamicAutoencoder(**MODEL),
            num_items=num_items,
            num_workers=workers,
            seed=SEED,
            cpus_per_worker=1,
            storage_path=str(tmp_path),
            run_name="resharded",
        )
        recoder.train(rows, num_epochs=epochs, checkpoint_freq=1, **TRAIN)
        return recoder

    first = run(3, 1)
    folder = str(tmp_path / "resharded" / "epoch_1")
    assert len(shard_files(folder)) == 3
    saved, _ = read_checkpoint(folder)  # the whole model, assembled in this process
    reference = DynamicAutoencoder(**MODEL)
    reference.init_model(num_items=num_items)
    reference.load_state_dict(saved.model_state)
    optimizers = build_optimizers(reference, "adam", TRAIN["lr"], 0.0)
    optimizers.load_state_dict(saved.optimizer_state)

    resumed = run(2, 2)
    # Epoch 1's record is the checkpoint's (a fresh run would have timed its own).
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    _reference_epochs(reference, optimizers, rows, num_items, 2, [2])
    _close(resumed.model.state_dict(), reference.state_dict())


def test_two_groups_of_two_workers_shard_within_and_replicate_across(ray_session, tmp_path):
    """The 2D layout (``shard_group_size=2`` on 4 workers): each pair of workers shards the
    tables, the two pairs hold replicas and average their gradients; the run trains the
    model of one process that averages the two pairs' batch losses a step. Its checkpoint
    holds one replica's two shards, and evaluation equals one process's."""
    split = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split.train.interactions[:400]))
    num_items = split.train.num_items
    recoder = Recoder(
        DynamicAutoencoder(**MODEL),
        num_items=num_items,
        num_workers=4,
        cpus_per_worker=1,
        seed=SEED,
        shard_group_size=2,
        storage_path=str(tmp_path),
        run_name="two-groups",
    )
    history = recoder.train(
        rows,
        val_dataset=split.test,
        eval_freq=2,
        metrics=[Recall(k=20)],
        num_epochs=2,
        **TRAIN,
    )
    assert len(shard_files(str(tmp_path / "two-groups" / "epoch_2"))) == 2

    reference = DynamicAutoencoder(**MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        reference.init_model(num_items=num_items)
    optimizers = build_optimizers(reference, "adam", TRAIN["lr"], 0.0)
    losses = _reference_epochs(reference, optimizers, rows, num_items, 4, [1, 2], groups=2)
    _close(recoder.model.state_dict(), reference.state_dict())
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-5)
    recoder.num_workers = 0
    expected = recoder.evaluate(split.test, 20, [Recall(k=20)], batch_size=40)
    assert history[-1]["Recall@20"] == pytest.approx(expected["Recall@20"], abs=1e-6)


class CrashingRecall(Recall):
    """Recall@k that kills the worker process of rank 1 at its ``at_call``-th batch, the first
    time only (a marker file remembers it across the restart): a worker lost in a sharded
    run's evaluation, where the loss (built-in, for the sharded decoder) cannot crash."""

    def __init__(self, k: int, marker: str, at_call: int):
        super().__init__(k)
        self.marker, self.at_call, self.calls = marker, at_call, 0

    def evaluate_hits(self, hits, num_relevant):
        self.calls += 1
        rank = ray.train.get_context().get_world_rank()
        if self.calls == self.at_call and rank == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().evaluate_hits(hits, num_relevant)


def _crash_run(tmp_path, name: str, at_call: int, profile: bool = False) -> Recoder:
    split = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split.train.interactions[:400]))
    recoder = Recoder(
        DynamicAutoencoder(**MODEL),
        num_items=split.train.num_items,
        num_workers=2,
        seed=SEED,
        max_failures=1,
        storage_path=str(tmp_path / name),
    )
    metric = CrashingRecall(20, str(tmp_path / "crash-marker"), at_call)
    recoder.train(
        rows,
        val_dataset=split.test,
        eval_freq=1,
        checkpoint_freq=1,
        metrics=[metric, NDCG(k=50)],
        num_epochs=3,
        profile=profile,
        **TRAIN,
    )
    return recoder


def straight_run(tmp_path) -> Recoder:
    """A 2-worker run of 3 epochs, evaluated and checkpointed every epoch (conftest's
    ``sharded_run``, once a session): the model that one process trains on the joined batches,
    the weights that a crashed run resumes to, and those of a profiled run
    (tests/test_step_profile.py). Its tests must not change it."""
    return _crash_run(tmp_path, "straight", at_call=-1)


@pytest.fixture
def straight(sharded_run) -> Recoder:
    return sharded_run


def test_a_sharded_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(straight, tmp_path):
    """A worker lost in epoch 2's evaluation (each rank scores its 75 test users in one
    batch an epoch): the run restarts from epoch 1's checkpoint, each rank reading its rows
    (weights and Adam's moments) from the shard files, and ends where a straight run ends."""
    crashed = _crash_run(tmp_path, "crashed", at_call=2)
    assert (tmp_path / "crash-marker").is_file()  # the crash did happen
    # Each rank wrote its own rows: no whole snapshot in the run's storage.
    written = {p.name for p in (tmp_path / "crashed").glob("*/epoch_*/*")}
    assert written == {
        "sharded_snapshot.pt",
        "history.json",
        "shard_00000_of_00002.pt",
        "shard_00001_of_00002.pt",
    }, written
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(crashed.model.state_dict()[name], tensor, rtol=0, atol=0)
    epochs = [h["epoch"] for h in crashed.history]
    assert epochs.count(1) == 1 and epochs[-2:] == [2, 3], epochs
    assert crashed.history[-1]["Recall@20"] == straight.history[-1]["Recall@20"]
