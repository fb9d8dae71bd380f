"""Training and evaluation through Ray Train, on MovieLens 100K."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recoder_dist.data import RecommendationDataset
from recoder_dist.metrics import NDCG, AveragePrecision, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder, FactorizationModel, MatrixFactorization
from recoder_dist.training.snapshot import load_snapshot
from tests.ml100k import ml100k_split, naive_ndcg

METRICS = [Recall(k=20), Recall(k=50, normalize=False), NDCG(k=100), AveragePrecision(k=50)]


def autoencoder_recoder(num_workers: int, seed: int = 0) -> Recoder:
    model = DynamicAutoencoder(
        hidden_layers=[200], activation_type="tanh", noise_prob=0.5, sparse=True
    )
    return Recoder(model, optimizer_type="adam", loss="logloss", num_workers=num_workers, seed=seed)


@pytest.fixture(scope="module")
def trained(ray_session):
    """An autoencoder trained in-process for 20 epochs (shared by the tests that only read)."""
    recoder = autoencoder_recoder(num_workers=0)
    history = recoder.train(
        ml100k_split().train, batch_size=100, lr=1e-3, num_epochs=20, negative_sampling=True
    )
    return recoder, history


def test_autoencoder_beats_popularity_on_held_out_users(trained):
    recoder, history = trained
    test = ml100k_split().test
    popularity = np.asarray(ml100k_split().train.interactions.sum(0)).ravel()
    popularity_ndcg = naive_ndcg(lambda user: popularity, test)
    results = recoder.evaluate(test, num_recommendations=100, metrics=[NDCG(k=100)])
    # Popularity reaches 0.244 here; the autoencoder about 0.40 after 20 epochs.
    assert results["NDCG@100"] > popularity_ndcg + 0.10
    assert [h["epoch"] for h in history] == list(range(1, 21))
    assert history[-1]["loss"] < history[0]["loss"]


def test_evaluation_matches_a_naive_loop(trained):
    recoder, _ = trained
    test = ml100k_split().test
    results = recoder.evaluate(test, num_recommendations=100, metrics=[NDCG(k=100)])
    reference = naive_ndcg(lambda user: recoder.predict(test.interactions[user])[0], test)
    assert results["NDCG@100"] == pytest.approx(reference, abs=1e-12)
    assert results["eval_users"] == 150


@pytest.mark.slow
def test_two_workers_evaluate_exactly_like_one(trained):
    """Two workers' evaluation, each scoring its share of the users in batches of 40, against
    one process scoring them all (a worker group of one is checked against this process in
    test_parquet_rows)."""
    recoder, _ = trained
    test = ml100k_split().test
    recoder.num_workers = 2
    try:
        on_workers = recoder.evaluate(test, 100, METRICS, batch_size=40, on_workers=True)
    finally:
        recoder.num_workers = 0
    in_process = recoder.evaluate(test, 100, METRICS, batch_size=40)  # small: scored here
    for name in [m.name for m in METRICS]:
        assert on_workers[name] == pytest.approx(in_process[name], abs=1e-12), name
    assert on_workers["eval_users"] == in_process["eval_users"] == 150


@pytest.mark.slow
def test_two_workers_train_as_well_as_one(ray_session, tmp_path):
    """Same global batch (100 users a step: 2 x 50 with sharded tables), same epochs: the same
    quality as one process (0 workers: in this process, no worker group; a 1-worker run ends
    with its weights to the bit), and rank 0 writes the periodic snapshots: the trained
    weights. Scored in this process, from those snapshots (the workers' evaluation has tests
    of its own)."""
    split = ml100k_split()
    ndcg = {}
    for workers in (0, 2):
        recoder = autoencoder_recoder(num_workers=workers, seed=1)
        recoder.train(
            split.train,
            batch_size=100,
            lr=1e-3,
            num_epochs=20,
            negative_sampling=True,
            model_checkpoint_prefix=str(tmp_path / f"w{workers}"),
            checkpoint_freq=10,
        )
        assert recoder.current_epoch == 20
        restored = autoencoder_recoder(num_workers=0)
        restored.init_from_model_file(str(tmp_path / f"w{workers}_epoch_20.model"))
        trained = recoder.model.state_dict()
        for name, weight in restored.model.state_dict().items():
            assert torch.equal(weight, trained[name]), name
        ndcg[workers] = restored.evaluate(split.test, 100, [NDCG(k=100)])["NDCG@100"]
    assert ndcg[0] > 0.38
    assert abs(ndcg[2] - ndcg[0]) < 0.02
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == [f"w{w}_epoch_{e}.model" for w in (0, 2) for e in (10, 20)]


def test_save_load_gives_identical_scores(trained, tmp_path):
    recoder, _ = trained
    test = ml100k_split().test
    path = recoder.save_state(str(tmp_path / "ae"))
    assert path.endswith("ae_epoch_20.model")
    restored = Recoder(DynamicAutoencoder(), num_workers=0)
    restored.init_from_model_file(path)
    assert restored.model.model_params() == recoder.model.model_params()
    assert restored.current_epoch == 20
    np.testing.assert_array_equal(
        restored.predict(test.interactions), recoder.predict(test.interactions)
    )
    before = recoder.evaluate(test, 100, METRICS)
    after = restored.evaluate(test, 100, METRICS)
    assert before == after


def test_continued_training_carries_epoch_and_optimizer_state(ray_session, tmp_path):
    split = ml100k_split()
    first = autoencoder_recoder(num_workers=0)
    first.train(split.train, batch_size=100, num_epochs=2, negative_sampling=True)
    steps_per_epoch = -(-len(split.train) // 100)
    path = first.save_state(str(tmp_path / "ae"))

    second = Recoder(DynamicAutoencoder(), optimizer_type="sgd", loss="mse", num_workers=0)
    second.init_from_model_file(path)  # the snapshot's optimizer and loss win
    assert second.optimizer_type == "adam" and second.loss == "logloss"
    history = second.train(split.train, batch_size=100, num_epochs=1, negative_sampling=True)
    assert [h["epoch"] for h in history] == [3]
    assert second.current_epoch == 3
    optimizer_state = load_snapshot(second.save_state(str(tmp_path / "again"))).optimizer_state
    for kind in ("sparse", "dense"):  # SparseAdam and Adam each counted every step
        steps = {int(s["step"]) for s in optimizer_state[kind]["state"].values()}
        assert steps == {3 * steps_per_epoch}, kind


def test_matrix_factorization_learns(ray_session):
    """Weak generalization: MF scores its own training users' held-out items."""
    split = ml100k_split()
    data = split.train.interactions.tocoo()
    rng = np.random.default_rng(0)
    held = rng.random(data.nnz) < 0.2
    shape = data.shape
    train = RecommendationDataset(_coo(data, ~held, shape))
    heldout = RecommendationDataset(_coo(data, ~held, shape), _coo(data, held, shape))
    popularity = np.asarray(train.interactions.sum(0)).ravel()
    recoder = Recoder(
        MatrixFactorization(embedding_size=32, sparse=True),
        optimizer_type="adam",
        loss="logloss",
        num_workers=0,
        seed=0,
    )
    recoder.train(train, batch_size=64, lr=1e-2, num_epochs=15, negative_sampling=False)
    mf = recoder.evaluate(heldout, 100, [NDCG(k=100)])["NDCG@100"]
    assert mf > naive_ndcg(lambda user: popularity, heldout) + 0.03


