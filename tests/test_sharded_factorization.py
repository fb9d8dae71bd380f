"""MatrixFactorization with its user table and item tables sharded, on 1, 2 and 3 gloo ranks,
against the whole MatrixFactorization in one process on the global batch: losses and tables
after optimizer steps (every loss, with and without negative sampling, sparse and dense
tables), the initial weights drawn shard by shard, the top-k lists and metric sums of
evaluation, and checkpoint shards whose tables have different row counts (users and items)
loaded whole and on another world size.

Each process computes the single-process reference itself (the same seed, the whole global
batch) and compares; the global batches are split unevenly, with a rank of no users, and both
catalogs have rows that no step touches.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from recoder_dist.data.collator import Collator, UserRows
from recoder_dist.losses import build_loss
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.nn.factorization import MatrixFactorization
from recoder_dist.sharded.checkpoint import load_shards, save_shard, shard_files
from recoder_dist.sharded.factorization import ShardedFactorization
from recoder_dist.sharded.state import (
    sharded_optimizer_state,
    sharded_state,
)
from recoder_dist.training.evaluation.scoring import metric_sums, recommend_top_k
from recoder_dist.training.evaluation.sharded import sharded_eval_sums, sharded_top_k
from recoder_dist.training.worker.optimizers import build_optimizers
from recoder_dist.training.worker.step import batch_loss
from tests.sharded_harness import (
    assert_equal_states,
    gathered_optimizer_state,
    gathered_state,
    interactions,
    rank_entries,
    run_ranks,
    split,
)

NUM_ITEMS, TOUCHED, NUM_USERS = 23, 19, 26  # items 19-22 and users 20-25 are never touched
STEP_USERS = [np.array([4, 17, 0, 9, 12, 3, 19, 8, 1, 15]), np.array([2, 6, 11, 5, 18])]
SIZES = {1: [[10], [5]], 2: [[7, 3], [0, 5]], 3: [[6, 0, 4], [2, 2, 1]]}
CASES = list(
    itertools.product(
        ["mse", "logistic", "logloss"],
        [True, False],  # negative sampling
        [("sgd", False), ("adam", True), ("adam", False)],  # optimizer, sparse tables
    )
)
TOL = dict(rtol=1e-4, atol=1e-5)
CPU = torch.device("cpu")


def _reference(sparse: bool, activation: str, seed: int) -> MatrixFactorization:
    torch.manual_seed(seed)
    model = MatrixFactorization(5, activation_type=activation, sparse=sparse)
    model.init_model(num_items=NUM_ITEMS, num_users=NUM_USERS)
    with torch.no_grad():  # non-zero biases, so that their equality means something
        model.item_bias.weight.normal_()
    return model


def _close(actual, expected, what):
    if not torch.allclose(actual, expected, **TOL):
        raise AssertionError(f"{what}: max difference {(actual - expected).abs().max().item()}")


def _steps(rank, world):
    matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=1)
    for number, case in enumerate(CASES):
        loss, negative_sampling, (optimizer, sparse) = case
        reference = _reference(sparse, "tanh" if number % 2 else "none", seed=number)
        sharded = ShardedFactorization.like(reference)
        reference_opt = build_optimizers(reference, optimizer, 0.05, 0.0)
        sharded_opt = build_optimizers(sharded, optimizer, 0.05, 0.0)
        for users, sizes in zip(STEP_USERS, SIZES[world]):
            collate = Collator(
                num_items=NUM_ITEMS, batch_size=len(users), negative_sampling=negative_sampling
            )
            batch = next(collate(UserRows.from_csr(matrix, users)))
            expected = batch_loss(reference, build_loss(loss), batch, CPU)
            reference_opt.zero_grad()
            expected.backward()
            reference_opt.step()

            mine = users[split(sizes, rank)]
            rows, items, values, num_users = rank_entries(matrix, mine)
            share, total = sharded.loss(
                rows,
                items,
                values,
                num_users,
                users=torch.from_numpy(mine),
                loss=loss,
                negative_sampling=negative_sampling,
            )
            sharded_opt.zero_grad()
            share.backward()
            sharded.synchronize_grads()
            sharded_opt.step()
            _close(total, expected.detach(), f"{case} loss")
        gathered = gathered_state(sharded, dst=0)
        if rank == 0:
            for key, value in reference.state_dict().items():
                _close(gathered[key], value, f"{case}: {key}")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_steps_equal_one_process(world):
    run_ranks(world, _steps)


def _made_from_a_weightless_model(rank, world):
    """The driver's model without weights gives each rank its rows of the weights that
    ``init_model`` draws in one process after the same ``torch.manual_seed``."""
    torch.manual_seed(11)
    whole = MatrixFactorization(5)
    whole.init_model(num_items=NUM_ITEMS, num_users=NUM_USERS)
    torch.manual_seed(11)
    with torch.device("meta"):
        weightless = MatrixFactorization(5)
        weightless.init_model(num_items=NUM_ITEMS, num_users=NUM_USERS)
    sharded = ShardedFactorization.like(weightless)
    assert len(sharded.user_embedding.weight) == len(range(rank, NUM_USERS, world))
    assert len(sharded.item_embedding.weight) == len(range(rank, NUM_ITEMS, world))
    gathered = gathered_state(sharded, dst=None)
    for key, value in whole.state_dict().items():
        assert torch.equal(gathered[key], value), key


def test_initial_weights_are_drawn_shard_by_shard():
    run_ranks(3, _made_from_a_weightless_model)


def _evaluation(rank, world):
    """Each rank's users scored from the shards: the lists and metric sums of one process."""
    rng = np.random.default_rng(5)
    inputs = interactions(NUM_USERS, NUM_ITEMS, NUM_ITEMS, seed=6)
    targets = interactions(NUM_USERS, NUM_ITEMS, NUM_ITEMS, seed=7)
    targets = targets - targets.multiply(inputs > 0)  # no target among the inputs
    targets.eliminate_zeros()
    whole = _reference(False, "tanh", seed=3)
    with torch.no_grad():  # every score distinct
        for parameter in whole.parameters():
            parameter.normal_(std=0.5)
    whole.eval()
    model = ShardedFactorization.like(whole).eval()
    users = rng.permutation(NUM_USERS)  # not in rank order: ids reach any owner
    mine = np.array_split(users, world)[rank]
    rows = UserRows.from_csr(inputs, mine)
    items, valid = sharded_top_k(model, rows, 7, CPU)
    expected_items, expected_valid = recommend_top_k(whole, rows, NUM_ITEMS, 7, CPU)
    assert torch.equal(valid, expected_valid)
    assert torch.equal(items[valid], expected_items[expected_valid])

    metrics = [Recall(k=5), NDCG(k=7)]
    batch = [(rows, UserRows.from_csr(targets, mine))]
    sums, count = sharded_eval_sums(model, batch, metrics, 7, CPU)
    totals = torch.tensor([*sums, count], dtype=torch.float64)
    dist.all_reduce(totals)
    all_rows = UserRows.from_csr(inputs, users)
    expected_sums, expected_count = metric_sums(
        whole, all_rows, UserRows.from_csr(targets, users), metrics, 7, NUM_ITEMS, CPU
    )
    assert int(totals[-1]) == expected_count
    np.testing.assert_allclose(totals[:-1].numpy(), expected_sums, rtol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_from_the_shards_equals_one_process(world):
    run_ranks(world, _evaluation)


def _save(rank, world, folder):
    """A sparse Adam step (so that the moments of both catalogs' rows are not zeros), then
    each rank's shard file; rank 0 also keeps the state gathered by collectives."""
    reference = _reference(True, "none", seed=2)
    model = ShardedFactorization.like(reference)
    optimizers = build_optimizers(model, "adam", 0.05, 0.0)
    matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=rank)
    users = np.arange(rank, 20, world)
    share, _ = model.loss(
        *rank_entries(matrix, users), users=torch.from_numpy(users), loss="logloss"
    )
    share.backward()
    optimizers.step()
    save_shard(folder, model, optimizers)
    whole = gathered_state(model), gathered_optimizer_state(optimizers, model)
    if rank == 0:
        torch.save(whole, os.path.join(folder, "whole.pt"))


