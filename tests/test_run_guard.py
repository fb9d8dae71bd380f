"""Two jobs on one run (issue 35, item 3): while a job trains a named run, another that starts
the same run (the same storage and name) is refused at once with an error naming the first,
before any worker starts; once the first ends, the name is free again.

The first job is played by this process holding the run's name as a job's driver does (the
progress actor of ``run_job``, named after the run and owned by the driver, so it dies with it).
"""

from __future__ import annotations

import os
import time

import pytest

from recoder_dist.data import RecommendationDataset
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.driver import progress
from recoder_dist.training.driver.progress import ProgressPrinter, RunInUseError
from tests.ml100k import ml100k_split


def test_a_second_job_on_a_running_run_is_refused(ray_session, tmp_path, monkeypatch):
    # The wait for a holder that has just ended, shorter here: this one does not end.
    monkeypatch.setattr(progress, "CLAIM_WAIT_S", 0.5)
    data = RecommendationDataset(ml100k_split().train.interactions[:100])
    recoder = Recoder(
        DynamicAutoencoder([8]), num_workers=1, storage_path=str(tmp_path), run_name="busy"
    )
    key = f"{tmp_path}/busy"
    with ProgressPrinter(run=key):  # the first job, running
        started = time.monotonic()
        with pytest.raises(RunInUseError, match=f"the run {key} is being trained by another job"):
            recoder.train(data, batch_size=50)
        waited = time.monotonic() - started
        assert waited < progress.CLAIM_WAIT_S + 5, waited  # refused in seconds, not after a run
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):  # names the holder
            ProgressPrinter(run=key)
    assert not (tmp_path / "busy").exists()  # no worker wrote anything
    with ProgressPrinter(run=key):  # released with the first job's end
        pass
