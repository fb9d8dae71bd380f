"""Optimizer construction: sparse embeddings to SparseAdam, the rest to the named optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.training.worker.optimizers import (
    build_optimizers,
    epoch_lrs,
    lr_at_epoch,
    sparse_parameter_names,
)
from recoder_dist.training.worker.sparse_adam import RowwiseSparseAdam

NUM_ITEMS, NUM_USERS = 20, 7


def autoencoder(hidden=(16, 8), constrained=False, sparse=True) -> DynamicAutoencoder:
    torch.manual_seed(0)
    model = DynamicAutoencoder(list(hidden), is_constrained=constrained, sparse=sparse)
    model.init_model(num_items=NUM_ITEMS)
    return model


def factorization(sparse=True) -> MatrixFactorization:
    torch.manual_seed(0)
    model = MatrixFactorization(4, sparse=sparse)
    model.init_model(num_items=NUM_ITEMS, num_users=NUM_USERS)
    return model


def train_steps(model, opts, batches):
    for x, items in batches:
        opts.zero_grad()
        model(x[:, items], input_items=items, target_items=items).pow(2).sum().backward()
        opts.step()


def make_batches(seed: int, count: int):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        items = torch.randperm(NUM_ITEMS, generator=gen)[:8]
        out.append((torch.rand(4, NUM_ITEMS, generator=gen), items))
    return out


class Tower(nn.Module):
    """A user-defined model: sparse tables nested in submodules, one of them shared."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleDict(
            {"item": nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Tanh())}
        )
        self.shared = self.towers["item"][0]  # the same table under a second name
        self.bag = nn.EmbeddingBag(10, 3, mode="sum", sparse=True)
        self.dense_table = nn.Embedding(10, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        z = self.towers["item"](items) + self.shared(items) + self.dense_table(items)
        z = z + self.bag(items.unsqueeze(0)).expand_as(z)
        return self.head(z)


class TiedTables(nn.Module):
    """Two sparse Embedding modules sharing one weight Parameter (input and output tables)."""

    def __init__(self):
        super().__init__()
        self.input_table = nn.Embedding(10, 3, sparse=True)
        self.output_table = nn.Embedding(10, 3, sparse=True)
        self.output_table.weight = self.input_table.weight


# ------------------------------------------------------------------ sparse_parameter_names


@pytest.mark.parametrize(
    "model, expected",
    [
        (
            lambda: autoencoder(constrained=False),
            ["decoder_bias.weight", "decoder_embedding.weight", "encoder_embedding.weight"],
        ),
        (
            lambda: autoencoder(constrained=True),
            ["decoder_bias.weight", "encoder_embedding.weight"],
        ),
        (
            lambda: factorization(),
            ["item_bias.weight", "item_embedding.weight", "user_embedding.weight"],
        ),
        (lambda: autoencoder(sparse=False), []),
        (lambda: factorization(sparse=False), []),
        (lambda: Tower(), ["bag.weight", "towers.item.0.weight"]),
        (lambda: TiedTables(), ["input_table.weight"]),
        (lambda: nn.Embedding(5, 2, sparse=True), ["weight"]),
        (lambda: nn.EmbeddingBag(5, 2, sparse=True), ["weight"]),
        (lambda: nn.Embedding(5, 2), []),
    ],
)
def test_sparse_parameter_names(model, expected):
    """Every sparse Embedding/EmbeddingBag weight, nested or tied, is listed exactly once,
    under its first name; dense tables are not listed."""
    assert sparse_parameter_names(model()) == expected


def test_sparse_names_are_the_params_with_sparse_grads():
    """The listed parameters are exactly those that get sparse gradients in a backward."""
    model = Tower()
    model(torch.tensor([1, 4, 4, 9])).sum().backward()
    sparse_grads = sorted(n for n, p in model.named_parameters() if p.grad.is_sparse)
    assert sparse_parameter_names(model) == sparse_grads


# ------------------------------------------------------------------ build_optimizers


def owners(opt: torch.optim.Optimizer | None) -> list[int]:
    if opt is None:
        return []
    return [id(p) for group in opt.param_groups for p in group["params"]]


SPLITS = [
    ("adam", torch.optim.Adam, RowwiseSparseAdam),
    ("adamw", torch.optim.AdamW, RowwiseSparseAdam),
    ("adagrad", torch.optim.Adagrad, torch.optim.Adagrad),
]


@pytest.mark.parametrize("name, dense_cls, sparse_cls", SPLITS)
@pytest.mark.parametrize(
    "make", [lambda: autoencoder(), lambda: autoencoder(constrained=True), factorization, Tower]
)
def test_sparse_models_split_parameters(make, name, dense_cls, sparse_cls):
    """'adam': SparseAdam holds the sparse tables, Adam the rest ('adagrad': Adagrad both);
    every trainable parameter is in exactly one optimizer."""
    model = make()
    opts = build_optimizers(model, name, lr=0.01, weight_decay=0.1)
    assert type(opts.sparse) is sparse_cls
    sparse_ids = {id(model.get_parameter(n)) for n in sparse_parameter_names(model)}
    assert sorted(owners(opts.sparse)) == sorted(sparse_ids)
    assert all(g.get("weight_decay", 0) == 0 for g in opts.sparse.param_groups)
    dense_ids = [id(p) for p in model.parameters() if id(p) not in sparse_ids]
    if dense_ids:
        assert type(opts.dense) is dense_cls
    assert sorted(owners(opts.dense)) == sorted(dense_ids)
    everything = owners(opts.dense) + owners(opts.sparse)
    assert sorted(everything) == sorted(id(p) for p in model.parameters())
    assert opts.each() == [o for o in (opts.dense, opts.sparse) if o is not None]
    for opt in opts.each():
        assert all(group["lr"] == 0.01 for group in opt.param_groups)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_sparse_adagrad_steps_like_dense_adagrad():
    """'adagrad' on a sparse model moves the weights exactly as on the dense twin: rows outside
    the sampled items get a zero dense gradient, hence no Adagrad update either way."""
    models, opts = {}, {}
    for sparse in (True, False):
        models[sparse] = autoencoder(sparse=sparse)
        opts[sparse] = build_optimizers(models[sparse], "adagrad", lr=0.1, weight_decay=0.0)
        train_steps(models[sparse], opts[sparse], make_batches(seed=5, count=3))
    untouched = autoencoder(sparse=False)
    for (name, p), q, p0 in zip(
        models[True].named_parameters(), models[False].parameters(), untouched.parameters()
    ):
        torch.testing.assert_close(p, q, msg=name)
        assert not torch.equal(p, p0), name  # every parameter did move


def test_frozen_parameters_are_left_out():
    """Parameters with requires_grad=False are in no optimizer."""
    model = autoencoder(sparse=False)
    model.encoder_layers[0].weight.requires_grad_(False)
    opts = build_optimizers(model, "adam", lr=0.01, weight_decay=0.0)
    assert id(model.encoder_layers[0].weight) not in owners(opts.dense)
    assert len(owners(opts.dense)) == len(list(model.parameters())) - 1


def test_only_sparse_parameters():
    """A model of sparse tables only gets a SparseAdam and no dense optimizer."""
    opts = build_optimizers(nn.Embedding(5, 2, sparse=True), "adam", lr=0.1, weight_decay=0.0)
    assert opts.dense is None
    assert type(opts.sparse) is RowwiseSparseAdam


def decay_by_name(model, opts) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: group["weight_decay"]
        for group in opts.dense.param_groups
        for p in group["params"]
    }


