"""After a run with sharded tables the driver holds no weights: they stay in the run's
checkpoint, shard by shard. Continued training and evaluation on workers read their rows from
it, and the model is assembled in the driver only when something asks for it.

The reference is one process fed the workers' joined batches (``tests/test_sharded_training``),
which trains epochs 1 and 2 straight, where the Recoder continues from its kept shards.
"""

from __future__ import annotations

import pytest
import torch

from recoder_dist.data import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder, read_training_rows
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.worker.optimizers import build_optimizers
from tests.ml100k import ml100k_split
from tests.test_sharded_training import MODEL, SEED, TRAIN, _close, _reference_epochs

pytestmark = pytest.mark.slow
METRICS = [Recall(k=20), NDCG(k=50)]


def _holds_no_weights(recoder: Recoder) -> bool:
    return all(p.is_meta for p in recoder._model.parameters())


def test_a_sharded_runs_weights_stay_in_its_shards_until_asked_for(ray_session):
    split = ml100k_split()
    rows = read_training_rows(RecommendationDataset(split.train.interactions[:400]))
    num_items = split.train.num_items
    recoder = Recoder(DynamicAutoencoder(**MODEL), num_items=num_items, num_workers=2, seed=SEED)

    recoder.train(rows, num_epochs=1, **TRAIN)
    assert _holds_no_weights(recoder) and recoder.current_epoch == 1
    recoder.train(rows, num_epochs=1, **TRAIN)  # each worker reads its rows and Adam's moments
    assert _holds_no_weights(recoder) and recoder.current_epoch == 2
    assert [h["epoch"] for h in recoder.history] == [1, 2]
    on_workers = recoder.evaluate(split.test, 50, METRICS, batch_size=40, on_workers=True)
    assert _holds_no_weights(recoder)

    reference = DynamicAutoencoder(**MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        reference.init_model(num_items=num_items)
    optimizers = build_optimizers(reference, "adam", TRAIN["lr"], 0.0)
    losses = _reference_epochs(reference, optimizers, rows, num_items, 2, [1, 2])
    assert [h["loss"] for h in recoder.history] == pytest.approx(losses, rel=1e-5)
    _close(recoder.model.state_dict(), reference.state_dict())  # assembled here, now
    assert not _holds_no_weights(recoder)

    here = recoder.evaluate(split.test, 50, METRICS, batch_size=40, on_workers=False)
    for name in ("Recall@20", "NDCG@50"):
        assert on_workers[name] == pytest.approx(here[name], abs=1e-6)
    assert on_workers["eval_users"] == here["eval_users"]
