"""The step-time profile: phases timed exclusively of the phases nested in them, and a profiled
run that trains exactly like an unprofiled one."""

from __future__ import annotations

import pytest
import torch

from recoder_dist.data import RecommendationDataset
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.worker.step_profile import PHASES, StepProfile
from tests.ml100k import ml100k_split


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_are_timed_exclusively_and_the_rest_is_other():
    clock = FakeClock()
    profile = StepProfile(True, torch.device("cpu"), clock=clock)
    clock.now = 1.0  # before any phase: "other"
    with profile.phase("backward"):
        clock.now = 3.0
        with profile.phase("ddp_allreduce"):
            clock.now = 3.5
        clock.now = 4.0
    with profile.phase("optimizer"):
        clock.now = 4.25
    with profile.phase("backward"):  # a second step adds up
        clock.now = 5.0
    seconds = profile.epoch_seconds()
    assert list(seconds) == list(PHASES)
    assert seconds["backward"] == 2.5 + 0.75
    assert seconds["ddp_allreduce"] == 0.5
    assert seconds["optimizer"] == 0.25
    assert seconds["other"] == 1.0
    assert sum(seconds.values()) == 5.0
    profile.restart()
    assert sum(profile.epoch_seconds().values()) == 0.0


def test_a_disabled_profile_records_nothing():
    clock = FakeClock()
    profile = StepProfile(False, torch.device("cpu"), clock=clock)
    with profile.phase("forward"):
        clock.now = 2.0
    profile.barrier()  # no process group: must not be called, and is not
    seconds = profile.epoch_seconds()
    assert seconds["forward"] == 0.0 and seconds["other"] == 2.0


def _train(workers: int, profile: bool, tables: str = "sharded"):
    # Two dense hidden layers (averaged by DDP, or summed with sharded tables) between sparse
    # item embeddings (SparseGradSync, or sharded).
    model = DynamicAutoencoder(hidden_layers=[16, 8], activation_type="tanh", sparse=True)
    recoder = Recoder(model, optimizer_type="adam", num_workers=workers, seed=3, tables=tables)
    data = RecommendationDataset(ml100k_split().train.interactions[:400])
    history = recoder.train(
        data, batch_size=50, lr=1e-3, num_epochs=2, negative_sampling=True, profile=profile
    )
    return recoder.model.state_dict(), history


def _plain_and_profiled(tables: str, request, tmp_path):
    """The weights and records of a plain and a profiled 2-worker run with ``tables``. The
    sharded plain run is tests/test_sharded_training.py's straight run (conftest's
    ``sharded_run``), and the profiled one takes its settings: one worker group fewer."""
    if tables == "sharded":
        from tests.test_sharded_training import _crash_run

        plain = request.getfixturevalue("sharded_run")
        profiled = _crash_run(tmp_path, "profiled", at_call=-1, profile=True)
        state = profiled.model.state_dict()
        return plain.model.state_dict(), plain.history, state, profiled.history
    plain, plain_history = _train(2, profile=False, tables=tables)
    return (plain, plain_history, *_train(2, profile=True, tables=tables))


@pytest.mark.slow
@pytest.mark.parametrize("tables", ["sharded", "replicated"])
def test_a_profiled_two_worker_run_trains_to_the_bit_like_an_unprofiled_one(
    ray_session, tables, request, tmp_path
):
    """The profile's barriers and its blocking DDP hook change when the work happens, not what
    is computed; every rank's phases are reported, and rank 0's add up to at most its epoch's
    time. Sharded tables have no DDP: their dense gradients are summed in ``sparse_sync``."""
    plain, plain_history, profiled, history = _plain_and_profiled(tables, request, tmp_path)
    for name, tensor in plain.items():
        assert torch.equal(profiled[name], tensor), name
    assert "profile" not in plain_history[-1]
    for record in history:
        phases = record["profile"]
        assert list(phases) == [*PHASES, "batches_cpu"]
        assert all(len(per_rank) == 2 for per_rank in phases.values())
        for phase in ("forward", "backward", "ddp_allreduce", "sparse_sync", "optimizer"):
            if phase == "ddp_allreduce" and tables == "sharded":
                assert phases[phase] == [0.0, 0.0]
            else:
                assert min(phases[phase]) > 0, phase
        # The record's seconds are rank 0's epoch (rank 1's may start earlier and wait).
        assert sum(phases[p][0] for p in PHASES) <= record["seconds"]
        assert record["loss"] == plain_history[record["epoch"] - 1]["loss"]


def test_an_in_process_profile_has_one_rank_and_no_collectives(ray_session):
    _, history = _train(0, profile=True)
    phases = history[-1]["profile"]
    assert all(len(per_rank) == 1 for per_rank in phases.values())
    assert phases["forward"][0] > 0 and phases["optimizer"][0] > 0
    assert phases["wait"] == phases["ddp_allreduce"] == phases["sparse_sync"] == [0.0]


def test_the_wait_for_each_item_is_timed_and_the_items_pass_unchanged():
    clock = FakeClock()

    def items():
        for item in ("a", "b", "c"):
            clock.now += 0.25  # making the item
            yield item

    for enabled, data_seconds in ((True, 0.75), (False, 0.0)):
        profile = StepProfile(enabled, torch.device("cpu"), clock=clock)
        assert list(profile.timed(items(), "data")) == ["a", "b", "c"]
        assert profile.epoch_seconds()["data"] == data_seconds
