"""Training rows read once (`read_training_rows`) train exactly as the files they came from."""

from __future__ import annotations

import pytest
import torch

from recoder_dist.datasets import open_prepared
from recoder_dist.model import Recoder, TrainingRows, read_training_rows
from recoder_dist.nn import DynamicAutoencoder


def _trained(train_dataset) -> dict:
    recoder = Recoder(DynamicAutoencoder(hidden_layers=[32]), num_workers=0, seed=3)
    recoder.train(train_dataset, batch_size=100, num_epochs=2, negative_sampling=True)
    return recoder.model.state_dict()


def test_rows_read_once_train_like_their_files_twice(ray_session, prepared_ml100k):
    files = open_prepared(prepared_ml100k).train
    rows = read_training_rows(files)
    assert isinstance(rows, TrainingRows)
    assert (len(rows), rows.num_items, rows.num_users, rows.num_interactions) == (
        files.num_rows,
        files.num_items,
        files.num_users,
        files.num_interactions,
    )
    reference = _trained(files)
    for _ in range(2):  # two runs on the same blocks, as two trials of a sweep
        weights = _trained(rows)
        assert weights.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(weights[name], value), name


def test_training_rows_cannot_be_evaluated(ray_session, prepared_ml100k):
    rows = read_training_rows(open_prepared(prepared_ml100k).train)
    recoder = Recoder(DynamicAutoencoder(hidden_layers=[32]), num_workers=0, seed=3)
    recoder.train(rows, num_epochs=1)
    with pytest.raises(TypeError, match="no target items"):
        recoder.evaluate(rows, 10)
    with pytest.raises(TypeError, match="RecommendationDataset or UserRowFiles"):
        read_training_rows([[1, 2]])
