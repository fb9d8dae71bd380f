"""The models in recoder_dist.nn, checked against hand-written forwards."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from recoder_dist.nn import DynamicAutoencoder, FactorizationModel, MatrixFactorization
from recoder_dist.nn.base import embedding_rows

NUM_ITEMS = 30
NUM_USERS = 12
EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 models: only rounding differences are allowed
ACTS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "none": lambda x: x}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrites every parameter (biases included, which start at zero) with random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def autoencoder(hidden, constrained=False, sparse=False, act="tanh", **kw) -> DynamicAutoencoder:
    torch.manual_seed(0)
    model = DynamicAutoencoder(
        hidden_layers=hidden,
        activation_type=act,
        is_constrained=constrained,
        sparse=sparse,
        **kw,
    )
    model.init_model(num_items=NUM_ITEMS)
    model.double()
    randomize(model)
    return model.eval()


def factorization(act="none", sparse=False, **kw) -> MatrixFactorization:
    torch.manual_seed(0)
    model = MatrixFactorization(embedding_size=6, activation_type=act, sparse=sparse, **kw)
    model.init_model(num_items=NUM_ITEMS, num_users=NUM_USERS)
    model.double()
    randomize(model)
    return model.eval()


def rows(num_rows=5, items=None, seed=1) -> torch.Tensor:
    """Non-negative interaction rows; zero outside ``items`` when given; no all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(num_rows, NUM_ITEMS, generator=gen, dtype=torch.float64)
    x = x * (torch.rand(num_rows, NUM_ITEMS, generator=gen, dtype=torch.float64) < 0.5)
    x[:, 0] += 0.25  # no row is all zeros
    if items is not None:
        mask = torch.zeros(NUM_ITEMS, dtype=torch.bool)
        mask[items] = True
        x[:, ~mask] = 0
        x[:, items[0]] += 0.25
    return x


def test_models_are_factorization_models():
    """Both built-in models implement the trainer's interface."""
    assert isinstance(DynamicAutoencoder([4]), FactorizationModel)
    assert isinstance(MatrixFactorization(4), FactorizationModel)


# ------------------------------------------------------------------ autoencoder forward


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_autoencoder_single_layer_matches_hand_forward(act, constrained, sparse):
    """hidden_layers=[h]: act(normalize(x) @ E_in + b) @ E_out.T + b_out, with E_out = E_in when
    tied; dropout and input noise are off in eval mode."""
    model = autoencoder([7], constrained, sparse, act, dropout_prob=0.3, noise_prob=0.4)
    x = rows()
    e_in = model.encoder_embedding.weight
    e_out = e_in if constrained else model.decoder_embedding.weight
    xn = x / x.pow(2).sum(1, keepdim=True).sqrt()
    expected = ACTS[act](xn @ e_in + model.encoder_bias) @ e_out.T + model.decoder_bias.weight[:, 0]
    with torch.no_grad():
        assert_close(model(x), expected.detach(), **EXACT)


@pytest.mark.parametrize("constrained", [False, True])
def test_autoencoder_two_layers_matches_hand_forward(constrained):
    """hidden_layers=[16, 8]: the decoder mirrors the encoder; tied decoders reuse W1.T."""
    model = autoencoder([16, 8], constrained, act="tanh")
    x = rows()
    e = model.encoder_embedding.weight
    w1, b1 = model.encoder_layers[0].weight, model.encoder_layers[0].bias
    h = torch.tanh(F.normalize(x, dim=1) @ e + model.encoder_bias)
    code = torch.tanh(h @ w1.T + b1)
    if constrained:
        h_dec = torch.tanh(code @ w1 + model.decoder_biases[0])
        e_out = e
    else:
        d1 = model.decoder_layers[0]
        h_dec = torch.tanh(code @ d1.weight.T + d1.bias)
        e_out = model.decoder_embedding.weight
    expected = h_dec @ e_out.T + model.decoder_bias.weight[:, 0]
    got = model(x)
    assert_close(got, expected, **EXACT)
    # Gradients too: a tied decoder must feed its gradient back into the encoder's weights.
    weights = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(3))
    params = list(model.parameters())
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    ref_grads = torch.autograd.grad((expected * weights).sum(), params, allow_unused=True)
    for p, g, r in zip(params, got_grads, ref_grads):
        assert r is not None, [n for n, q in model.named_parameters() if q is p]
        assert_close(g, r, **EXACT)


