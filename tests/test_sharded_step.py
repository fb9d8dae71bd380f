"""The sharded autoencoder step on 1, 2 and 3 gloo ranks against the single-process
DynamicAutoencoder on the global batch: losses, and tables and dense layers after optimizer
steps, for every loss, with and without negative sampling, sparse and dense tables.

Each process computes the single-process reference itself (the same seed, the whole global
batch) and compares; rank 0 compares the tables gathered from every shard. The global batches
are split unevenly, with a rank of no users, and the catalog has items that no user touches.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recoder_dist.data.collator import Collator, SparseBatch, UserRows
from recoder_dist.losses import build_loss
from recoder_dist.nn.autoencoder import DynamicAutoencoder
from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.encoder import input_noise
from recoder_dist.sharded.ownership import Ownership
from recoder_dist.sharded.routes import route_entries
from recoder_dist.sharded.state import (
    sharded_optimizer_state,
    sharded_state,
)
from recoder_dist.training.worker.optimizers import build_optimizers
from recoder_dist.training.worker.step import batch_loss
from tests.sharded_harness import (
    gather_full_rows,
    gathered_optimizer_state,
    gathered_state,
    interactions,
    rank_entries,
    run_ranks,
    split,
)

NUM_ITEMS, TOUCHED = 23, 19  # items 19-22 are never touched
STEP_USERS = [np.arange(0, 10), np.arange(10, 20)]  # two global batches of 10 users
SIZES = {  # each step's users per rank, in rank order
    1: [[10], [10]],
    2: [[7, 3], [2, 8]],
    3: [[6, 0, 4], [3, 3, 4]],
}
CASES = [
    (loss, negative_sampling, optimizer, sparse, constrained)
    for (loss, negative_sampling), (optimizer, sparse), constrained in itertools.product(
        itertools.product(["mse", "logistic", "logloss"], [True, False]),
        [("sgd", False), ("adam", True), ("adam", False)],
        [False, True],
    )
]
TOL = dict(rtol=1e-4, atol=1e-5)


def _close(actual, expected, what):
    if not torch.allclose(actual, expected, **TOL):
        gap = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max difference {gap}")


def _close_state(sharded, reference, what, dst=0):
    """The whole model's state gathered from the shards (a collective) against one process's
    model, on the shards' rank ``dst`` (every rank when None)."""
    gathered = gathered_state(sharded, dst=dst)
    if gathered is not None:
        for key, value in reference.state_dict().items():
            _close(gathered[key], value, f"{what}: {key}")


def _reference(hidden, constrained, sparse, seed):
    torch.manual_seed(seed)
    model = DynamicAutoencoder(hidden, is_constrained=constrained, sparse=sparse)
    model.init_model(num_items=NUM_ITEMS)
    with torch.no_grad():  # non-zero biases, so that their equality means something
        model.decoder_bias.weight.normal_()
    return model


def _steps(rank, world, matrix=None, cases=CASES, weight_decay=0.0):
    if matrix is None:
        matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=1)
    for number, case in enumerate(cases):
        loss, negative_sampling, optimizer, sparse, constrained = case
        hidden = [6, 4] if number % 2 else [6]
        reference = _reference(hidden, constrained, sparse, seed=number)
        sharded = ShardedAutoencoder(NUM_ITEMS, hidden, is_constrained=constrained, sparse=sparse)
        sharded.load_from(reference)
        reference_opt = build_optimizers(reference, optimizer, 0.05, weight_decay)
        sharded_opt = build_optimizers(sharded, optimizer, 0.05, weight_decay)
        for users, sizes in zip(STEP_USERS, SIZES[world]):
            collate = Collator(
                num_items=NUM_ITEMS, batch_size=len(users), negative_sampling=negative_sampling
            )
            batch = next(collate(UserRows.from_csr(matrix, users)))
            expected = batch_loss(reference, build_loss(loss), batch, torch.device("cpu"))
            reference_opt.zero_grad()
            expected.backward()
            reference_opt.step()

            rows, items, values, num_users = rank_entries(matrix, users[split(sizes, rank)])
            share, total = sharded.loss(
                rows, items, values, num_users, loss=loss, negative_sampling=negative_sampling
            )
            sharded_opt.zero_grad()
            share.backward()
            sharded.all_reduce_dense_grads()
            sharded_opt.step()
            _close(total, expected.detach(), f"{case} loss")

        _close_state(sharded, reference, str(case))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_steps_equal_one_process(world):
    run_ranks(world, _steps)


