"""recsys-recoder 0.4.0 model files: reading them safely and converting them to our Snapshot.

0.4.0's ``Recoder.save_state`` wrote ``torch.save`` of a dict: ``recoder_version``,
``model_params``, ``last_epoch``, ``model`` (the state dict, with 0.4.0's parameter names and
duplicates of shared parameters), ``optimizer_type``, ``optimizer``, ``items`` and ``users``
(numpy arrays), ``num_items``, ``num_users`` and, for a named loss, ``loss`` and
``loss_params``. The file is read with ``torch.load(weights_only=True)``, which runs no code;
the numpy arrays need numpy's array and dtype reconstruction and the integer dtypes' classes,
allowed for this one read only.
"""

from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import torch
from torch.torch_version import TorchVersion

from recoder_dist.losses import build_loss
from recoder_dist.nn.autoencoder import DynamicAutoencoder
from recoder_dist.nn.factorization import MatrixFactorization
from recoder_dist.training.snapshot import Snapshot
from recoder_dist.training.worker.optimizers import check_optimizer_type

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

logger = logging.getLogger(__name__)

VERSION = "0.4.0"

# What the numpy arrays of a 0.4.0 file unpickle through, named as both numpy majors write
# them (a file written under numpy 1 names numpy.core, one written under numpy 2 numpy._core).
# items and users are integer ids: their dtypes' classes are allowed, no other.
_NUMPY_GLOBALS = [
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.int64)),
    type(np.dtype(np.int32)),
]

_CONVERT_HINT = (
    "If it is a recsys-recoder 0.4.0 model file that you trust, convert it once, in a Python "
    "where recsys-recoder 0.4.0 is installed: `import numpy, torch; state = torch.load(path, "
    "weights_only=False); state = {k: v.tolist() if isinstance(v, (numpy.ndarray, "
    "numpy.generic)) else v for k, v in state.items()}; torch.save(state, new_path)` (convert "
    "any other numpy or custom value the same way), then load new_path."
)

# 0.4.0's DynamicAutoencoder held its input and output layers in name-mangled attributes.
_ENCODER = "_DynamicAutoencoder__en_linear_embedding_layer"
_DECODER = "_DynamicAutoencoder__de_linear_embedding_layer"


class NotARecoder040File(ValueError):
    """The file was read, or failed to read, as something other than a 0.4.0 model file."""


