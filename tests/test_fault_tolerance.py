"""A worker killed mid-epoch: the run restarts from its last checkpoint and ends with the
weights of a run that was never interrupted."""

from __future__ import annotations

import os

import pytest
import ray.train
import torch

from recoder_dist.losses import MultinomialNLLLoss
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from tests.ml100k import ml100k_split


class CrashOnce(MultinomialNLLLoss):
    """logloss that kills the worker process of rank ``rank`` at its ``at_call``-th batch, the
    first time only (a marker file remembers it across the restart)."""

    def __init__(self, marker: str, rank: int, at_call: int):
        super().__init__()
        self.marker, self.rank, self.at_call, self.calls = marker, rank, at_call, 0

    def forward(self, input, target):
        self.calls += 1
        rank = ray.train.get_context().get_world_rank()
        if self.calls == self.at_call and rank == self.rank and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # no cleanup, no exception: the process is gone
        return super().forward(input, target)


def train(loss, tmp_path, name) -> Recoder:
    model = DynamicAutoencoder(
        hidden_layers=[32], activation_type="tanh", noise_prob=0.5, sparse=True
    )
    recoder = Recoder(
        model,
        optimizer_type="adam",
        loss=loss,
        num_workers=2,
        seed=5,
        max_failures=1,
        storage_path=str(tmp_path / name),
    )
    torch.manual_seed(0)  # the model is initialized inside train: the same start for both runs
    recoder.train(
        ml100k_split().train,
        batch_size=100,
        lr=1e-3,
        num_epochs=4,
        checkpoint_freq=1,
        negative_sampling=True,
    )
    return recoder


@pytest.mark.slow
def test_killed_worker_resumes_to_the_uninterrupted_weights(ray_session, tmp_path):
    marker = tmp_path / "crash-marker"
    # 396 rows per rank in batches of 100: 4 steps an epoch; call 10 is step 2 of epoch 3.
    crashed = train(CrashOnce(str(marker), rank=1, at_call=10), tmp_path, "crashed")
    assert marker.is_file()  # the crash did happen
    # The same loss class, never crashing: a loss module of the user's trains with replicated
    # tables (the sharded decoder computes only the built-in losses), so both runs do.
    reference = train(CrashOnce(str(marker), rank=1, at_call=-1), tmp_path, "reference")
    assert crashed.current_epoch == reference.current_epoch == 4
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(
            crashed.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name
        )
    # Epochs 1-2 done, epoch 3 cut short, then resumed from the last checkpoint that the
    # controller had registered (epoch 2, or epoch 1 when the crash came first): epochs after
    # it run again, but epoch 1 never does, as it would in a run restarted from scratch.
    epochs = [h["epoch"] for h in crashed.history]
    assert epochs.count(1) == 1 and epochs[-2:] == [3, 4] and sorted(set(epochs)) == [1, 2, 3, 4]