def _load(rank, world, folder):
    whole_model, whole_optimizers = torch.load(os.path.join(folder, "whole.pt"))
    model = ShardedFactorization(NUM_ITEMS, NUM_USERS, 5, sparse=True, seed=None)
    optimizers = build_optimizers(model, "adam", 0.05, 0.0)
    tables = {"user_embedding.weight": NUM_USERS, "item_embedding.weight": NUM_ITEMS}
    tables["item_bias.weight"] = NUM_ITEMS
    model_state, optimizer_state = load_shards(shard_files(folder), world, rank, tables)
    assert_equal_states(model_state, sharded_state(whole_model, model))
    expected_optimizers = sharded_optimizer_state(whole_optimizers, optimizers, model)
    assert_equal_states(optimizer_state, expected_optimizers)
    model.load_state_dict(model_state)
    optimizers.load_state_dict(optimizer_state)


def test_checkpoint_shards_load_whole_and_on_another_world(tmp_path):
    """Tables of 26 user rows and 23 item rows, saved by 3 ranks: loaded whole, and as 2
    ranks' shards, each table by its own layout."""
    run_ranks(3, _save, str(tmp_path))
    whole_model, whole_optimizers = torch.load(tmp_path / "whole.pt")
    model_state, optimizer_state = load_shards(shard_files(str(tmp_path)), 1, 0)
    assert_equal_states(model_state, whole_model)
    assert_equal_states(optimizer_state, whole_optimizers)
    run_ranks(2, _load, str(tmp_path))