def load_recoder040_file(path: str | os.PathLike, *, sparse: bool = False) -> Snapshot:
    """Reads a model file written by recsys-recoder 0.4.0's ``Recoder.save_state`` and returns
    it as our :class:`~recoder_dist.training.snapshot.Snapshot`: our model class, our
    ``model_params`` keys and our parameter names and shapes.

    Converted: ``DynamicAutoencoder`` (constrained or not, any number of hidden layers; 0.4.0's
    decoder item bias, a vector of ``num_items``, becomes our ``decoder_bias.weight`` column)
    and ``MatrixFactorization`` (0.4.0's ``bias`` becomes our ``item_bias.weight`` column). The
    epoch is 0.4.0's ``last_epoch``, the epochs trained, so that ``train`` continues after it
    (0.4.0 itself, resuming, trained epoch ``last_epoch`` again); ``optimizer_type``, ``loss``
    and ``loss_params`` come through (no ``loss`` when 0.4.0 trained with a loss Module: the
    Recoder keeps its own).

    Optimizer states are not imported: 0.4.0 did not save its SparseAdam's state, and keyed
    its Adam/SGD state by parameter order in its own parameter layout. The snapshot's
    ``optimizer_state`` is empty (one warning is logged), and training continues with fresh
    optimizer states at the file's epoch.

    Args:
        path: the ``.model`` file.
        sparse: our models' ``sparse`` hyper-parameter, which 0.4.0 files do not record (its
            models' ``sparse`` was not saved): the setting of the model being loaded into.

    Raises:
        FileNotFoundError: no file at ``path``.
        NotARecoder040File: the file is not a 0.4.0 model file (it may be a corrupt one).
        ValueError: the file holds something that ``torch.load(weights_only=True)`` refuses
            (the message says how to convert a trusted file), or its model cannot be converted
            faithfully: another model class, parameters that are missing, unknown or
            inconsistent.
    """
    path = os.fspath(path)
    state = _read(path)
    params = state["model_params"]
    if not isinstance(params, dict):
        raise ValueError(f"{path}: model_params is a {type(params).__name__}, not a dict")
    if "hidden_layers" in params:
        model_class = _class_name(DynamicAutoencoder)
        model_params, model_state = _autoencoder(path, params, state["model"])
        num_items = _count(path, state, "num_items", model_state["decoder_bias.weight"])
        num_users = _count(path, state, "num_users", None)
    elif "embedding_size" in params:
        model_class = _class_name(MatrixFactorization)
        model_params, model_state = _factorization(path, params, state["model"])
        num_items = _count(path, state, "num_items", model_state["item_bias.weight"])
        num_users = _count(path, state, "num_users", model_state["user_embedding.weight"])
    else:
        raise ValueError(
            f"{path} holds a 0.4.0 model with model_params {sorted(params)}: only 0.4.0's "
            "DynamicAutoencoder and MatrixFactorization convert"
        )
    model_params["sparse"] = bool(sparse)

    epoch = state["last_epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{path}: last_epoch must be an int >= 0, got {epoch!r}")
    optimizer_type = state.get("optimizer_type")
    if optimizer_type is not None:
        check_optimizer_type(optimizer_type)
    loss, loss_params = state.get("loss"), dict(state.get("loss_params") or {})
    if loss is not None:
        build_loss(loss, loss_params)  # a ValueError naming the loss if ours does not take it
    logger.warning(
        "%s: recsys-recoder 0.4.0 optimizer states are not imported; training continues after "
        "epoch %d with fresh optimizer states",
        path,
        epoch,
    )
    return Snapshot(
        model_class=model_class,
        model_params=model_params,
        model_state=model_state,
        num_items=num_items,
        num_users=num_users,
        epoch=epoch,
        optimizer_type=optimizer_type,
        optimizer_state={},
        loss=loss,
        loss_params=loss_params if loss is not None else {},
    )


def _read(path: str) -> dict:
    """The file's dict, read with ``weights_only=True`` and the numpy globals allowed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    if TorchVersion(torch.__version__) < (2, 6):
        # The scoped allowlist (safe_globals) came in 2.5, its named entries, which let a file
        # written under numpy 1 be read under numpy 2 and back, in 2.6.
        raise ValueError(
            f"reading recsys-recoder 0.4.0 files needs torch >= 2.6; this is {torch.__version__}"
        )
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(str(e))
        if reason is None:
            raise NotARecoder040File(f"{path} is not readable: {_first_line(e)}") from None
        raise ValueError(
            f"{path} cannot be read safely: {reason}. torch.load(weights_only=True) reads "
            f"tensors, plain data and integer numpy arrays, and runs no code. {_CONVERT_HINT}"
        ) from None
    except Exception as e:  # a corrupt file fails anywhere in the unpickler
        raise NotARecoder040File(f"{path} is not readable: {_first_line(e)}") from None
    if not isinstance(state, dict) or "recoder_version" not in state:
        raise NotARecoder040File(f"{path} is not a recsys-recoder model file")
    if state["recoder_version"] != VERSION:
        raise ValueError(
            f"{path} was written by recsys-recoder {state['recoder_version']!r}; "
            f"this reads files of {VERSION}"
        )
    missing = [key for key in ("model_params", "last_epoch", "model") if key not in state]
    if missing:
        raise ValueError(f"{path} is a recsys-recoder 0.4.0 file without {missing}")
    return state


def _weights_only_reason(message: str) -> str | None:
    """The first sentence of torch's reason for refusing a global or a type that
    ``weights_only`` does not allow (not the rest, which suggests allowing it), or None when
    the error is of another kind (a corrupt file).

    Read from torch's message: should its wording change, the file is still refused, only
    with the snapshot reader's error instead of the conversion hint.
    """
    if "Weights only load failed" not in message:
        return None
    for line in message.splitlines():
        reason = line.replace("WeightsUnpickler error:", "").strip()
        if "GLOBAL" in reason or "allowlisted" in reason:
            return reason.split(". ", 1)[0].rstrip(".").replace(" via `add_safe_globals`", "")
    return None


def _class_name(cls: type) -> str:
    """As :func:`~recoder_dist.training.snapshot.model_class_name` names an instance's class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _autoencoder(path: str, params: dict, state: dict) -> tuple[dict, dict]:
    keys = ("hidden_layers", "activation_type", "is_constrained", "dropout_prob", "noise_prob")
    model_params = _params(path, params, keys)
    hidden = model_params["hidden_layers"]
    if not isinstance(hidden, (list, tuple)) or not hidden:
        raise ValueError(f"{path}: hidden_layers must be a non-empty list, got {hidden!r}")
    constrained = bool(model_params["is_constrained"])
    renames = {
        "en_embedding_layer.weight": "encoder_embedding.weight",
        f"{_ENCODER}.bias": "encoder_bias",
        "de_embedding_layer.weight": "decoder_embedding.weight",
        f"{_DECODER}.bias": "decoder_bias.weight",
    }
    for i in range(len(hidden) - 1):
        for kind in ("weight", "bias"):
            renames[f"encoding_layers.{i}.{kind}"] = f"encoder_layers.{i}.{kind}"
        if constrained:  # 0.4.0 deleted the tied layers' weights: they are not in the file
            renames[f"decoding_layers.{i}.bias"] = f"decoder_biases.{i}"
        else:
            for kind in ("weight", "bias"):
                renames[f"decoding_layers.{i}.{kind}"] = f"decoder_layers.{i}.{kind}"
    # The same parameters, saved again under their module's other names.
    duplicates = {
        f"{_ENCODER}.embedding_layer.weight": "en_embedding_layer.weight",
        f"{_DECODER}.embedding_layer.weight": "de_embedding_layer.weight",
    }
    if constrained:
        duplicates["de_embedding_layer.weight"] = "en_embedding_layer.weight"
    model_state = _rename(path, state, renames, duplicates)
    model_state["decoder_bias.weight"] = _column(path, model_state["decoder_bias.weight"])
    return model_params, model_state