# Weight decay, Adam's (in the gradient) and AdamW's (on the weights): on dense tables, which
# each rank decays in its own rows, and on the dense layer between sparse tables (the second
# case's [6, 4]); never on biases.
DECAY_CASES = [
    ("logloss", False, "adam", False, True),
    ("logloss", True, "adamw", True, False),
    ("logloss", False, "adamw", False, True),
]


def test_weight_decay_steps_equal_one_process():
    run_ranks(2, _steps, None, DECAY_CASES, 0.1)


def _items_of_one_owner():
    """A matrix whose items are all multiples of 3: on 3 ranks, ranks 1 and 2 own none of the
    step's items (nothing to score with negative sampling, only zero rows to pool)."""
    matrix = interactions(20, NUM_ITEMS, 8, seed=3).tocoo()
    matrix.col *= 3
    return matrix.tocsr()


def test_owners_without_items():
    cases = [case for case in CASES if case[1] and case[3] and not case[4]]  # sparse Adam, NS
    run_ranks(3, _steps, _items_of_one_owner(), cases)


def _noise_with_mask(rank, world):
    """Input noise drawn once for the global batch and passed in: the dense formula's loss and
    tables after a plain SGD step."""
    matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=2)
    users, sizes = STEP_USERS[0], SIZES[world][0]
    p = 0.5
    reference = _reference([6], False, False, seed=0)
    sharded = ShardedAutoencoder(NUM_ITEMS, [6], noise_prob=p)
    sharded.load_from(reference)

    dense = torch.from_numpy(matrix[users].toarray())
    keep = torch.rand(dense.shape, generator=torch.Generator().manual_seed(3)) >= p
    items = torch.from_numpy(np.unique(matrix[users].indices))
    x = F.normalize(dense, dim=1) * keep / (1 - p)
    codes = torch.tanh(x @ reference.encoder_embedding.weight + reference.encoder_bias)
    scores = (
        reference.decoder_bias.weight[items, 0]
        + codes @ reference.decoder_embedding.weight[items].t()
    )
    expected = ((scores - dense[:, items]) ** 2).sum() / len(users)
    torch.optim.SGD(reference.parameters(), lr=0.1).zero_grad()
    expected.backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()

    mine = split(sizes, rank)
    rows, item_ids, values, num_users = rank_entries(matrix, users[mine])
    share, total = sharded.loss(rows, item_ids, values, num_users, keep=keep[mine][rows, item_ids])
    share.backward()
    sharded.all_reduce_dense_grads()
    torch.optim.SGD(sharded.parameters(), lr=0.1).step()
    _close(total, expected.detach(), "loss with a given noise mask")
    gathered = gather_full_rows(sharded.encoder_embedding.weight.detach(), sharded.ownership)
    if rank == 0:
        _close(gathered, reference.encoder_embedding.weight, "encoder table after SGD")


@pytest.mark.parametrize("world", [1, 3])
def test_input_noise_with_a_given_mask(world):
    run_ranks(world, _noise_with_mask)


