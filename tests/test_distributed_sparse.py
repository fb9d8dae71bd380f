"""Replicated tables: sparse embeddings trained over 2 gloo workers end where dense embeddings
(plain DDP) end. (Sharded tables, sparse and dense, are checked against one process in
test_sharded_step.)"""

from __future__ import annotations

import pytest
import torch

from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from tests.ml100k import ml100k_split


@pytest.mark.slow
def test_two_workers_sparse_equals_two_workers_dense(ray_session):
    """SGD (with momentum) does the same arithmetic on sparse and dense gradients and is linear
    in them, so with negative sampling any error in the row all-gather, the averaging over
    ranks or the step agreement shows up as a weight difference. (SparseAdam and Adam differ
    by where eps enters, and normalized first steps turn float noise into lr-sized steps, so
    they are not compared here; test_sparse_sync checks the averaged gradient itself.)"""
    split = ml100k_split()
    weights, history = {}, {}
    for sparse in (True, False):
        recoder = Recoder(
            DynamicAutoencoder(hidden_layers=[16], sparse=sparse),
            optimizer_type="sgd",
            loss="logloss",
            num_workers=2,
            seed=3,
            tables="replicated",
        )
        torch.manual_seed(0)  # the model is initialized inside train: same start for both
        history[sparse] = recoder.train(
            split.train,
            batch_size=64,
            lr=0.05,
            num_epochs=2,
            iters_per_epoch=3,
            negative_sampling=True,
        )
        weights[sparse] = recoder.model.state_dict()
    for name, tensor in weights[True].items():
        torch.testing.assert_close(tensor, weights[False][name], atol=1e-6, rtol=1e-5, msg=name)
    torch.manual_seed(0)
    untrained = DynamicAutoencoder(hidden_layers=[16])
    untrained.init_model(num_items=split.train.num_items)
    moved = weights[True]["encoder_embedding.weight"] - untrained.encoder_embedding.weight
    assert moved.abs().max() > 1e-3  # it did train
    last = history[True][-1]
    # Never more than a dense all-reduce plus the "touched" column that its dense path adds
    # to each of the 3 sparse tables (encoder, decoder, output bias).
    touched_columns = 3 * split.train.num_items * 4
    assert 0 < last["sync_bytes_per_step"] <= last["dense_sync_bytes_per_step"] + touched_columns
    assert "sync_bytes_per_step" not in history[False][-1]