@pytest.mark.parametrize("hidden", [[8], [16, 8]])
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_autoencoder_on_item_subset_equals_full_columns(hidden, constrained, sparse):
    """F(X[:, I], I) == F(X)[:, I] when the rows of X are zero outside I (unsorted I)."""
    model = autoencoder(hidden, constrained, sparse)
    items = torch.tensor([17, 3, 25, 8, 11, 0, 29])
    x = rows(items=items)
    with torch.no_grad():
        full = model(x)
        subset = model(x[:, items], input_items=items, target_items=items)
    assert subset.shape == (5, len(items))
    assert_close(subset, full[:, items], **EXACT)


def test_autoencoder_subset_property_needs_zeros_outside_subset():
    """Control for the subset test: with an interaction outside I, the two sides differ."""
    model = autoencoder([8])
    items = torch.tensor([1, 2, 3])
    x = rows(items=items)
    x[:, 20] = 1.0
    with torch.no_grad():
        assert not torch.allclose(
            model(x[:, items], input_items=items, target_items=items), model(x)[:, items]
        )


@pytest.mark.parametrize("hidden", [[8], [16, 8]])
def test_autoencoder_target_items_select_output_columns(hidden):
    """target_items alone picks those columns of the full output, in the given order."""
    model = autoencoder(hidden)
    x = rows()
    targets = torch.tensor([4, 4, 28, 1])
    with torch.no_grad():
        assert_close(model(x, target_items=targets), model(x)[:, targets], **EXACT)


# ------------------------------------------------------------------ tied weights


@pytest.mark.parametrize(
    "hidden, constrained, expected",
    [
        # enc emb N*8 + enc bias 8 + dec bias N
        ([8], True, NUM_ITEMS * 8 + 8 + NUM_ITEMS),
        # + dec emb N*8
        ([8], False, NUM_ITEMS * 8 + 8 + NUM_ITEMS * 8 + NUM_ITEMS),
        # enc emb N*16 + 16 + Linear(16, 8) 136 + dec bias (16) + dec bias N
        ([16, 8], True, NUM_ITEMS * 16 + 16 + 136 + 16 + NUM_ITEMS),
        # + Linear(8, 16) 144 + dec emb N*16
        ([16, 8], False, NUM_ITEMS * 16 + 16 + 136 + 144 + NUM_ITEMS * 16 + NUM_ITEMS),
    ],
)
def test_autoencoder_parameter_count(hidden, constrained, expected):
    """The number of trainable scalars matches a hand count (tied weights counted once)."""
    model = autoencoder(hidden, constrained)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("hidden", [[8], [16, 8]])
def test_tied_autoencoder_has_no_decoder_weights(hidden):
    """is_constrained: the decoder owns only biases; its embedding is the encoder's."""
    model = autoencoder(hidden, constrained=True)
    assert model.decoder_embedding.weight is model.encoder_embedding.weight
    assert not hasattr(model, "decoder_layers")
    decoder_names = {n for n, _ in model.named_parameters() if n.startswith("decoder")}
    expected = {"decoder_bias.weight"} | {f"decoder_biases.{i}" for i in range(len(hidden) - 1)}
    assert decoder_names == expected
    all_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert "decoder_embedding.weight" in all_names  # the same tensor under a second name