class ItemKNN(FactorizationModel):
    """A user's own model: a learned item-item matrix as a sparse embedding (SLIM-like)."""

    def __init__(self, sparse: bool = True):
        super().__init__()
        self.sparse = sparse

    def init_model(self, num_items=None, num_users=None):
        self.similarity = torch.nn.Embedding(num_items, num_items, sparse=self.sparse)
        torch.nn.init.zeros_(self.similarity.weight)

    def model_params(self):
        return {"sparse": self.sparse}

    def load_model_params(self, model_params):
        self.sparse = model_params["sparse"]

    def forward(
        self, input, input_users=None, input_items=None, target_users=None, target_items=None
    ):
        if input_items is None:
            input_items = torch.arange(input.shape[1])
        weights = self.similarity(input_items)
        if target_items is not None:
            weights = weights[:, target_items]
        return input @ weights


def test_users_own_model_trains(ray_session):
    split = ml100k_split()
    recoder = Recoder(ItemKNN(), optimizer_type="adam", loss="logloss", num_workers=0, seed=0)
    recoder.train(split.train, batch_size=100, lr=1e-2, num_epochs=3, negative_sampling=True)
    popularity = np.asarray(split.train.interactions.sum(0)).ravel()
    ndcg = recoder.evaluate(split.test, 100, [NDCG(k=100)])["NDCG@100"]
    assert ndcg > naive_ndcg(lambda user: popularity, split.test) + 0.03


