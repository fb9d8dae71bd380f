"""MultVAE against its formulas written out by hand, its sharded form on 1-3 gloo ranks
against one process, its KL annealing through the training loop, and its snapshots.

The reparameterization's draw is fixed in the comparisons (``epsilon``, a draw per user from a
seeded table): N ranks draw from other streams than one process.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from recoder_dist.data.collator import Collator, UserRows
from recoder_dist.losses import build_loss
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.nn import MultVAE
from recoder_dist.nn.multvae import ShardedMultVAE, kl_weight
from recoder_dist.training.batch import sparse_tensor
from recoder_dist.training.evaluation.scoring import metric_sums
from recoder_dist.training.evaluation.sharded import sharded_eval_sums
from recoder_dist.training.worker.optimizers import build_optimizers
from recoder_dist.training.worker.step import batch_loss
from tests.sharded_harness import (
    gathered_state,
    interactions,
    rank_entries,
    run_ranks,
    split,
)

NUM_ITEMS, TOUCHED, NUM_USERS = 23, 19, 20
CPU = torch.device("cpu")
TOL = dict(rtol=1e-4, atol=1e-5)


def _model(hidden=(6, 3), seed=0, **params) -> MultVAE:
    torch.manual_seed(seed)
    model = MultVAE(list(hidden), **{"noise_prob": 0.0, **params})
    model.init_model(num_items=NUM_ITEMS)
    with torch.no_grad():  # non-zero biases, so that their equality means something
        model.decoder_bias.weight.normal_()
        model.encoder_bias.normal_(std=0.1)
    return model


def _fixed_epsilon(model, table: torch.Tensor, users: np.ndarray) -> None:
    """``model`` draws row ``u`` of ``table`` for user ``u`` of ``users`` (in batch order)."""
    model.epsilon = lambda std: table[torch.from_numpy(np.asarray(users))]


def _by_hand(model: MultVAE, x: torch.Tensor, eps: torch.Tensor | None):
    """The scores and summed KL of the dense rows ``x`` (eps None: the mean code, no KL),
    written out from the weights."""
    h = F.normalize(x, dim=1) @ model.encoder_embedding.weight + model.encoder_bias
    for layer in model.encoder_layers:
        h = torch.tanh(h) @ layer.weight.T + layer.bias
    mean, log_var = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]
    z, kl = mean, None
    if eps is not None:
        z = mean + eps * torch.exp(log_var / 2)
        kl = (-0.5 * (1 + log_var - mean**2 - log_var.exp()).sum(1)).sum()
    for layer in model.decoder_layers:
        z = torch.tanh(z @ layer.weight.T + layer.bias)
    return z @ model.decoder_embedding.weight.T + model.decoder_bias.weight[:, 0], kl


@pytest.mark.parametrize("hidden", [(6, 3), (4,)])
def test_forward_and_kl_are_the_formulas(hidden):
    model = _model(hidden)
    x = torch.from_numpy(interactions(5, NUM_ITEMS, TOUCHED).toarray())
    eps = torch.randn(5, hidden[-1], generator=torch.Generator().manual_seed(1))
    model.eval()
    expected, _ = _by_hand(model, x, None)
    torch.testing.assert_close(model(x), expected, **TOL)
    model.train()
    _fixed_epsilon(model, eps, np.arange(5))
    expected, kl = _by_hand(model, x, eps)
    torch.testing.assert_close(model(x), expected, **TOL)
    torch.testing.assert_close(model.loss_terms(epoch=1, step=10**9), 0.2 * kl, **TOL)
    assert model.loss_terms(epoch=1, step=0) is None  # read once: no stale term
    # The trainer's sparse CPU input: the same scores.
    torch.testing.assert_close(model(x.to_sparse().coalesce()), expected, **TOL)


def test_kl_weight_rises_linearly_to_the_cap():
    assert kl_weight(0, 0.2, 100) == 0.0
    assert kl_weight(10, 0.2, 100) == pytest.approx(0.1)
    assert kl_weight(20, 0.2, 100) == pytest.approx(0.2)
    assert kl_weight(10**6, 0.2, 100) == 0.2
    assert kl_weight(0, 0.3, 0) == 0.3  # no annealing


def test_a_sampled_batch_scores_its_columns_of_the_full_output():
    """F(X[:, I], I) == F(X)[:, I] for rows that are zero outside I: negative sampling."""
    model = _model().eval()
    matrix = interactions(6, NUM_ITEMS, TOUCHED, seed=4)
    items = torch.from_numpy(np.unique(matrix.indices)).long()
    x = torch.from_numpy(matrix.toarray())
    full = model(x)
    sampled = model(x[:, items], input_items=items, target_items=items)
    torch.testing.assert_close(sampled, full[:, items], **TOL)


def test_the_step_adds_the_annealed_kl_term():
    """batch_loss = (multinomial NLL + beta(step) * KL) / users, against the formulas."""
    model = _model(anneal_cap=0.5, anneal_steps=4).train()
    matrix = interactions(7, NUM_ITEMS, TOUCHED, seed=2)
    users = np.arange(7)
    batch = next(Collator(num_items=NUM_ITEMS, batch_size=7)(UserRows.from_csr(matrix, users)))
    eps = torch.randn(7, 3, generator=torch.Generator().manual_seed(3))
    _fixed_epsilon(model, eps, batch.users)
    loss = batch_loss(model, build_loss("logloss"), batch, CPU, step=1)
    x = torch.from_numpy(matrix[batch.users][:, batch.items].toarray())
    scores, kl = _by_hand(_restricted(model, batch.items), x, eps)
    nll = -(F.log_softmax(scores, 1) * x).sum()
    torch.testing.assert_close(loss, (nll + 0.25 * kl) / 7, **TOL)  # beta = 1 / 4
    model.eval()  # no term in evaluation
    with torch.no_grad():
        eval_loss = batch_loss(model, build_loss("logloss"), batch, CPU, step=1)
    mean_scores, _ = _by_hand(_restricted(model, batch.items), x, None)
    expected = -(F.log_softmax(mean_scores, 1) * x).sum() / 7
    torch.testing.assert_close(eval_loss, expected, **TOL)


def _restricted(model: MultVAE, items: np.ndarray) -> MultVAE:
    """A copy of ``model`` whose item tables are the rows ``items`` (what a sampled batch
    reads), for ``_by_hand``."""
    copy = MultVAE(model.hidden_layers, noise_prob=0.0)
    torch.manual_seed(0)
    copy.init_model(num_items=len(items))
    state = model.state_dict()
    index = torch.from_numpy(np.asarray(items)).long()
    for key in ("encoder_embedding.weight", "decoder_embedding.weight", "decoder_bias.weight"):
        state[key] = state[key][index]
    copy.load_state_dict(state)
    return copy


STEP_USERS = [np.array([4, 17, 0, 9, 12, 3, 19, 8, 1, 15]), np.array([2, 6, 11, 5, 18])]
SIZES = {1: [[10], [5]], 2: [[7, 3], [0, 5]], 3: [[6, 0, 4], [2, 2, 1]]}
CASES = [(True, "adam", True), (False, "adam", False), (True, "sgd", False)]


def _steps(rank, world):
    """Two optimizer steps (the KL weight annealing across them) of each case, sharded
    against one process; the losses and then every table and layer."""
    matrix = interactions(NUM_USERS, NUM_ITEMS, TOUCHED, seed=1)
    eps = torch.randn(NUM_USERS, 3, generator=torch.Generator().manual_seed(7))
    for number, (negative_sampling, optimizer, sparse) in enumerate(CASES):
        reference = _model(seed=number, sparse=sparse, anneal_cap=0.5, anneal_steps=4).train()
        sharded = ShardedMultVAE.like(reference).train()
        reference_opt = build_optimizers(reference, optimizer, 0.05, 0.0)
        sharded_opt = build_optimizers(sharded, optimizer, 0.05, 0.0)
        for step, (users, sizes) in enumerate(zip(STEP_USERS, SIZES[world]), start=1):
            collate = Collator(
                num_items=NUM_ITEMS, batch_size=len(users), negative_sampling=negative_sampling
            )
            batch = next(collate(UserRows.from_csr(matrix, users)))
            _fixed_epsilon(reference, eps, batch.users)
            expected = batch_loss(reference, build_loss("logloss"), batch, CPU, step=step)
            reference_opt.zero_grad()
            expected.backward()
            reference_opt.step()

            mine = users[split(sizes, rank)]
            _fixed_epsilon(sharded, eps, mine)
            share, total = sharded.loss(
                *rank_entries(matrix, mine),
                loss="logloss",
                negative_sampling=negative_sampling,
                step=step,
            )
            sharded_opt.zero_grad()
            share.backward()
            sharded.synchronize_grads()
            sharded_opt.step()
            torch.testing.assert_close(total, expected.detach(), **TOL)
        gathered = gathered_state(sharded, dst=0)
        if rank == 0:
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(gathered[key], value, **TOL, msg=key)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_steps_equal_one_process(world):
    run_ranks(world, _steps)


def _weightless_and_evaluation(rank, world):
    """A weightless model's shards are the rows one process draws; the shards score each
    rank's users as one process does (the mean code, no draw)."""
    torch.manual_seed(11)
    whole = MultVAE([6, 3])
    whole.init_model(num_items=NUM_ITEMS)
    torch.manual_seed(11)
    with torch.device("meta"):
        weightless = MultVAE([6, 3])
        weightless.init_model(num_items=NUM_ITEMS)
    sharded = ShardedMultVAE.like(weightless)
    gathered = gathered_state(sharded, dst=None)
    for key, value in whole.state_dict().items():
        assert torch.equal(gathered[key], value), key

    whole.eval()
    sharded.eval()
    inputs = interactions(NUM_USERS, NUM_ITEMS, NUM_ITEMS, seed=6)
    targets = interactions(NUM_USERS, NUM_ITEMS, NUM_ITEMS, seed=7)
    targets = targets - targets.multiply(inputs > 0)
    targets.eliminate_zeros()
    users = np.random.default_rng(5).permutation(NUM_USERS)
    mine = np.array_split(users, world)[rank]
    metrics = [Recall(k=5), NDCG(k=7)]
    batch = [(UserRows.from_csr(inputs, mine), UserRows.from_csr(targets, mine))]
    sums, count = sharded_eval_sums(sharded, batch, metrics, 7, CPU)
    totals = torch.tensor([*sums, count], dtype=torch.float64)
    torch.distributed.all_reduce(totals)
    expected_sums, expected_count = metric_sums(
        whole,
        UserRows.from_csr(inputs, users),
        UserRows.from_csr(targets, users),
        metrics,
        7,
        NUM_ITEMS,
        CPU,
    )
    assert int(totals[-1]) == expected_count
    np.testing.assert_allclose(totals[:-1].numpy(), expected_sums, rtol=1e-6)