@pytest.mark.parametrize("constrained", [False, True])
def test_encoder_rows_drive_tied_decoder_output(constrained):
    """Changing encoder rows of items absent from the input leaves the code unchanged, so the
    output moves only through the decoder: it does when tied, it does not when untied."""
    model = autoencoder([8], constrained)
    absent = torch.tensor([5, 6, 7])
    present = torch.tensor([i for i in range(NUM_ITEMS) if i not in (5, 6, 7)])
    x = rows(items=present)
    with torch.no_grad():
        before = model(x)
        code = torch.tanh(
            F.normalize(x, dim=1) @ model.encoder_embedding.weight + model.encoder_bias
        )
        model.encoder_embedding.weight[absent] += 1.0
        after = model(x)
        assert_close(after[:, present], before[:, present], **EXACT)
        if constrained:
            expected = (
                code @ model.encoder_embedding.weight[absent].T
                + model.decoder_bias.weight[absent, 0]
            )
            assert_close(after[:, absent], expected, **EXACT)
            assert (after[:, absent] - before[:, absent]).abs().min() > 1e-3
        else:
            assert_close(after[:, absent], before[:, absent], **EXACT)


# ------------------------------------------------------------------ sparse gradients

ITEM_ARGS = {
    "both": (torch.tensor([2, 9, 14]), torch.tensor([2, 9, 14])),
    "none": (None, None),
    "input_only": (torch.tensor([2, 9, 14]), None),
    "target_only": (None, torch.tensor([2, 9, 14])),
}


@pytest.mark.parametrize("which", list(ITEM_ARGS))
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_autoencoder_gradient_layout(which, constrained, sparse):
    """sparse=True: every embedding weight gets a sparse gradient, other parameters dense ones,
    whether or not items are given; sparse=False: all dense."""
    model = autoencoder([16, 8], constrained, sparse).train()
    input_items, target_items = ITEM_ARGS[which]
    x = rows() if input_items is None else rows()[:, input_items]
    model(x, input_items=input_items, target_items=target_items).sum().backward()
    embeddings = {"encoder_embedding.weight", "decoder_bias.weight"}
    if not constrained:
        embeddings.add("decoder_embedding.weight")
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.is_sparse == (sparse and name in embeddings), name


def test_sparse_gradient_equals_dense_gradient():
    """The sparse gradient holds the same values as the dense model's gradient."""
    grads = {}
    items = torch.tensor([2, 9, 14])
    for sparse in (False, True):
        model = autoencoder([8], sparse=sparse)
        model(rows()[:, items], input_items=items, target_items=items).pow(2).sum().backward()
        grads[sparse] = {n: p.grad for n, p in model.named_parameters()}
    for name, dense in grads[False].items():
        sparse = grads[True][name]
        assert_close(sparse.to_dense() if sparse.is_sparse else sparse, dense, **EXACT)


@pytest.mark.parametrize("target_items", [None, torch.tensor([0, 7, 7, 3])])
@pytest.mark.parametrize("sparse", [False, True])
def test_factorization_gradient_layout(target_items, sparse):
    """MF: user, item and bias embeddings get sparse gradients exactly when sparse=True."""
    model = factorization(sparse=sparse).train()
    users = torch.tensor([0, 4, 11])
    model(rows(3), input_users=users, target_items=target_items).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.is_sparse == sparse, name


# ------------------------------------------------------------------ matrix factorization


@pytest.mark.parametrize("act", ["none", "tanh", "relu"])
@pytest.mark.parametrize("sparse", [False, True])
def test_factorization_matches_hand_forward(act, sparse):
    """MF output is act(U[users]) @ V[items].T + bias[items] (the activation on users only, as
    in recsys-recoder 0.4.0); dropout is off in eval."""
    model = factorization(act, sparse, dropout_prob=0.5)
    users = torch.tensor([3, 0, 11, 3])
    items = torch.tensor([29, 1, 1, 17, 8])
    u, v, b = model.user_embedding.weight, model.item_embedding.weight, model.item_bias.weight
    f = ACTS[act]
    with torch.no_grad():
        expected = f(u[users]) @ v[items].T + b[items, 0]
        got = model(rows(4)[:, items], input_users=users, input_items=items, target_items=items)
        assert_close(got, expected, **EXACT)
        expected_all = f(u[users]) @ v.T + b[:, 0]
        assert_close(model(rows(4), input_users=users), expected_all, **EXACT)


