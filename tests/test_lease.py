"""A run's lease in its storage (recoder_dist.training.driver.lease): two clusters that share a
bucket never train one run at once; a lease whose holder was lost is taken over when it expires."""

from __future__ import annotations

import json
import threading
import time

import pytest

from recoder_dist.data import RecommendationDataset
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.driver.lease import LEASE_FILE, RunLease
from recoder_dist.training.driver.progress import RunInUseError
from tests.ml100k import ml100k_split


def holder(cluster: str) -> dict:
    return {"cluster": cluster, "host": "h", "pid": 1}


def take(run, cluster: str, **kwargs) -> None:
    """Takes and gives back the lease of ``run`` for a driver of ``cluster``."""
    with RunLease(str(run), holder(cluster), **kwargs):
        pass


def write_lease(run, cluster: str, expires_in_s: float) -> None:
    lease = {**holder(cluster), "token": "theirs", "expires": time.time() + expires_in_s}
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_FILE).write_text(json.dumps(lease))


def test_another_clusters_driver_is_refused_while_the_lease_lives(tmp_path):
    run = tmp_path / "runs" / "r"
    refused = pytest.raises(RunInUseError, match="another cluster \\(cluster a, host h, pid 1\\)")
    with RunLease(str(run), holder("a"), settle_s=0), refused:
        take(run, "b", settle_s=0)
    assert not (run / LEASE_FILE).exists()  # deleted at the end of the run
    with RunLease(str(run), holder("b"), settle_s=0):  # free again
        assert json.loads((run / LEASE_FILE).read_text())["cluster"] == "b"


def test_a_lease_is_renewed_while_the_run_goes_on(tmp_path):
    """A lease of 0.6 s, held for 1.5 s: still refused at 1.2 s, as it was renewed."""
    run = tmp_path / "r"
    with RunLease(str(run), holder("a"), lease_s=0.6, settle_s=0):
        time.sleep(1.2)
        with pytest.raises(RunInUseError):
            take(run, "b", settle_s=0)


def test_a_lost_holders_lease_is_taken_over_once_it_expires(tmp_path, caplog):
    run = tmp_path / "r"
    write_lease(run, "a", expires_in_s=1.0)  # its driver was lost: nobody renews or deletes it
    with pytest.raises(RunInUseError):
        take(run, "b", settle_s=0)
    time.sleep(1.2)
    with RunLease(str(run), holder("b"), settle_s=0):
        assert json.loads((run / LEASE_FILE).read_text())["cluster"] == "b"
    assert "taking over the run" in caplog.text and "cluster a" in caplog.text


def test_this_clusters_lease_is_left_to_its_named_actor(tmp_path):
    """A lease of this cluster that has not expired is a driver of this cluster that ended
    (a stopped job); whether one still lives, the progress actor's name decides."""
    run = tmp_path / "r"
    write_lease(run, "b", expires_in_s=60)
    with RunLease(str(run), holder("b"), settle_s=0):
        assert json.loads((run / LEASE_FILE).read_text())["token"] != "theirs"


def test_of_two_drivers_that_write_at_once_the_one_that_does_not_read_back_its_own_steps_down(
    tmp_path,
):
    run = tmp_path / "r"
    # Another cluster's driver writes its lease while this one waits to read its own back.
    racer = threading.Timer(0.3, lambda: write_lease(run, "a", expires_in_s=60))
    racer.start()
    with pytest.raises(RunInUseError, match="cluster a"):
        take(run, "b", settle_s=1.0)
    racer.join()


def test_a_named_run_holds_its_lease_and_another_clusters_lease_refuses_it(ray_session, tmp_path):
    """In the launcher: a run whose storage holds another cluster's live lease is refused
    before it trains; a run with none trains, and leaves no lease behind."""
    train = RecommendationDataset(ml100k_split().train.interactions[:200])

    def recoder():
        model = DynamicAutoencoder(hidden_layers=[8])
        return Recoder(model, num_workers=0, storage_path=str(tmp_path), run_name="r")

    write_lease(tmp_path / "r", "another-cluster", expires_in_s=60)
    refused = recoder()
    with pytest.raises(RunInUseError, match="cluster another-cluster"):
        refused.train(train, batch_size=100, num_epochs=1)
    assert refused.history == []
    (tmp_path / "r" / LEASE_FILE).unlink()
    history = recoder().train(train, batch_size=100, num_epochs=1)
    assert [h["epoch"] for h in history] == [1]
    assert not (tmp_path / "r" / LEASE_FILE).exists()
