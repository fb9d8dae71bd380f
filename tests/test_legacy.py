"""recsys-recoder 0.4.0 model files: imported models score as 0.4.0's did, training continues,
and files that would run code are refused.

The files under tests/data/recoder040/ were trained one epoch and saved by recsys-recoder 0.4.0
itself, with 0.4.0's outputs beside them (tests/data/make_recoder040_fixtures.py made both).
"""

from __future__ import annotations

import logging
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.testing import assert_close
from torch.torch_version import TorchVersion

from recoder_dist.data import RecommendationDataset
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder, MatrixFactorization
from recoder_dist.training.snapshot import load_snapshot

DATA = Path(__file__).parent / "data" / "recoder040"
NUM_USERS, NUM_ITEMS = 20, 30
SCORES = dict(rtol=1e-5, atol=1e-6)  # float32, summed in another order than 0.4.0's

pytestmark = pytest.mark.skipif(
    TorchVersion(torch.__version__) < (2, 6), reason="reading 0.4.0 files needs torch >= 2.6"
)

# file -> (our model, 0.4.0's model_params, optimizer_type, loss, loss_params)
FILES = {
    "ae_8": (
        DynamicAutoencoder,
        dict(hidden_layers=[8], activation_type="tanh", is_constrained=False, noise_prob=0.2),
        "sgd",
        "mse",
        {"confidence": 2.0},
    ),
    "ae_8_constrained": (
        DynamicAutoencoder,
        dict(hidden_layers=[8], activation_type="sigmoid", is_constrained=True),
        "adam",
        "logistic",
        {},
    ),
    "ae_8_4": (
        DynamicAutoencoder,
        dict(hidden_layers=[8, 4], activation_type="tanh", is_constrained=False, dropout_prob=0.3),
        "adam",
        "logloss",
        {},
    ),
    "ae_8_4_constrained_sparse": (
        DynamicAutoencoder,
        dict(hidden_layers=[8, 4], activation_type="relu", is_constrained=True),
        "adam",
        "logloss",
        {},
    ),
    "mf_4": (
        MatrixFactorization,
        dict(embedding_size=4, activation_type="none", dropout_prob=0.1),
        "adam",
        "logistic",
        {},
    ),
    # The activation applies to the user embeddings only, in 0.4.0 and here.
    "mf_4_tanh": (
        MatrixFactorization,
        dict(embedding_size=4, activation_type="tanh", dropout_prob=0.0),
        "sgd",
        "mse",
        {},
    ),
}


def outputs(name: str) -> dict:
    """0.4.0's saved input rows and its model's outputs on them."""
    with np.load(DATA / f"{name}.npz") as saved:
        return {key: saved[key] for key in saved.files}


def imported(name: str, sparse: bool = False) -> Recoder:
    model_class = FILES[name][0]
    recoder = Recoder(model_class(sparse=sparse), num_workers=0, seed=0)
    recoder.init_from_model_file(str(DATA / f"{name}.model"))
    return recoder


@pytest.mark.parametrize("name", FILES)
def test_imported_model_scores_as_recoder040(name):
    """Our model, loaded from 0.4.0's file, gives 0.4.0's own outputs: on every item, on a
    subset of items (input and target items), and through Recoder.predict."""
    recoder = imported(name)
    saved = outputs(name)
    model = recoder.model.eval()
    dense = torch.from_numpy(saved["input"])
    users = torch.arange(NUM_USERS)
    items = torch.from_numpy(saved["items"])
    with torch.no_grad():
        assert_close(model(dense, input_users=users), torch.from_numpy(saved["output"]), **SCORES)
        subset = model(dense[:, items], input_users=users, input_items=items, target_items=items)
        assert_close(subset, torch.from_numpy(saved["output_items"]), **SCORES)
    predicted = recoder.predict(sp.csr_matrix(saved["input"]))
    assert_close(torch.from_numpy(predicted), torch.from_numpy(saved["output"]), **SCORES)