def test_factorization_starts_as_recoder040():
    """Both tables from xavier_uniform_ (bound sqrt(6 / (rows + size))), the item bias zero."""
    model = MatrixFactorization(embedding_size=50)
    model.init_model(num_items=3000, num_users=1000)
    for table in (model.user_embedding.weight, model.item_embedding.weight):
        bound = (6 / (table.shape[0] + table.shape[1])) ** 0.5
        assert 0.99 * bound < table.abs().max().item() <= bound
        assert abs(table.std().item() - bound / 3**0.5) < 0.02 * bound  # uniform's std
    assert not model.item_bias.weight.any()


def test_factorization_output_by_naive_loop():
    """Each score is a plain dot product plus the item bias (a loop over users and items)."""
    model = factorization("none")
    users = torch.tensor([5, 2])
    with torch.no_grad():
        got = model(rows(2), input_users=users)
        u, v, b = model.user_embedding.weight, model.item_embedding.weight, model.item_bias.weight
        for r, user in enumerate(users.tolist()):
            for item in range(NUM_ITEMS):
                dot = sum(float(u[user, k]) * float(v[item, k]) for k in range(6))
                assert float(got[r, item]) == pytest.approx(dot + float(b[item, 0]), abs=1e-12)


def test_factorization_needs_users():
    """MF cannot score without input_users."""
    model = factorization()
    with pytest.raises(ValueError, match="input_users"):
        model(rows(2))


# ------------------------------------------------------------------ hyper-parameters


def test_autoencoder_model_params_round_trip():
    """model_params gives plain values; a model loading them builds an identical network."""
    kwargs = dict(
        hidden_layers=[16, 8],
        activation_type="relu",
        is_constrained=True,
        dropout_prob=0.25,
        noise_prob=0.5,
        sparse=True,
    )
    params = DynamicAutoencoder(**kwargs).model_params()
    assert params == kwargs
    other = DynamicAutoencoder()
    other.load_model_params(params)
    assert other.model_params() == kwargs
    a = autoencoder([16, 8], True, True, "relu", dropout_prob=0.25, noise_prob=0.5)
    b = DynamicAutoencoder()
    b.load_model_params(a.model_params())
    b.init_model(num_items=NUM_ITEMS)
    b.double().load_state_dict(a.state_dict())
    b.eval()
    with torch.no_grad():
        assert_close(b(rows()), a(rows()), rtol=0, atol=0)


def test_model_params_are_copies():
    """Mutating the returned hidden_layers does not change the model."""
    model = DynamicAutoencoder(hidden_layers=[6, 3])
    model.model_params()["hidden_layers"].append(99)
    assert model.model_params()["hidden_layers"] == [6, 3]


def test_factorization_model_params_round_trip():
    """MF hyper-parameters survive model_params -> load_model_params."""
    kwargs = dict(embedding_size=12, activation_type="tanh", dropout_prob=0.1, sparse=True)
    assert MatrixFactorization(**kwargs).model_params() == kwargs
    other = MatrixFactorization()
    other.load_model_params(kwargs)
    assert other.model_params() == kwargs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_layers=[8, 0]), r"hidden_layers.*\[8, 0\]"),
        (dict(hidden_layers=[]), "hidden_layers"),
        (dict(hidden_layers=[8], dropout_prob=1.0), "dropout_prob"),
        (dict(hidden_layers=[8], noise_prob=1.0), "noise_prob"),
        (dict(hidden_layers=[8], noise_prob=-0.1), "noise_prob"),
        (dict(hidden_layers=[8], activation_type="swish"), "swish"),
        (dict(hidden_layers=[8], noise_prob="0.5"), "noise_prob must be a number in"),
        (dict(hidden_layers=[8], noise_prob=None), "noise_prob must be a number in"),
        (dict(hidden_layers=[8], noise_prob=float("nan")), "noise_prob must be a number in"),
        (dict(hidden_layers=[8], activation_type=["tanh"]), r"unknown activation_type \['tanh'\]"),
    ],
)
def test_autoencoder_rejects_bad_params(kwargs, match):
    """Bad hyper-parameters raise ValueError naming the offending one."""
    with pytest.raises(ValueError, match=match):
        DynamicAutoencoder(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embedding_size=0), "embedding_size"),
        (dict(dropout_prob=1.0), "dropout_prob"),
        (dict(activation_type="gelu"), "gelu"),
        (dict(embedding_size=None), "embedding_size must be a whole number >= 1, got None"),
        (dict(embedding_size=2.9), "embedding_size must be a whole number >= 1, got 2.9"),
    ],
)
def test_factorization_rejects_bad_params(kwargs, match):
    """Bad MF hyper-parameters raise ValueError naming the offending one."""
    with pytest.raises(ValueError, match=match):
        MatrixFactorization(**kwargs)