def test_weight_decay_on_dense_weights_not_named_biases():
    """Dense weights get weight_decay; Linear biases and encoder_bias get 0."""
    model = autoencoder(sparse=False)
    decay = decay_by_name(model, build_optimizers(model, "adam", lr=0.01, weight_decay=0.1))
    assert decay["encoder_embedding.weight"] == 0.1
    assert decay["encoder_layers.0.weight"] == 0.1
    assert decay["decoder_layers.0.weight"] == 0.1
    assert decay["decoder_embedding.weight"] == 0.1
    assert decay["encoder_bias"] == 0.0
    assert decay["encoder_layers.0.bias"] == 0.0
    assert decay["decoder_layers.0.bias"] == 0.0


@pytest.mark.parametrize(
    "make, biases",
    [
        (lambda: autoencoder(sparse=False), ["decoder_bias.weight"]),
        (lambda: autoencoder(constrained=True, sparse=False), ["decoder_biases.0"]),
        (lambda: factorization(sparse=False), ["item_bias.weight"]),
    ],
)
def test_weight_decay_skips_every_bias(make, biases):
    """Every bias of the built-in models, including the item bias tables and the tied decoder's
    biases, gets weight_decay 0 (the docstring: "not to biases")."""
    model = make()
    decay = decay_by_name(model, build_optimizers(model, "adam", lr=0.01, weight_decay=0.1))
    assert {name: decay[name] for name in biases} == dict.fromkeys(biases, 0.0)


@pytest.mark.parametrize("make", [lambda: autoencoder(), factorization, Tower])
def test_rmsprop_refuses_sparse_models(make):
    """RMSprop cannot update sparse gradients: ValueError pointing to 'adam'."""
    with pytest.raises(ValueError, match=r"optimizer_type='rmsprop'.*'adam'"):
        build_optimizers(make(), "rmsprop", lr=0.01, weight_decay=0.0)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_dense_models_take_any_optimizer(name, cls):
    """A dense model gets the named optimizer and no sparse one, and it updates every weight."""
    model = autoencoder(sparse=False)
    opts = build_optimizers(model, name, lr=0.01, weight_decay=0.0)
    assert type(opts.dense) is cls
    assert opts.sparse is None
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.rand(3, NUM_ITEMS)).pow(2).sum().backward()
    opts.step()
    for old, p in zip(before, model.parameters()):
        assert not torch.equal(old, p)