@pytest.mark.parametrize("name", FILES)
def test_imported_hyper_parameters_epoch_and_sizes(name, caplog):
    """Epoch, sizes, model_params (ours: with the model's own sparse), optimizer and loss
    come through; the optimizer states do not, and one warning says so."""
    model_class, params, optimizer_type, loss, loss_params = FILES[name]
    with caplog.at_level(logging.WARNING, logger="recoder_dist"):
        recoder = imported(name, sparse=True)
    assert recoder.current_epoch == 1
    assert (recoder.num_items, recoder.num_users) == (NUM_ITEMS, NUM_USERS)
    assert recoder.model.model_params() == {**model_class(**params).model_params(), "sparse": True}
    assert (recoder.optimizer_type, recoder.loss, recoder.loss_params) == (
        optimizer_type,
        loss,
        loss_params,
    )
    assert recoder._optimizer_state == {}
    warnings = [r for r in caplog.records if "optimizer states are not imported" in r.message]
    assert len(warnings) == 1 and "after epoch 1" in warnings[0].getMessage()


def test_constrained_import_ties_the_decoder():
    """A constrained 0.4.0 file gives one embedding (its two copies in the file were one
    parameter) and decoder biases only; 0.4.0's item bias vector is our bias column."""
    model = imported("ae_8_4_constrained_sparse").model
    assert model.decoder_embedding is model.encoder_embedding
    assert not hasattr(model, "decoder_layers")
    assert model.decoder_bias.weight.shape == (NUM_ITEMS, 1)
    assert model.decoding_layers[0].bias is model.decoder_biases[0]


@pytest.mark.parametrize(("name", "sparse"), [("ae_8_4_constrained_sparse", True), ("mf_4", False)])
def test_training_continues_from_the_file_epoch(ray_session, tmp_path, name, sparse):
    """train() after the import runs epoch 2 with fresh optimizer states, changes the
    weights, and save_state writes our own snapshot of epoch 2."""
    recoder = imported(name, sparse=sparse)
    before = {k: v.clone() for k, v in recoder.model.state_dict().items()}
    dataset = RecommendationDataset(sp.csr_matrix(outputs(name)["input"]))
    history = recoder.train(dataset, batch_size=5, num_epochs=1, lr=0.01)
    assert [h["epoch"] for h in history] == [2]
    assert recoder.current_epoch == 2
    after = recoder.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    snapshot = load_snapshot(recoder.save_state(str(tmp_path / name)))
    assert snapshot.epoch == 2 and snapshot.optimizer_state
    assert snapshot.model_params == recoder.model.model_params()


def test_model_class_must_match():
    """An autoencoder file does not load into a MatrixFactorization Recoder, nor back."""
    with pytest.raises(ValueError, match="holds a recoder_dist.nn.autoencoder.DynamicAutoencoder"):
        Recoder(MatrixFactorization(), num_workers=0).init_from_model_file(str(DATA / "ae_8.model"))
    with pytest.raises(ValueError, match="holds a recoder_dist.nn.factorization.Matrix"):
        Recoder(DynamicAutoencoder(), num_workers=0).init_from_model_file(str(DATA / "mf_4.model"))


def test_sizes_must_fit_the_recoder():
    """A Recoder built for other sizes refuses the file, as it refuses our snapshots."""
    recoder = Recoder(DynamicAutoencoder(), num_items=40, num_workers=0)
    with pytest.raises(ValueError, match="trained with num_items=30, this Recoder has 40"):
        recoder.init_from_model_file(str(DATA / "ae_8.model"))


# ------------------------------------------------------------------ crafted files


def numpy_globals() -> list:
    """What the fixtures' numpy arrays unpickle through (written under numpy 2)."""
    core = getattr(np, "_core", None) or np.core
    return [
        (core.multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.int64)),
    ]


def payload(name: str) -> dict:
    """A fixture's dict, read safely, to craft variants of it."""
    with torch.serialization.safe_globals(numpy_globals()):
        return torch.load(DATA / f"{name}.model", weights_only=True)