def test_load_model_params_validates():
    """load_model_params refuses what the constructor refuses."""
    model = DynamicAutoencoder([8])
    params = dict(model.model_params(), dropout_prob=1.5)
    with pytest.raises(ValueError, match="dropout_prob"):
        model.load_model_params(params)


def test_init_model_needs_sizes():
    """init_model without num_items (autoencoder) or num_users (MF) raises ValueError."""
    with pytest.raises(ValueError, match="num_items"):
        DynamicAutoencoder([8]).init_model()
    with pytest.raises(ValueError, match="num_items"):
        DynamicAutoencoder([8]).init_model(num_items=0)
    with pytest.raises(ValueError, match="hidden_layers"):
        DynamicAutoencoder().init_model(num_items=5)
    with pytest.raises(ValueError, match="num_users"):
        MatrixFactorization(4).init_model(num_items=5)
    with pytest.raises(ValueError, match="num_items"):
        MatrixFactorization(4).init_model(num_users=5)


@pytest.mark.parametrize("items", [None, torch.tensor([2, 9, 14, 20])])
@pytest.mark.parametrize("constrained, sparse", [(False, False), (True, True)])
def test_autoencoder_sparse_input_equals_dense_input(items, constrained, sparse):
    """A sparse COO input (the trainer's CPU batches) gives the dense input's output and
    parameter gradients."""
    assert DynamicAutoencoder.accepts_sparse_input
    x = rows() if items is None else rows()[:, items]
    results = {}
    for layout, input in (("dense", x), ("sparse", x.to_sparse())):
        model = autoencoder([8, 4], constrained=constrained, sparse=sparse)
        output = model(input, input_items=items, target_items=items)
        output.pow(2).sum().backward()
        grads = {
            n: p.grad.to_dense() if p.grad.is_sparse else p.grad
            for n, p in model.named_parameters()
        }
        results[layout] = output, grads
    assert_close(results["sparse"][0], results["dense"][0], **EXACT)
    for name, grad in results["dense"][1].items():
        assert_close(results["sparse"][1][name], grad, **EXACT, msg=name)


def test_autoencoder_sparse_input_that_needs_a_gradient_is_densified():
    """An input that requires a gradient takes the dense path and receives its gradient (on
    its entries: a sparse tensor's gradient has no others)."""
    model = autoencoder([8])
    dense = rows().requires_grad_(True)
    model(dense).sum().backward()
    sparse = rows().to_sparse().requires_grad_(True)
    model(sparse).sum().backward()
    assert_close(sparse.grad.to_dense(), dense.grad * (rows() != 0), **EXACT)


@pytest.mark.parametrize("num_items", [7, 2**16 + 1])
def test_sparse_input_gradient_is_the_dense_products(num_items):
    """The sparse input's encoder gradient is the plain dense product's (the path of an input
    that itself requires a gradient), last columns included."""
    x = torch.zeros(3, num_items, dtype=torch.float64)
    x[[0, 0, 1, 2, 2], [0, num_items - 1, 5, num_items - 2, num_items - 1]] = 1.0
    scored = torch.tensor([0, 5, num_items - 1])
    grads = {}
    for layout, input in (("dense", x.clone().requires_grad_(True)), ("sparse", x.to_sparse())):
        torch.manual_seed(0)
        model = DynamicAutoencoder([2])
        model.init_model(num_items=num_items)
        model.double()
        model(input, target_items=scored).pow(2).sum().backward()
        grads[layout] = model.encoder_embedding.weight.grad
    assert grads["dense"][num_items - 1].abs().sum() > 0
    assert_close(grads["sparse"], grads["dense"], **EXACT)


