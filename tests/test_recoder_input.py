"""Bad input to Recoder fails at once with an error that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recoder_dist.data import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization


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
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"iters_per_epoch": 0}, ValueError, "iters_per_epoch"),
        ({"precision": "fp16"}, ValueError, "precision must be one of"),
    ],
)
def test_train_rejects_bad_arguments(train_kwargs, error, message):
    with pytest.raises(error, match=message):
        recoder().train(RecommendationDataset(matrix()), **train_kwargs)


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


def test_snapshot_files(ray_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="no snapshot file"):
        recoder().init_from_model_file(str(tmp_path / "missing.model"))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a snapshot at all")
    with pytest.raises(ValueError, match="not a readable snapshot"):
        recoder().init_from_model_file(str(garbage))
    path = trained_recoder(ray_session).save_state(str(tmp_path / "ae"))
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