def test_adamw_decays_the_weights_apart_from_the_gradient():
    """With no gradient from the loss, a step of 'adamw' multiplies each weight by exactly
    1 - lr * weight_decay and leaves the biases alone, where 'adam' (decay in the gradient)
    moves every decayed weight by about lr, whatever its size (Adam's first step is
    lr * sign(gradient))."""
    lr, decay = 0.01, 0.1
    for name in ("adam", "adamw"):
        model = autoencoder(sparse=False)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opts = build_optimizers(model, name, lr=lr, weight_decay=decay)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opts.step()
        for n, p in model.named_parameters():
            old = before[n]
            if "bias" in n:
                assert torch.equal(p, old), n
            elif name == "adamw":
                assert torch.equal(p, old * (1 - lr * decay)), n
            else:
                moved = old[old != 0] - p.detach()[old != 0]
                assert torch.allclose(moved, lr * old[old != 0].sign(), rtol=1e-3), n


def test_unknown_optimizer():
    """An unknown optimizer_type raises ValueError naming it."""
    with pytest.raises(ValueError, match="'lbfgs'"):
        build_optimizers(autoencoder(sparse=False), "lbfgs", lr=0.01, weight_decay=0.0)


def test_set_lr_and_zero_grad():
    """set_lr reaches every group of both optimizers; zero_grad clears every gradient."""
    model = autoencoder()
    opts = build_optimizers(model, "adam", lr=0.01, weight_decay=0.0)
    model(torch.rand(3, NUM_ITEMS)).sum().backward()
    opts.set_lr(dense=0.5, sparse=0.25)
    assert [g["lr"] for g in opts.dense.param_groups] == [0.5] * len(opts.dense.param_groups)
    assert [g["lr"] for g in opts.sparse.param_groups] == [0.25] * len(opts.sparse.param_groups)
    opts.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ lr_at_epoch


@pytest.mark.parametrize("epoch, expected", [(1, 1.0), (2, 0.1), (3, 0.1), (4, 0.01), (5, 0.01)])
def test_lr_at_epoch_milestones(epoch, expected):
    """lr is multiplied by 0.1 at each milestone reached (epochs are 1-based)."""
    assert lr_at_epoch(1.0, [2, 4], epoch) == pytest.approx(expected, rel=1e-12)
    assert lr_at_epoch(0.003, [4, 2], epoch) == pytest.approx(0.003 * expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("decay_sparse", [False, True])
def test_epoch_lrs_follow_recsys_recoders_scheduler(decay_sparse):
    """recsys-recoder 0.4.0 wraps only its dense optimizer in MultiStepLR(milestones, 0.1) and
    steps it at the start of every epoch; its SparseAdam keeps the initial lr. epoch_lrs gives
    the lr that scheduler sets, epoch by epoch, and the sparse lr unchanged unless asked."""
    milestones, lr = [3, 5], 0.002
    dense = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(dense, milestones=milestones, gamma=0.1)
    for epoch in range(1, 8):
        scheduler.step()  # recsys-recoder: the first thing of every epoch
        expected = dense.param_groups[0]["lr"]
        dense_lr, sparse_lr = epoch_lrs(lr, milestones, epoch, decay_sparse)
        assert dense_lr == pytest.approx(expected, rel=1e-12)
        assert sparse_lr == (dense_lr if decay_sparse else lr)


@pytest.mark.parametrize("milestones", [None, []])
def test_lr_without_milestones_is_constant(milestones):
    """No milestones: the learning rate never changes."""
    assert [lr_at_epoch(0.02, milestones, e) for e in range(1, 6)] == [0.02] * 5


# ------------------------------------------------------------------ state round trip


def test_state_dict_round_trip_reproduces_next_step():
    """Weights plus Optimizers.state_dict restored into a fresh model and optimizers give
    exactly the same next step; fresh optimizer states give a different one (control)."""
    model = autoencoder()
    opts = build_optimizers(model, "adam", lr=0.01, weight_decay=0.1)
    train_steps(model, opts, make_batches(seed=1, count=3))
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opts.state_dict())
    assert set(state) == {"dense", "sparse"}
    assert state["sparse"]["state"] and state["dense"]["state"]

    restored = autoencoder()
    restored.load_state_dict(weights)
    restored_opts = build_optimizers(restored, "adam", lr=0.01, weight_decay=0.1)
    restored_opts.load_state_dict(state)

    control = autoencoder()
    control.load_state_dict(weights)
    control_opts = build_optimizers(control, "adam", lr=0.01, weight_decay=0.1)

    next_batch = make_batches(seed=2, count=1)
    for m, o in ((model, opts), (restored, restored_opts), (control, control_opts)):
        train_steps(m, o, next_batch)
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, c) for p, c in zip(model.parameters(), control.parameters()))


def test_load_state_dict_skips_missing_parts():
    """A state without a sparse part (e.g. from a dense run) leaves SparseAdam fresh."""
    model = autoencoder()
    opts = build_optimizers(model, "adam", lr=0.01, weight_decay=0.0)
    opts.load_state_dict({"dense": None, "sparse": None})
    opts.load_state_dict({})
    assert opts.dense.state_dict()["state"] == {} and opts.sparse.state_dict()["state"] == {}