@pytest.mark.parametrize("noise_prob", [0.25, 0.5])
def test_sparse_input_noise_drops_entries_at_the_rate_and_rescales_the_rest(noise_prob):
    """In training, input noise on the sparse path zeroes each stored entry with probability
    ``noise_prob`` and divides the kept ones by ``1 - noise_prob``: read back through an
    identity encoder and a linear activation, the code is the normalized row with some entries
    dropped. 12,000 entries: the kept fraction is within 5 standard deviations of 1 - p."""
    num_users, num_items = 400, 60
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(num_users, num_items, generator=gen, dtype=torch.float64) < 0.5).double()
    x[:, 0] = 1.0  # no empty row
    model = DynamicAutoencoder([num_items], activation_type="none", noise_prob=noise_prob)
    model.init_model(num_items=num_items)
    model.double()
    with torch.no_grad():
        model.encoder_embedding.weight.copy_(torch.eye(num_items, dtype=torch.float64))
    codes = []
    model.act.register_forward_hook(lambda module, args, out: codes.append(args[0]))
    model.train()(x.to_sparse())
    code = codes[0]  # act's input: noise(normalize(x)) @ I + bias, the bias zero
    normalized = F.normalize(x, p=2, dim=1)
    kept = code != 0
    assert not kept[x == 0].any()
    assert_close(code[kept], normalized[kept] / (1 - noise_prob), **EXACT)
    entries = int((x != 0).sum())
    rate, spread = (1 - noise_prob), (noise_prob * (1 - noise_prob) / entries) ** 0.5
    assert abs(int(kept.sum()) / entries - rate) < 5 * spread


