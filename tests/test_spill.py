"""Training rows larger than Ray's object store (issue 35, item 5): Ray spills the blocks to
disk and restores them as the epoch reads them; the run completes with the weights of the same
run on a store that holds them all.

Each run is a process of its own, on a local Ray of its own (the object store's size is a
setting of a Ray instance, and this test session's Ray keeps its default)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multinode import REPO, last_json

STORE_BYTES = 80 * 2**20  # about Ray's least (75 MiB)

_RUN = """
import hashlib, json, re, subprocess, sys, time
import numpy as np, scipy.sparse as sp, ray
from recoder_dist.data import RecommendationDataset
from recoder_dist.model import Recoder, read_training_rows
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.driver.launcher import init_local_ray

store = int(sys.argv[1])
init_local_ray(num_cpus=2, object_store_memory=store or None, include_dashboard=False)
# 12M interactions, 96 MB of ids and values; few items, so that a step scores few
users, items, per_user = 120_000, 1_000, 100
user = np.arange(users)[:, None]
indices = np.sort((user * 7 + np.arange(per_user) * 9) % items, axis=1).ravel()
indptr = np.arange(users + 1, dtype=np.int64) * per_user
matrix = sp.csr_matrix((np.ones(users * per_user, np.float32), indices, indptr), (users, items))
rows = read_training_rows(RecommendationDataset(matrix))
del matrix, indices
recoder = Recoder(DynamicAutoencoder([8], sparse=True), num_workers=0, seed=0)
started = time.perf_counter()
history = recoder.train(rows, batch_size=200, num_epochs=2, negative_sampling=True)
seconds = time.perf_counter() - started
digest = hashlib.sha256()
for name, tensor in sorted(recoder.model.state_dict().items()):
    digest.update(name.encode() + tensor.numpy().tobytes())
stats = subprocess.run(
    ["ray", "memory", "--stats-only", "--address", ray.get_runtime_context().gcs_address],
    capture_output=True, text=True,
).stdout
spilled = re.search(r"Spilled (\\d+) MiB", stats)
print(json.dumps({
    "digest": digest.hexdigest(), "loss": history[-1]["loss"], "seconds": seconds,
    "spilled_mib": int(spilled[1]) if spilled else 0, "stats": stats,
}))
"""


def _run(store_bytes: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(store_bytes)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        start_new_session=True,
    )
    return last_json(done)


@pytest.mark.slow
def test_rows_larger_than_the_object_store_spill_and_train_the_same_weights():
    small = _run(STORE_BYTES)
    assert small["spilled_mib"] > 0, f"nothing was spilled:\n{small['stats']}"
    large = _run(0)  # the default store: a share of the machine's memory, GBs here
    assert large["spilled_mib"] == 0, large["stats"]
    assert small["digest"] == large["digest"]
    assert small["loss"] == large["loss"]
    print(
        f"2 epochs with rows spilled ({small['spilled_mib']} MiB): {small['seconds']:.1f} s; "
        f"held in the store: {large['seconds']:.1f} s"
    )
