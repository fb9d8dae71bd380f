"""Bad input to Recoder fails at once with an error that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist.data import RecommendationDataset, UsersInteractions
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder, FactorizationModel, MatrixFactorization


def matrix(users=20, items=30, seed=0):
    return sp.random(users, items, density=0.2, format="csr", random_state=seed, dtype=np.float32)


def recoder(**kwargs) -> Recoder:
    kwargs.setdefault("optimizer_type", "adam")
    return Recoder(DynamicAutoencoder([8], sparse=True), num_workers=0, **kwargs)


def trained_recoder(ray_session) -> Recoder:
    r = recoder()
    r.train(RecommendationDataset(matrix()), batch_size=5, num_epochs=1)
    return r


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": object()}, TypeError, "FactorizationModel"),
        ({"optimizer_type": "lbfgs"}, ValueError, "optimizer_type 'lbfgs'"),
        ({"loss": "hinge"}, ValueError, "unknown loss 'hinge'"),
        ({"loss": 3}, TypeError, "loss must be"),
        ({"loss": "mse", "loss_params": {"gamma": 1}}, ValueError, "loss_params"),
        ({"tables": "split"}, ValueError, "tables must be one of"),
        ({"shard_group_size": 0}, ValueError, "shard_group_size must be None or an int >= 1"),
        ({"shard_group_size": 2.0}, ValueError, "shard_group_size must be None or an int"),
        ({"num_workers": -1}, ValueError, "num_workers"),
        ({"num_workers": 1.5}, ValueError, "num_workers"),
        ({"num_items": 0}, ValueError, "num_items must be a positive int"),
        ({"num_items": 15.0}, ValueError, "num_items must be a positive int"),
        ({"num_users": -1}, ValueError, "num_users must be a positive int"),
        ({"seed": -1}, ValueError, "seed must be None or an int >= 0"),
        ({"seed": 1.5}, ValueError, "seed must be None or an int >= 0"),
    ],
)
def test_constructor_rejects(kwargs, error, message):
    kwargs.setdefault("model", DynamicAutoencoder([8]))
    with pytest.raises(error, match=message):
        Recoder(**kwargs)


@pytest.mark.parametrize(
    ("train_kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int"),
        ({"batch_size": 10, "num_sampling_users": 25}, ValueError, "num_sampling_users=25"),
        ({"num_epochs": 0}, ValueError, "num_epochs"),
        ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number > 0"),
        ({"negative_sampling": "False"}, ValueError, "negative_sampling must be True or False"),
        ({"weight_decay": float("inf")}, ValueError, "weight_decay must be a finite number"),
        ({"lr_milestones": 5}, TypeError, "lr_milestones must be a list of epochs"),
        ({"eval_freq": 1, "metrics": Recall(5)}, TypeError, "metrics must be a list"),
        ({"eval_freq": 1, "metrics": [Recall(5)], "eval_num_users": 0}, ValueError, "eval_num"),
        ({"eval_freq": 1, "metrics": [Recall(5)], "eval_batch_size": 0}, ValueError, "batch_s"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"iters_per_epoch": 0}, ValueError, "iters_per_epoch"),
        ({"precision": "fp16"}, ValueError, "precision must be one of"),
    ],
)
def test_train_rejects_bad_arguments(train_kwargs, error, message):
    if "eval_freq" in train_kwargs:
        validation = RecommendationDataset(matrix(), matrix(seed=1))
        train_kwargs = {**train_kwargs, "val_dataset": validation}
    with pytest.raises(error, match=message):
        recoder().train(RecommendationDataset(matrix()), **train_kwargs)


def test_lr_milestones_take_any_sequence_of_epochs(ray_session):
    r = recoder()
    r.train(RecommendationDataset(matrix()), batch_size=5, num_epochs=2, lr_milestones=range(2, 3))
    assert r.current_epoch == 2


def test_a_validation_set_that_is_never_evaluated_is_said(ray_session, caplog):
    validation = RecommendationDataset(matrix(), matrix(seed=1))
    recoder().train(RecommendationDataset(matrix()), batch_size=5, val_dataset=validation)
    said = "val_dataset is evaluated every eval_freq epochs, and eval_freq is 0: this run does"
    assert said in caplog.text


@pytest.mark.parametrize(
    ("loss", "values", "said"),
    [
        ("logistic", 5.0, "loss 'logistic' reads the values as probabilities in [0, 1]"),
        ("logloss", -1.0, "loss 'logloss' reads the values as non-negative weights"),
        ("logistic", 1.0, None),
        ("mse", -1.0, None),
    ],
)
def test_values_that_the_loss_misreads_are_said(ray_session, caplog, loss, values, said):
    """The seed's tutorial trains 'logistic' on a matrix of scores: its loss then falls below
    zero without bound (recsys-recoder 0.4.0 does not look). Training goes on; a warning says
    why."""
    data = matrix()
    data.data[:] = values
    Recoder(DynamicAutoencoder([8]), loss=loss, num_workers=0).train(
        RecommendationDataset(data), batch_size=5
    )
    if said:
        assert said in caplog.text
    else:
        assert "reads the values" not in caplog.text


def test_hidden_layers_must_be_a_list_of_whole_sizes():
    for bad in (200, "200", [10.5], [True], [float("inf")], [float("nan")]):
        with pytest.raises(ValueError, match="hidden_layers must"):
            DynamicAutoencoder(bad)
    assert DynamicAutoencoder((np.int64(8), 4.0)).hidden_layers == [8, 4]
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="embedding_size must be a whole number >= 1"):
            MatrixFactorization(embedding_size=bad)


def test_metrics_take_numpy_ints():
    assert NDCG(k=np.int64(5)).k == 5 and type(NDCG(k=np.int64(5)).k) is int
    with pytest.raises(ValueError, match="k must be a positive int"):
        Recall(k=5.0)


def test_train_rejects_bad_datasets():
    with pytest.raises(TypeError, match="RecommendationDataset"):
        recoder().train(matrix())
    with pytest.raises(ValueError, match="no interactions"):
        recoder().train(RecommendationDataset(sp.csr_matrix((5, 5), dtype=np.float32)))
    with pytest.raises(ValueError, match="needs target"):
        recoder().train(
            RecommendationDataset(matrix()),
            val_dataset=RecommendationDataset(matrix()),
            eval_freq=1,
            metrics=[NDCG(10)],
        )
    with pytest.raises(ValueError, match="needs metrics"):
        recoder().train(
            RecommendationDataset(matrix()),
            val_dataset=RecommendationDataset(matrix(), matrix(seed=1)),
            eval_freq=1,
        )
    with pytest.raises(ValueError, match="top 50 but num_recommendations=20"):
        recoder().train(
            RecommendationDataset(matrix()),
            val_dataset=RecommendationDataset(matrix(), matrix(seed=1)),
            eval_freq=1,
            metrics=[Recall(50)],
            eval_num_recommendations=20,
        )


def test_a_global_batch_that_does_not_split_over_the_workers_is_refused_before_they_start():
    three = Recoder(DynamicAutoencoder([8], sparse=True), num_workers=3)
    with pytest.raises(ValueError, match="batch_size=10 does not split over 3 workers"):
        three.train(RecommendationDataset(matrix()), batch_size=10, num_epochs=1)
    groups = Recoder(DynamicAutoencoder([8], sparse=True), num_workers=3, shard_group_size=2)
    with pytest.raises(ValueError, match="3 workers do not split into groups of shard_group"):
        groups.train(RecommendationDataset(matrix()), batch_size=12, num_epochs=1)


def test_sparse_model_with_an_optimizer_that_cannot_take_sparse_gradients():
    with pytest.raises(ValueError, match="optimizer_type='rmsprop' cannot update the sparse"):
        recoder(optimizer_type="rmsprop").train(RecommendationDataset(matrix()))


def test_more_users_than_the_model_represents():
    r = Recoder(MatrixFactorization(4), num_users=10, optimizer_type="adam", num_workers=0)
    with pytest.raises(ValueError, match="20 users but the model represents 10"):
        r.train(RecommendationDataset(matrix(users=20)))


def test_a_model_of_user_rows_is_refused_users_it_does_not_know(ray_session):
    """MatrixFactorization scores users by their row of its user table: data with more users
    is refused by name (it would meet an IndexError in the table), and so is a bare matrix
    that is not every user's rows (its rows are read as users 0..n-1, so rows 5..7 of the
    training matrix would be scored as users 0..2)."""
    train = RecommendationDataset(matrix(users=20))
    mf = Recoder(MatrixFactorization(4), num_workers=0, seed=0, user_based=False)
    mf.train(train, batch_size=5)
    bigger = RecommendationDataset(matrix(users=40), matrix(users=40, seed=1))
    with pytest.raises(ValueError, match="40 users but MatrixFactorization knows 20"):
        mf.evaluate(bigger, 10, [NDCG(10)])
    with pytest.raises(ValueError, match="40 users but MatrixFactorization knows 20"):
        Recoder(MatrixFactorization(4), num_workers=0).train(
            train, batch_size=5, val_dataset=bigger, eval_freq=1, metrics=[NDCG(10)]
        )
    with pytest.raises(ValueError, match="training data has 40 users but MatrixFactoriz"):
        mf.train(RecommendationDataset(matrix(users=40)), batch_size=5)  # user_based=False
    with pytest.raises(ValueError, match="give all 20 users' rows, or UsersInteractions"):
        mf.predict(matrix(users=20)[5:8])
    with pytest.raises(ValueError, match="names user 25; MatrixFactorization knows users 0..19"):
        mf.recommend(UsersInteractions(np.array([1, 25]), matrix(users=2)), 3)
    # What it knows, it scores: a user's row by id is that user's row of the whole matrix.
    whole = mf.predict(matrix(users=20))
    some = mf.predict(UsersInteractions(np.array([5, 6, 7]), matrix(users=20)[5:8]))
    np.testing.assert_allclose(some, whole[5:8], rtol=1e-5, atol=1e-6)  # a batch's rounding
    assert not np.allclose(some, whole[:3], rtol=1e-2)
    # An autoencoder reads only the interactions: any users.
    ae = trained_recoder(ray_session)
    assert ae.predict(matrix(users=40)).shape == (40, 30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_use_cuda_without_a_gpu_trains_on_cpu(ray_session, caplog, num_workers):
    """use_cuda=True means GPUs where present: none here, so the run is the CPU one, to the
    bit, and says so. The CPU run is this process's (a 1-worker run ends with its weights to
    the bit), which starts no second worker group."""
    weights = {}
    for use_cuda, workers in ((True, num_workers), (False, 0)):
        r = Recoder(DynamicAutoencoder([8]), use_cuda=use_cuda, num_workers=workers, seed=3)
        r.train(RecommendationDataset(matrix()), batch_size=5, num_epochs=2)
        weights[use_cuda] = r.model.state_dict()
    for name, tensor in weights[False].items():
        assert torch.equal(weights[True][name], tensor), name
    assert "use_cuda=True but no GPU is present here: running on CPU" in caplog.text


def test_evaluate_and_predict_need_a_model():
    with pytest.raises(ValueError, match="not initialized"):
        recoder().evaluate(RecommendationDataset(matrix(), matrix(seed=1)), 10, [NDCG(10)])
    with pytest.raises(ValueError, match="not initialized"):
        recoder().predict(matrix())


def test_evaluate_rejects_bad_input(ray_session):
    r = trained_recoder(ray_session)
    with pytest.raises(ValueError, match="needs target"):
        r.evaluate(RecommendationDataset(matrix()), 10, [NDCG(10)])
    with pytest.raises(ValueError, match="40 items but the model knows 30"):
        r.evaluate(
            RecommendationDataset(matrix(items=40), matrix(items=40, seed=1)), 10, [NDCG(10)]
        )
    with pytest.raises(TypeError, match="Metric"):
        r.evaluate(RecommendationDataset(matrix(), matrix(seed=1)), 10, ["ndcg"])
    with pytest.raises(ValueError, match="no user with target"):
        r.evaluate(RecommendationDataset(matrix(), sp.csr_matrix((20, 30))), 10, [NDCG(10)])
    with pytest.raises(ValueError, match="num_recommendations"):
        r.recommend(matrix(), 0)
    both = RecommendationDataset(matrix(), matrix(seed=1))
    with pytest.raises(ValueError, match="num_recommendations must be an int >= 1, got 5.5"):
        r.evaluate(both, 5.5, [NDCG(5)])
    for num_users in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_users must be a positive int"):
            r.evaluate(both, 10, [NDCG(10)], num_users=num_users)


def test_snapshot_files(ray_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="no snapshot file"):
        recoder().init_from_model_file(str(tmp_path / "missing.model"))
    with pytest.raises(FileNotFoundError, match="no snapshot file at .*: it is a folder"):
        recoder().init_from_model_file(str(tmp_path))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a snapshot at all")
    with pytest.raises(ValueError, match="not a readable snapshot"):
        recoder().init_from_model_file(str(garbage))
    path = trained_recoder(ray_session).save_state(str(tmp_path / "ae"))
    with pytest.raises(FileNotFoundError, match=r"files under that prefix: ae_epoch_1.model\)"):
        recoder().init_from_model_file(str(tmp_path / "ae"))  # the prefix, not its file
    with pytest.raises(ValueError, match="holds a recoder_dist.nn.autoencoder.DynamicAutoencoder"):
        Recoder(MatrixFactorization(), num_workers=0).init_from_model_file(path)


def test_incompatible_snapshots_name_the_mismatch(ray_session, tmp_path):
    path = trained_recoder(ray_session).save_state(str(tmp_path / "ae"))  # 30 items, [8]
    with pytest.raises(ValueError, match="trained with num_items=30, this Recoder has 40"):
        Recoder(DynamicAutoencoder([8]), num_items=40, num_workers=0).init_from_model_file(path)
    other = Recoder(DynamicAutoencoder([16], sparse=True), optimizer_type="adam", num_workers=0)
    other.train(RecommendationDataset(matrix()), batch_size=5, num_epochs=1)
    with pytest.raises(ValueError, match=r"hidden_layers=\[8\] \(model: \[16\]\)"):
        other.init_from_model_file(path)
    fresh = Recoder(DynamicAutoencoder([16]), num_workers=0)
    fresh.init_from_model_file(path)  # a fresh model takes the snapshot's hyper-parameters
    assert fresh.model.hidden_layers == [8]


def test_by_default_one_machine_trains_in_process_and_a_cluster_on_a_worker(ray_session):
    """num_workers=None: nothing to spread over on this one-node Ray, so no worker group is
    started (seconds a run); restarts after failures need a worker process to restart."""
    assert Recoder(DynamicAutoencoder([8])).workers == 0
    assert Recoder(DynamicAutoencoder([8]), max_failures=1).workers == 1
    assert Recoder(DynamicAutoencoder([8]), num_workers=2).workers == 2
    with pytest.raises(ValueError, match="num_workers must be None or an int >= 0"):
        Recoder(DynamicAutoencoder([8]), num_workers=-1)


def test_a_prefix_that_ends_with_a_separator_names_files_in_that_folder(ray_session, tmp_path):
    """recsys-recoder 0.4.0 names a snapshot ``"{}_epoch_{}.model".format(prefix, epoch)``: a
    prefix "models/" puts ``_epoch_N.model`` in the folder models, not beside it."""
    r = recoder()
    folder = tmp_path / "models"
    r.train(
        RecommendationDataset(matrix()),
        batch_size=5,
        num_epochs=2,
        model_checkpoint_prefix=f"{folder}/",
        checkpoint_freq=1,
    )
    assert sorted(p.name for p in folder.iterdir()) == ["_epoch_1.model", "_epoch_2.model"]
    assert r.save_state(f"{tmp_path}/saved/") == str(tmp_path / "saved" / "_epoch_2.model")
    assert r.save_state(tmp_path / "ae") == str(tmp_path / "ae_epoch_2.model")
    assert (tmp_path / "saved" / "_epoch_2.model").is_file()


class _OneScore(FactorizationModel):
    """A model of one's own (the tutorial's "Your Own Factorization Model") that returns one
    score per user, or nothing, where the trainer needs a score per target item; or
    (``scores_targets``) a score per target item when given them, and one per user when asked
    for every item, as evaluation asks."""

    def __init__(self, returns_nothing: bool = False, scores_targets: bool = False):
        super().__init__()
        self.returns_nothing, self.scores_targets = returns_nothing, scores_targets

    def init_model(self, num_items=None, num_users=None):
        self.weight = torch.nn.Linear(1, 1)

    def model_params(self):
        return {}

    def load_model_params(self, model_params):
        pass

    def forward(self, input, input_users=None, input_items=None, **targets):
        scores = self.weight(input.sum(1, keepdim=True))
        if self.scores_targets and targets.get("target_items") is not None:
            return scores.expand(-1, len(targets["target_items"]))
        return None if self.returns_nothing else scores


def test_a_forward_that_does_not_score_the_target_items_is_named(ray_session):
    data = RecommendationDataset(matrix())
    with pytest.raises(ValueError, match=r"_OneScore.forward returned shape \(5, 1\); expected"):
        Recoder(_OneScore(), num_workers=0).train(data, batch_size=5)
    with pytest.raises(TypeError, match="_OneScore.forward returned NoneType; expected a tensor"):
        Recoder(_OneScore(returns_nothing=True), num_workers=0).train(data, batch_size=5)
    # Trains (scoring the sampled items), and evaluation's forward over every item is named.
    r = Recoder(_OneScore(scores_targets=True), num_workers=0)
    r.train(data, batch_size=5, negative_sampling=True)
    with pytest.raises(ValueError, match=r"returned shape \(20, 1\); expected \(20, 30\)"):
        r.predict(matrix())