@pytest.mark.parametrize(
    "items",
    [
        torch.arange(NUM_ITEMS),  # every row
        torch.arange(1, NUM_ITEMS),  # every row but the first
        torch.tensor([0, 2, 2, *range(3, NUM_ITEMS)]),  # a repeat
        torch.tensor([*range(NUM_ITEMS - 2), NUM_ITEMS - 1, NUM_ITEMS - 2]),  # out of order
        None,
    ],
)
def test_embedding_rows_of_a_sparse_table_give_the_lookups_rows_and_sparse_gradient(items):
    """``embedding_rows`` of a sparse table gives what the lookup ``embedding(items)`` gives,
    forward and backward (a sparse gradient); without gradients, all rows (None) are the
    weight's memory, not a gathered copy."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(NUM_ITEMS, 4, sparse=True).double()
    lookup = torch.arange(NUM_ITEMS) if items is None else items
    scale = torch.randn(len(lookup), 4, dtype=torch.float64)
    grads = {}
    for way in ("embedding_rows", "lookup"):
        table.weight.grad = None
        rows = embedding_rows(table, items) if way == "embedding_rows" else table(lookup)
        (rows * scale).sum().backward()
        assert table.weight.grad.is_sparse, way
        grads[way] = table.weight.grad.to_dense()
        if way == "embedding_rows":
            assert_close(rows, table(lookup), **EXACT)
    assert_close(grads["embedding_rows"], grads["lookup"], **EXACT)
    with torch.no_grad():
        assert embedding_rows(table, None).data_ptr() == table.weight.data_ptr()


# ------------------------------------------------ recsys-recoder 0.4.0's attribute names

# Our parameter names, written out: 0.4.0's aliases must not add any.
AUTOENCODER_STATE_KEYS = {
    (False, 1): ["encoder_bias", "encoder_embedding.weight", "decoder_embedding.weight"],
    (True, 1): ["encoder_bias", "encoder_embedding.weight", "decoder_embedding.weight"],
    (False, 2): [
        "encoder_bias",
        "encoder_embedding.weight",
        "encoder_layers.0.weight",
        "encoder_layers.0.bias",
        "decoder_layers.0.weight",
        "decoder_layers.0.bias",
        "decoder_embedding.weight",
    ],
    (True, 2): [
        "encoder_bias",
        "encoder_embedding.weight",
        "encoder_layers.0.weight",
        "encoder_layers.0.bias",
        "decoder_biases.0",
        "decoder_embedding.weight",
    ],
}


@pytest.mark.parametrize("hidden", [[8], [16, 8]])
@pytest.mark.parametrize("constrained", [False, True])
def test_autoencoder_aliases_are_our_modules_and_register_nothing(hidden, constrained):
    """en/de_embedding_layer, encoding_layers and (unconstrained) decoding_layers are our
    modules; the state_dict and named parameters/modules keep our names only."""
    model = autoencoder(hidden, constrained)
    assert model.en_embedding_layer is model.encoder_embedding
    assert model.de_embedding_layer is model.decoder_embedding
    assert model.encoding_layers is model.encoder_layers
    if not constrained:
        assert model.decoding_layers is model.decoder_layers
    expected = AUTOENCODER_STATE_KEYS[constrained, len(hidden)] + ["decoder_bias.weight"]
    assert sorted(model.state_dict()) == sorted(expected)
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert sorted(all_names) == sorted(expected)
    aliases = ("en_embedding", "de_embedding", "encoding_layers", "decoding_layers")
    module_names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    assert not [n for n in module_names + all_names if n.startswith(aliases)]
    for alias in aliases:  # read-only: nn.Module would otherwise register a Module value
        with pytest.raises(AttributeError, match="read-only name of"):
            setattr(model, alias + "_layer" if alias.endswith("embedding") else alias, model)
    assert sorted(model.state_dict()) == sorted(expected)


@pytest.mark.parametrize("hidden", [[8], [16, 8], [16, 8, 4]])
@pytest.mark.parametrize("constrained", [False, True])
def test_forward_through_the_aliases_is_the_model(hidden, constrained):
    """0.4.0's forward written with 0.4.0's names (layers applied one by one, the activation
    after each) gives our model's output: the tied views of a constrained decoder too."""
    model = autoencoder(hidden, constrained, act="tanh")
    x = rows()
    with torch.no_grad():
        z = torch.tanh(F.normalize(x, dim=1) @ model.en_embedding_layer.weight + model.encoder_bias)
        for layer in model.encoding_layers:
            z = torch.tanh(layer(z))
        for layer in model.decoding_layers:
            z = torch.tanh(layer(z))
        expected = z @ model.de_embedding_layer.weight.T + model.decoder_bias.weight[:, 0]
        assert_close(model(x), expected, **EXACT)


def test_constrained_decoding_layers_are_views_of_our_parameters():
    """With is_constrained the decoding layers' weights are the encoder's transposed and
    their biases our decoder_biases (the same Parameters: an update shows through)."""
    model = autoencoder([16, 8, 4], constrained=True)
    layers = model.decoding_layers
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        encoder_layer = model.encoder_layers[-1 - i]
        assert layer.bias is model.decoder_biases[i]
        assert torch.equal(layer.weight, encoder_layer.weight.t())
        assert (layer.in_features, layer.out_features) == tuple(layer.weight.T.shape)
        assert not list(layer.children())  # the encoder layer is not a submodule of the view
    assert [tuple(layer.weight.shape) for layer in layers] == [(8, 4), (16, 8)]
    with torch.no_grad():
        model.encoder_layers[0].weight.add_(1.0)
    assert torch.equal(layers[1].weight, model.encoder_layers[0].weight.t())


def test_factorization_aliases():
    """user/item_embedding_layer are our embeddings and add no parameter name."""
    model = factorization()
    assert model.user_embedding_layer is model.user_embedding
    assert model.item_embedding_layer is model.item_embedding
    expected = ["item_bias.weight", "item_embedding.weight", "user_embedding.weight"]
    assert sorted(model.state_dict()) == expected
    assert sorted(n for n, _ in model.named_parameters(remove_duplicate=False)) == expected
    for alias in ("user_embedding_layer", "item_embedding_layer"):
        with pytest.raises(AttributeError, match="read-only name of"):
            setattr(model, alias, torch.nn.Embedding(3, 3))
    assert sorted(model.state_dict()) == expected