def _users_required(rank, world):
    model = ShardedFactorization(NUM_ITEMS, NUM_USERS, 5)
    rows, items, values, num_users = rank_entries(interactions(4, NUM_ITEMS, 5), np.arange(4))
    with pytest.raises(ValueError, match="pass users"):
        model.loss(rows, items, values, num_users)
    with pytest.raises(ValueError, match="input noise"):
        model.loss(
            rows, items, values, num_users, users=torch.arange(4), keep=torch.ones(len(rows))
        )


def test_users_are_required_and_noise_refused():
    run_ranks(1, _users_required)


@pytest.mark.slow
def test_two_workers_train_the_model_of_one_process(ray_session, tmp_path):
    """Through Ray Train: 2 workers with sharded user and item tables train, from the same
    seed, the MatrixFactorization that one process trains on their joined batches; their
    checkpoint holds two shards, and its records are the run's."""
    from recoder_dist.data import RecommendationDataset
    from recoder_dist.model import Recoder, read_training_rows
    from recoder_dist.training.checkpoint import read_checkpoint
    from tests.ml100k import ml100k_split
    from tests.test_sharded_training import SEED, TRAIN, _close, _reference_epochs

    split_ = ml100k_split()
    dataset = RecommendationDataset(split_.train.interactions[:400])
    rows = read_training_rows(dataset)
    num_items, params = split_.train.num_items, dict(embedding_size=16, sparse=True)
    recoder = Recoder(
        MatrixFactorization(**params),
        num_items=num_items,
        num_workers=2,
        seed=SEED,
        loss="logloss",
        storage_path=str(tmp_path),
        run_name="mf",
    )
    history = recoder.train(rows, num_epochs=2, checkpoint_freq=2, **TRAIN)
    assert len(shard_files(str(tmp_path / "mf" / "epoch_2"))) == 2
    saved, _ = read_checkpoint(str(tmp_path / "mf" / "epoch_2"))

    reference = MatrixFactorization(**params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # the initial weights that Recoder draws from its seed
        reference.init_model(num_items=num_items, num_users=dataset.num_users)
    optimizers = build_optimizers(reference, "adam", TRAIN["lr"], 0.0)
    losses = _reference_epochs(reference, optimizers, rows, num_items, 2, [1, 2])
    _close(recoder.model.state_dict(), reference.state_dict())
    _close(saved.model_state, reference.state_dict())
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-5)