def _coo(data, mask, shape):
    import scipy.sparse as sp

    return sp.csr_matrix((data.data[mask], (data.row[mask], data.col[mask])), shape=shape)


def test_in_process_training_leaves_the_callers_rng_alone(ray_session):
    """The loop seeds torch for dropout noise; in-process that must not leak to the caller."""
    recoder = autoencoder_recoder(num_workers=0)
    train = ml100k_split().train
    recoder.train(train, batch_size=100, num_epochs=1, negative_sampling=True)  # initializes
    state = torch.get_rng_state()
    recoder.train(train, batch_size=100, num_epochs=1, negative_sampling=True)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("decay_sparse_lr", [False, True])
def test_lr_milestones_decay_the_dense_optimizer_only_by_default(ray_session, decay_sparse_lr):
    """As in recsys-recoder 0.4.0, lr_milestones decay the dense optimizer (Adam); SparseAdam
    keeps the initial lr unless decay_sparse_lr. Read from the optimizer states that training
    leaves, after epochs 1-3 with milestones [2, 3]."""
    data = RecommendationDataset(ml100k_split().train.interactions[:200])
    recoder = autoencoder_recoder(num_workers=0)
    recoder.train(
        data,
        batch_size=100,
        lr=1e-3,
        num_epochs=3,
        lr_milestones=[2, 3],
        negative_sampling=True,
        decay_sparse_lr=decay_sparse_lr,
    )
    state = recoder._optimizer_state
    dense = [g["lr"] for g in state["dense"]["param_groups"]]
    sparse = [g["lr"] for g in state["sparse"]["param_groups"]]
    assert dense == pytest.approx([1e-5] * len(dense))
    assert sparse == pytest.approx([1e-5 if decay_sparse_lr else 1e-3] * len(sparse))


def test_a_resumed_run_ends_with_the_weights_of_a_straight_one(ray_session, tmp_path):
    """The seed travels in the snapshot: 2 epochs, a snapshot, 2 more epochs in a Recoder made
    without a seed end with the weights of 4 epochs in one run, to the bit."""
    data = RecommendationDataset(ml100k_split().train.interactions[:300])
    settings = dict(batch_size=100, lr=1e-3, negative_sampling=True, lr_milestones=[3])
    straight = autoencoder_recoder(num_workers=0, seed=5)
    straight.train(data, num_epochs=4, **settings)
    first = autoencoder_recoder(num_workers=0, seed=5)
    first.train(data, num_epochs=2, **settings)
    path = first.save_state(str(tmp_path / "half"))

    model = DynamicAutoencoder(hidden_layers=[200], activation_type="tanh", noise_prob=0.5)
    resumed = Recoder(model, num_workers=0)  # no seed: the snapshot's
    resumed.init_from_model_file(path)
    assert resumed.seed == 5
    resumed.train(data, num_epochs=2, **settings)
    assert resumed.current_epoch == 4
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
