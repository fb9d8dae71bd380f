"""``Recoder(..., kernels=...)``: the CPU fast paths or their references, for a whole run.

The fast paths themselves are checked against their references in test_top_k.py,
test_top_k_kernel.py and test_nn.py; here, that the choice reaches the training and the
evaluation that run in this process, and that both train to the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.metrics import NDCG, Recall
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.nn import autoencoder as autoencoder_module
from recoder_dist.training.evaluation import top_k_kernel


def _matrix(seed: int) -> sp.csr_matrix:
    """300 users x 1,200 items: enough blocks of 8 for the top-k kernel's k=50."""
    matrix = sp.random(300, 1200, 0.03, format="csr", random_state=seed, dtype=np.float32)
    matrix.data[:] = 1.0
    return matrix


def _run(kernels: str):
    recoder = Recoder(
        DynamicAutoencoder([16], sparse=True),  # no input noise: both paths draw no random
        num_workers=0,
        seed=0,
        kernels=kernels,
    )
    history = recoder.train(
        RecommendationDataset(_matrix(1)), num_epochs=2, batch_size=100, negative_sampling=True
    )
    results = recoder.evaluate(
        RecommendationDataset(_matrix(2), _matrix(3)), metrics=[Recall(50), NDCG(50)]
    )
    return [record["loss"] for record in history], results


def test_an_unknown_mode_is_a_value_error():
    with pytest.raises(ValueError, match="kernels='fast': choose one of"):
        Recoder(DynamicAutoencoder([8]), kernels="fast")


def test_the_reference_mode_runs_no_fast_path_and_trains_to_the_same_numbers(
    ray_session, monkeypatch
):
    """With kernels='reference' the fast paths are replaced by functions that fail: the run
    must not reach them. Its losses and metrics are those of the fast paths, up to rounding."""
    fast_losses, fast_results = _run("compiled")

    def fail(*args, **kwargs):
        raise AssertionError("a fast path ran with kernels='reference'")

    monkeypatch.setattr(top_k_kernel, "top_k_rows", fail)
    monkeypatch.setattr(autoencoder_module, "_pooled_entries", fail)
    losses, results = _run("reference")

    np.testing.assert_allclose(losses, fast_losses, rtol=1e-5)
    assert results.keys() == fast_results.keys()
    for key, value in results.items():
        assert value == pytest.approx(fast_results[key], rel=1e-6), key