def test_shards_are_drawn_alone_and_evaluate_as_one_process():
    run_ranks(2, _weightless_and_evaluation)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(hidden_layers=[0]), "hidden_layers must be positive"),
        (dict(hidden_layers=[8], noise_prob=1.0), "noise_prob must be a number in"),
        (dict(hidden_layers=[8], anneal_cap=-0.1), "anneal_cap must be a finite number >= 0"),
        (dict(hidden_layers=[8], anneal_cap=float("inf")), "anneal_cap must be a finite"),
        (dict(hidden_layers=[8], anneal_steps=-1), "anneal_steps must be a whole number >= 0"),
        (dict(hidden_layers=[8], anneal_steps=2.5), "anneal_steps must be a whole number >= 0"),
        (dict(hidden_layers=[8], activation_type="swish"), "unknown activation_type"),
    ],
)
def test_bad_settings_are_value_errors(params, message):
    with pytest.raises(ValueError, match=message):
        MultVAE(**params)
    with pytest.raises(ValueError, match="needs hidden_layers"):
        MultVAE().init_model(num_items=5)


def test_sparse_tensor_input_is_the_trainers():
    """The trainer's sparse batch (``sparse_tensor``) reads as the dense rows do."""
    model = _model().eval()
    matrix = interactions(4, NUM_ITEMS, TOUCHED, seed=9)
    batch = next(
        Collator(num_items=NUM_ITEMS, batch_size=4, negative_sampling=False)(
            UserRows.from_csr(matrix, np.arange(4))
        )
    )
    dense = torch.from_numpy(sp.csr_matrix(matrix).toarray())
    torch.testing.assert_close(model(sparse_tensor(batch)), model(dense), **TOL)