def _factorization(path: str, params: dict, state: dict) -> tuple[dict, dict]:
    model_params = _params(path, params, ("embedding_size", "activation_type", "dropout_prob"))
    renames = {
        "user_embedding_layer.weight": "user_embedding.weight",
        "item_embedding_layer.weight": "item_embedding.weight",
        "bias": "item_bias.weight",
    }
    model_state = _rename(path, state, renames, {})
    model_state["item_bias.weight"] = _column(path, model_state["item_bias.weight"])
    return model_params, model_state


def _params(path: str, params: dict, keys: tuple[str, ...]) -> dict:
    missing = [key for key in keys if key not in params]
    if missing:
        raise ValueError(f"{path}: model_params lack {missing}")
    return {key: params[key] for key in keys}


def _rename(path: str, state, renames: dict, duplicates: dict) -> dict:
    """``state`` under our names. Every key must be known; a duplicate, when present, must
    equal the parameter it duplicates (loading both would keep only one of them)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the model state is a {type(state).__name__}, not a dict")
    missing = sorted(set(renames) - set(state))
    unknown = sorted(set(state) - set(renames) - set(duplicates))
    if missing or unknown:
        raise ValueError(
            f"{path}: the model's parameters do not match its model_params: "
            f"missing {missing}, unexpected {unknown}"
        )
    for duplicate, original in duplicates.items():
        if duplicate in state and not _same(state[duplicate], state[original]):
            raise ValueError(f"{path}: {duplicate} differs from {original}, the same parameter")
    return {ours: state[theirs] for theirs, ours in renames.items()}


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)


def _column(path: str, bias) -> torch.Tensor:
    """0.4.0's item bias vector as our ``nn.Embedding(num_items, 1)`` weight."""
    if not isinstance(bias, torch.Tensor) or bias.dim() != 1:
        raise ValueError(f"{path}: the item bias must be a vector, got {bias!r:.80}")
    return bias.reshape(-1, 1)


def _count(path: str, state: dict, key: str, rows: torch.Tensor | None) -> int | None:
    """``num_items``/``num_users``: the file's, or the parameter's rows when it has none."""
    value = state.get(key)
    if value is None:
        return None if rows is None else len(rows)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {key} must be a positive int, got {value!r}")
    return value