def load_into_autoencoder(path) -> Recoder:
    recoder = Recoder(DynamicAutoencoder(), num_workers=0)
    recoder.init_from_model_file(str(path))
    return recoder


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.mark.parametrize("where", ["items", "loss_params", "model_params", "whole_file"])
def test_pickled_code_is_refused_and_not_run(tmp_path, where):
    """A 0.4.0-shaped file (or a bare pickle) that would run code when unpickled raises
    ValueError saying how to convert a trusted file, and the code does not run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.model"
    if where == "whole_file":
        with open(path, "wb") as f:
            pickle.dump(Exploit(str(marker)), f, protocol=2)
    else:
        state = payload("ae_8")
        if where == "model_params":
            state["model_params"]["hidden_layers"] = Exploit(str(marker))
        else:
            state[where] = Exploit(str(marker))
        torch.save(state, path)
    with pytest.raises(ValueError, match=r"evil.model cannot be read safely: .*posix.system") as e:
        load_into_autoencoder(path)
    assert "convert it once" in str(e.value) and "add_safe_globals" not in str(e.value)
    assert not marker.exists()


def test_numpy_beyond_integer_arrays_is_refused_and_the_hint_converts_it(tmp_path):
    """Only integer arrays' globals are allowed: a numpy scalar or a float array is refused
    with the conversion hint; that conversion, run on a trusted file, makes it loadable."""
    scalar, floats = payload("ae_8"), payload("ae_8")
    scalar["num_items"] = np.int64(30)
    floats["users"] = floats["users"].astype(np.float64)
    for state, reason in ((scalar, "GLOBAL numpy.*scalar"), (floats, "got <class .*Float64")):
        torch.save(state, tmp_path / "numpy.model")
        with pytest.raises(ValueError, match=f"cannot be read safely: .*{reason}") as e:
            load_into_autoencoder(tmp_path / "numpy.model")
        assert "convert it once" in str(e.value) and "add_safe_globals" not in str(e.value)

    # The hint's conversion, as its message writes it. weights_only=False: this test's own file.
    state = torch.load(tmp_path / "numpy.model", weights_only=False)
    state = {
        k: v.tolist() if isinstance(v, (np.ndarray, np.generic)) else v for k, v in state.items()
    }
    torch.save(state, tmp_path / "converted.model")
    recoder = load_into_autoencoder(tmp_path / "converted.model")
    assert recoder.num_items == NUM_ITEMS and recoder.current_epoch == 1


def differing_duplicate(state: dict) -> None:
    """A duplicate that differs from its parameter (a copy: in the file they share storage)."""
    duplicate = "_DynamicAutoencoder__en_linear_embedding_layer.embedding_layer.weight"
    state["model"][duplicate] = state["model"]["en_embedding_layer.weight"] + 1


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(recoder_version="0.3.0"), "recsys-recoder '0.3.0'.*files of 0.4.0"),
        (lambda s: s["model"].pop("de_embedding_layer.weight"), r"missing \['de_embedding"),
        (lambda s: s["model"].update(extra=torch.ones(1)), r"unexpected \['extra'\]"),
        (differing_duplicate, "embedding_layer.weight differs from en_embedding_layer.weight"),
        (lambda s: s["model_params"].pop("noise_prob"), r"model_params lack \['noise_prob'\]"),
        (lambda s: s["model_params"].update(hidden_layers=[6]), "does not fit the model"),
        (lambda s: s.update(last_epoch=-1), "last_epoch must be an int >= 0"),
        (lambda s: s.update(loss="hinge"), "unknown loss 'hinge'"),
        (lambda s: s.update(optimizer_type="lbfgs"), "unknown optimizer_type 'lbfgs'"),
        (lambda s: s.update(model_params={"rank": 3}), "only 0.4.0's DynamicAutoencoder"),
    ],
    ids=[
        "version",
        "missing",
        "unknown",
        "duplicate_differs",
        "params",
        "shapes",
        "epoch",
        "loss",
        "optimizer",
        "other_model",
    ],
)
def test_inconsistent_files_name_the_problem(tmp_path, edit, match):
    """Edited 0.4.0 files raise ValueError naming what does not fit."""
    state = payload("ae_8")
    edit(state)
    path = tmp_path / "edited.model"
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        load_into_autoencoder(path)


def test_other_files_keep_the_snapshot_errors(tmp_path):
    """Files that are neither kind get our snapshot's error, not the 0.4.0 reader's."""
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a snapshot at all")
    with pytest.raises(ValueError, match="garbage.model is not a readable snapshot"):
        load_into_autoencoder(garbage)
    plain = tmp_path / "plain.model"
    torch.save({"weights": torch.ones(2)}, plain)
    with pytest.raises(ValueError, match="plain.model is not a recoder_dist snapshot"):
        load_into_autoencoder(plain)
    with pytest.raises(FileNotFoundError, match="no snapshot file"):
        load_into_autoencoder(tmp_path / "missing.model")