@pytest.mark.slow
def test_the_training_loop_anneals_over_the_runs_steps(ray_session):
    """In-process (the workers' loop on one rank): the epochs' losses are those of one process
    stepping by hand, the KL weight rising over the run's steps (7 of them, across epochs)
    and the reparameterization drawn after each epoch's seed."""
    from recoder_dist.data import RecommendationDataset
    from recoder_dist.model import Recoder, read_training_rows
    from tests.ml100k import ml100k_split
    from tests.test_sharded_training import SEED, TRAIN, _close, _reference_epochs

    split_ = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split_.train.interactions[:400]))
    num_items = split_.train.num_items
    params = dict(hidden_layers=[16, 8], noise_prob=0.0, anneal_cap=0.3, anneal_steps=7)
    recoder = Recoder(MultVAE(**params), num_items=num_items, num_workers=0, seed=SEED)
    history = recoder.train(rows, num_epochs=3, **TRAIN)

    reference = MultVAE(**params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        reference.init_model(num_items=num_items)
        optimizers = build_optimizers(reference, "adam", TRAIN["lr"], 0.0)
        losses = _reference_epochs(reference, optimizers, rows, num_items, 1, [1, 2, 3])
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-5)
    _close(recoder.model.state_dict(), reference.state_dict())


@pytest.mark.slow
def test_two_sharded_workers_evaluate_as_their_exported_snapshot(ray_session, tmp_path):
    """2 workers with sharded tables: the last epoch's evaluation from the shards equals the
    exported snapshot's evaluation in one process, and the snapshot restores a MultVAE (its
    hyper-parameters with it) through the command line's restore."""
    from recoder_dist.cli import _restored
    from recoder_dist.data import RecommendationDataset
    from recoder_dist.model import Recoder, read_training_rows
    from tests.ml100k import ml100k_split
    from tests.test_sharded_training import SEED, TRAIN

    split_ = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split_.train.interactions[:400]))
    params = dict(hidden_layers=[16, 8], anneal_cap=0.3, anneal_steps=7, sparse=True)
    recoder = Recoder(
        MultVAE(**params),
        num_items=split_.train.num_items,
        num_workers=2,
        seed=SEED,
        storage_path=str(tmp_path / "runs"),
    )
    metrics = [Recall(k=20), NDCG(k=50)]
    history = recoder.train(
        rows,
        val_dataset=split_.test,
        eval_freq=2,
        metrics=metrics,
        num_epochs=2,
        model_checkpoint_prefix=str(tmp_path / "vae"),
        **TRAIN,
    )
    restored = _restored(str(tmp_path / "vae_epoch_2.model"), 0, False, None)
    assert type(restored.model) is MultVAE and restored.model.model_params() == {
        **MultVAE(**params).model_params()
    }
    expected = restored.evaluate(split_.test, 50, metrics)
    for name in ("Recall@20", "NDCG@50"):
        assert history[-1][name] == pytest.approx(expected[name], abs=1e-6)
