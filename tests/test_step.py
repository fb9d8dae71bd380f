"""One training step's loss: the sparse CPU path against the dense formula."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from recoder_dist.data.collator import Collator, UserRows
from recoder_dist.losses import build_loss
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.training.batch import model_input, sparse_tensor
from recoder_dist.training.worker.step import batch_loss

CPU = torch.device("cpu")


def sampled_batch(negative_sampling=True):
    """The first training batch of a 6-user group over 12 items."""
    rng = np.random.default_rng(3)
    dense = (rng.random((6, 12)) < 0.3) * rng.integers(1, 4, (6, 12))
    dense[:, 0] = 1
    indptr = np.concatenate([[0], np.cumsum((dense > 0).sum(1))])
    group = UserRows(
        users=np.arange(6, dtype=np.int64),
        indptr=indptr.astype(np.int64),
        indices=np.nonzero(dense)[1].astype(np.int64),
        values=dense[dense > 0].astype(np.float32),
    )
    collator = Collator(num_items=12, batch_size=4, negative_sampling=negative_sampling)
    return next(iter(collator(group)))


def model():
    torch.manual_seed(0)
    net = DynamicAutoencoder([5], noise_prob=0.0)
    net.init_model(num_items=12)
    return net


@pytest.mark.parametrize("negative_sampling", [True, False])
def test_sparse_tensor_holds_the_batch_really_coalesced(negative_sampling):
    """The tensor is flagged coalesced without sorting: its entries must already be in the
    order and uniqueness that ``coalesce`` would give (else losses would count duplicates)."""
    batch = sampled_batch(negative_sampling)
    tensor = sparse_tensor(batch)
    rebuilt = torch.sparse_coo_tensor(
        tensor._indices(), tensor._values(), tensor.shape, check_invariants=True
    )
    reference = rebuilt.coalesce()  # sorts and merges for real
    assert torch.equal(tensor._indices(), reference._indices())
    assert torch.equal(tensor._values(), reference._values())
    np.testing.assert_array_equal(tensor.to_dense().numpy(), batch.to_dense())


@pytest.mark.parametrize("loss_name", ["mse", "logistic", "logloss"])
def test_batch_loss_equals_the_dense_formula(loss_name):
    """On CPU the autoencoder reads the batch sparse (and logloss/mse take a sparse target,
    logistic a dense one); the loss is still loss(model(X), X) / users on the dense X."""
    batch = sampled_batch()
    net, loss_fn = model(), build_loss(loss_name)
    assert model_input(net, batch, CPU).is_sparse
    dense = torch.from_numpy(batch.to_dense())
    items = torch.from_numpy(batch.items)
    expected = loss_fn(net(dense, input_items=items, target_items=items), dense) / len(dense)
    got = batch_loss(net, loss_fn, batch, CPU)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_models_without_sparse_input_get_the_dense_batch():
    class DenseOnly(torch.nn.Module):
        def forward(self, input, **_):
            return input

    batch = sampled_batch()
    input = model_input(DenseOnly(), batch, CPU)
    assert not input.is_sparse
    np.testing.assert_array_equal(input.numpy(), batch.to_dense())


@pytest.mark.parametrize("debug", [False, True])
def test_debug_checks_every_batch_before_the_step(monkeypatch, debug):
    """A batch whose entries are out of row order is flagged coalesced all the same, and the
    loss silently counts it wrong; RECODER_DIST_DEBUG=1 (step.DEBUG) refuses it first."""
    from recoder_dist.training.worker import step

    monkeypatch.setattr(step, "DEBUG", debug)
    batch = sampled_batch()
    order = np.argsort(-batch.rows, kind="stable")  # rows descending: not row-major
    broken = dataclasses.replace(
        batch, rows=batch.rows[order], cols=batch.cols[order], values=batch.values[order]
    )
    net, loss_fn = model(), build_loss("logloss")
    if debug:
        with pytest.raises(ValueError, match="sorted"):
            batch_loss(net, loss_fn, broken, CPU)
    else:
        batch_loss(net, loss_fn, broken, CPU)  # no check: nothing stops it


def test_bf16_runs_the_forward_in_bfloat16_and_keeps_float32_weights_and_gradients():
    """precision="bf16": the loss is the dense formula's with the model under autocast (to
    bfloat16's precision, not to float32's), and the weights and their gradients stay float32."""
    batch = sampled_batch()
    net, loss_fn = model(), build_loss("logloss")
    dense = torch.from_numpy(batch.to_dense())
    items = torch.from_numpy(batch.items)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = net(dense, input_items=items, target_items=items)
    assert output.dtype == torch.bfloat16
    expected = loss_fn(output.float(), dense) / len(dense)
    fp32 = batch_loss(net, loss_fn, batch, CPU)
    got = batch_loss(net, loss_fn, batch, CPU, bf16=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert got.item() != fp32.item()  # autocast did act
    got.backward()
    for name, param in net.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.grad is None or param.grad.dtype == torch.float32, name