def test_input_noise_statistics():
    torch.manual_seed(0)
    values = torch.rand(200_000) + 0.5
    noised = input_noise(values, 0.3)
    dropped = (noised == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.005  # about 5 standard deviations (0.001)
    assert abs(noised.mean().item() / values.mean().item() - 1) < 0.01
    assert torch.equal(input_noise(values, 0.0), values)


def _bad_routes(rank, world):
    rule = Ownership(NUM_ITEMS, world)
    try:
        route_entries(torch.tensor([1, 0]), torch.tensor([3, 4]), 2, rule)
    except ValueError as error:
        assert "nondecreasing" in str(error)
    else:
        raise AssertionError("unsorted rows were accepted")
    try:
        route_entries(torch.tensor([0]), torch.tensor([3]), 1, Ownership(NUM_ITEMS, world + 1))
    except ValueError as error:
        assert "ranks" in str(error)
    else:
        raise AssertionError("a world other than the group's was accepted")


def _initialization(rank, world):
    """The tables are the seeded full xavier draws; the dense layers DynamicAutoencoder's
    kinds of weights (xavier, zero biases) from their own seeded stream."""
    model = ShardedAutoencoder(NUM_ITEMS, [6, 4], seed=5)

    def xavier(shape, seed):
        return torch.nn.init.xavier_uniform_(
            torch.empty(shape), generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(model.encoder_embedding.weight, xavier((NUM_ITEMS, 6), 5)[rank::world])
    assert torch.equal(model.decoder_embedding.weight, xavier((NUM_ITEMS, 6), 6)[rank::world])
    assert not model.decoder_bias.weight.any()
    assert torch.equal(model.encoder_layers[0].weight, xavier((4, 6), 7))
    assert not model.encoder_layers[0].bias.any()


def _made_from_a_weightless_model(rank, world):
    """A model initialized on the meta device (what the driver of a sharded run sends: no
    weights) gives each rank its rows of the weights that ``init_model`` draws in one process
    after the same ``torch.manual_seed``."""
    for constrained in (False, True):
        torch.manual_seed(11)
        whole = DynamicAutoencoder([6, 4], is_constrained=constrained)
        whole.init_model(num_items=NUM_ITEMS)
        torch.manual_seed(11)
        with torch.device("meta"):
            weightless = DynamicAutoencoder([6, 4], is_constrained=constrained)
            weightless.init_model(num_items=NUM_ITEMS)
        assert weightless.encoder_embedding.weight.is_meta
        sharded = ShardedAutoencoder.like(weightless)
        assert len(sharded.encoder_embedding.weight) == Ownership(NUM_ITEMS, world).rows_of(rank)
        gathered = gathered_state(sharded, dst=None)
        for key, value in whole.state_dict().items():
            assert torch.equal(gathered[key], value), key


def test_bad_routes_and_initialization():
    run_ranks(1, _bad_routes)
    run_ranks(2, _initialization)
    run_ranks(3, _made_from_a_weightless_model)


def _global_batch(matrix, users, items):
    """The single-process batch of ``users`` scored on ``items`` (sorted global ids)."""
    block = matrix[users]
    return SparseBatch(
        users=np.asarray(users),
        items=items,
        rows=np.repeat(np.arange(len(users)), np.diff(block.indptr)).astype(np.int64),
        cols=np.searchsorted(items, block.indices).astype(np.int64),
        values=block.data.astype(np.float32),
        shape=(len(users), len(items)),
    )


def _sampled_beyond_entries(rank, world):
    """A sampling group larger than the batch: each rank scores its group's items, more than
    its batch's entries touch; one process scores the union of every rank's group."""
    matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=4)
    users, sizes = STEP_USERS[0], SIZES[world][0]
    groups = np.array_split(np.arange(10, 20), world)  # each rank's rest of its group
    reference = _reference([6], False, True, seed=1)
    sharded = ShardedAutoencoder.like(reference)
    reference_opt = build_optimizers(reference, "adam", 0.05, 0.0)
    sharded_opt = build_optimizers(sharded, "adam", 0.05, 0.0)

    mine = users[split(sizes, rank)]
    sampled = [
        np.unique(matrix[np.concatenate([users[split(sizes, r)], groups[r]])].indices)
        for r in range(world)
    ]
    batch = _global_batch(matrix, users, np.unique(np.concatenate(sampled)))
    expected = batch_loss(reference, build_loss("logloss"), batch, torch.device("cpu"))
    expected.backward()
    reference_opt.step()

    rows, items, values, num_users = rank_entries(matrix, mine)
    share, total = sharded.loss(
        rows,
        items,
        values,
        num_users,
        loss="logloss",
        sampled=torch.from_numpy(sampled[rank].astype(np.int64)),
    )
    share.backward()
    sharded.all_reduce_dense_grads()
    sharded_opt.step()
    _close(total, expected.detach(), "loss over the sampled items")
    _close_state(sharded, reference, "after a step over the sampled items")


def test_sampling_groups_larger_than_the_batch():
    run_ranks(2, _sampled_beyond_entries)
    run_ranks(3, _sampled_beyond_entries)


def _state_round_trip(rank, world, sparse, constrained):
    """The whole model's state and optimizer state from the shards equal one process's after
    a step; loaded back into fresh shards (any world size reads the whole state), the next
    step goes on as one process's."""
    matrix = interactions(20, NUM_ITEMS, TOUCHED, seed=5)
    reference = _reference([6, 4], constrained, sparse, seed=2)
    sharded = ShardedAutoencoder.like(reference)
    reference_opt = build_optimizers(reference, "adam", 0.05, 0.0)
    sharded_opt = build_optimizers(sharded, "adam", 0.05, 0.0)

    def step(model, optimizers, users, sizes):
        optimizers.zero_grad()
        if model is reference:
            batch = next(
                Collator(num_items=NUM_ITEMS, batch_size=len(users))(
                    UserRows.from_csr(matrix, users)
                )
            )
            loss = batch_loss(model, build_loss("mse"), batch, torch.device("cpu"))
            loss.backward()
        else:
            rows, items, values, num_users = rank_entries(matrix, users[split(sizes, rank)])
            share, _ = model.loss(rows, items, values, num_users)
            share.backward()
            model.all_reduce_dense_grads()
        optimizers.step()

    step(reference, reference_opt, STEP_USERS[0], None)
    step(sharded, sharded_opt, STEP_USERS[0], SIZES[world][0])
    model_state = gathered_state(sharded, dst=None)  # on every rank
    optimizer_state = gathered_optimizer_state(sharded_opt, sharded, dst=None)
    expected_state = reference_opt.state_dict()
    for key, value in reference.state_dict().items():
        _close(model_state[key], value, f"gathered {key}")
    for kind in ("dense", "sparse"):
        theirs, ours = expected_state[kind], optimizer_state[kind]
        assert (theirs is None) == (ours is None), kind
        for index, entry in (theirs or {"state": {}})["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    _close(
                        torch.as_tensor(ours["state"][index][name]).float(),
                        value.float(),
                        f"{kind} {index} {name}",
                    )
                else:
                    assert ours["state"][index][name] == value

    fresh = ShardedAutoencoder(
        NUM_ITEMS, [6, 4], is_constrained=constrained, sparse=sparse, seed=None
    )
    fresh.load_state_dict(sharded_state(model_state, fresh))
    fresh_opt = build_optimizers(fresh, "adam", 0.05, 0.0)
    fresh_opt.load_state_dict(sharded_optimizer_state(optimizer_state, fresh_opt, fresh))
    step(reference, reference_opt, STEP_USERS[1], None)
    step(fresh, fresh_opt, STEP_USERS[1], SIZES[world][1])
    _close_state(fresh, reference, "after a step from the loaded state")


@pytest.mark.parametrize("sparse,constrained", [(True, False), (False, True)])
def test_whole_state_round_trip(sparse, constrained):
    run_ranks(2, _state_round_trip, sparse, constrained)
    run_ranks(3, _state_round_trip, sparse, constrained)
