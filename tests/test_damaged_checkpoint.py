"""A run whose last checkpoint is damaged goes back to the one before instead of starting over
(issue 35, item 4): 2 workers with sharded tables, whose shard files carry checksums (the
whole snapshot's checksum is tested in test_snapshot; the fallback is the same code).

A run of 2 epochs leaves checkpoints of epochs 1 and 2 in its storage; one byte of a tensor
in epoch 2's files is then flipped (``torch.load`` reads it silently; the files' checksums do
not match). Started again under the run's name, the run is given epoch 2's checkpoint by Ray
Train, finds it damaged, resumes from epoch 1 and trains epoch 2 again: it ends with the
weights of the first run, to the bit, and epoch 1 is not repeated.
"""

from __future__ import annotations

import pytest
import torch

from recoder_dist.data import RecommendationDataset
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.sharded.checkpoint import shard_files
from tests.damage import alter_a_tensor_byte
from tests.ml100k import ml100k_split

pytestmark = pytest.mark.slow
SETTINGS = dict(batch_size=100, lr=1e-3, negative_sampling=True, checkpoint_freq=1)


def test_a_damaged_last_checkpoint_resumes_from_the_one_before(ray_session, tmp_path):
    workers = 2
    data = RecommendationDataset(ml100k_split().train.interactions[:300])

    def recoder() -> Recoder:
        model = DynamicAutoencoder(hidden_layers=[32], activation_type="tanh", sparse=True)
        return Recoder(
            model,
            num_workers=workers,
            cpus_per_worker=1,
            seed=5,
            storage_path=str(tmp_path),
            run_name="run",
        )

    first = recoder()
    first.train(data, num_epochs=2, **SETTINGS)
    last = tmp_path / "run" / "epoch_2"
    files = shard_files(str(last))
    assert len(files) == workers
    alter_a_tensor_byte(files[-1])

    again = recoder()
    again.train(data, num_epochs=2, **SETTINGS)
    assert [h["epoch"] for h in again.history] == [1, 2]
    assert again.history[0] == first.history[0]  # epoch 1's record, from its checkpoint
    assert again.history[1]["seconds"] != first.history[1]["seconds"]  # epoch 2 ran again
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
