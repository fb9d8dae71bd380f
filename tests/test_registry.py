"""The model registry: models found by name, built from the settings they take, and the
command line's and the sweep's use of it."""

from __future__ import annotations

import pytest
import torch

from recoder_dist.cli import _model, _with_config
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization, MultVAE, registry
from recoder_dist.nn.base import FactorizationModel, sharded_class
from recoder_dist.sharded.autoencoder import ShardedAutoencoder
from recoder_dist.sharded.factorization import ShardedFactorization


def test_models_are_found_by_their_name_and_their_class_name():
    assert registry.names()[:2] == ["autoencoder", "mf"]
    assert registry.model_class("autoencoder") is DynamicAutoencoder
    assert registry.model_class("MatrixFactorization") is MatrixFactorization
    # as a snapshot names its class
    assert (
        registry.model_class("recoder_dist.nn.autoencoder.DynamicAutoencoder") is DynamicAutoencoder
    )
    with pytest.raises(ValueError, match=r"unknown model 'svd'; the registered models are "):
        registry.model_class("svd")


def test_a_name_is_registered_once():
    class Other(FactorizationModel):
        pass

    with pytest.raises(ValueError, match="model name 'mf' is taken by MatrixFactorization"):
        registry.register("mf")(Other)
    assert registry.model_class("mf") is MatrixFactorization


def test_build_passes_the_settings_a_model_takes():
    settings = dict(hidden_layers=[8], embedding_size=4, noise_prob=0.1, sparse=True)
    model = registry.build("autoencoder", settings)
    assert model.model_params()["hidden_layers"] == [8] and model.noise_prob == 0.1
    mf = registry.build("mf", settings)
    assert mf.embedding_size == 4 and mf.sparse
    with pytest.raises(ValueError, match="MatrixFactorization \\(mf\\) has no setting hidden"):
        registry.build("mf", {}, strict={"hidden_layers": [8]})
    with pytest.raises(ValueError, match="dropout_prob must be a number in"):
        registry.build("mf", {}, strict={"dropout_prob": 2.0})


def test_only_the_class_that_names_a_sharded_form_is_sharded():
    class Tweaked(DynamicAutoencoder):
        def forward(self, input, *args, **kwargs):
            return 2 * super().forward(input, *args, **kwargs)

    assert sharded_class(DynamicAutoencoder([4])) is ShardedAutoencoder
    assert sharded_class(MatrixFactorization()) is ShardedFactorization
    assert sharded_class(Tweaked([4])) is None


def _cli_model(*flags):
    args = _with_config(["train", "--data", "x", "--checkpoint-dir", "y", *flags])
    return _model(args)


def test_the_command_line_builds_any_registered_model():
    model = _cli_model("--model", "mf", "--embedding-size", "16", "--dropout", "0.25")
    assert type(model) is MatrixFactorization
    assert (model.embedding_size, model.dropout_prob) == (16, 0.25)
    model = _cli_model("--hidden", "32", "16", "--model-param", "is_constrained=true")
    assert type(model) is DynamicAutoencoder
    assert model.hidden_layers == [32, 16] and model.is_constrained
    with pytest.raises(ValueError, match="has no setting anneal_cap"):
        _cli_model("--model-param", "anneal_cap=0.2")
    vae = _cli_model("--model", "vae", "--hidden", "16", "8", "--model-param", "anneal_cap=0.5")
    assert type(vae) is MultVAE and vae.model_params() == dict(
        hidden_layers=[16, 8],
        activation_type="tanh",
        noise_prob=0.5,
        anneal_cap=0.5,
        anneal_steps=200_000,
        sparse=True,
    )
    torch.manual_seed(0)
    model.init_model(num_items=10)  # a model the trainer can use
