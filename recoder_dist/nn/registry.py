"""The models that Recoder trains, by name: a model registers itself once, with
:func:`register`, and the command line (``--model``), the presets, the sweep and the restoring
of snapshots find it here.

A registered model is a :class:`~recoder_dist.nn.base.FactorizationModel` whose constructor
takes its hyper-parameters as keyword arguments (``build`` passes the settings it accepts), and
which may declare:

- ``sharded_form()``: the class of its sharded form (``recoder_dist.sharded.ShardedModel``), for
  runs whose tables are sharded over the workers; None (the default) replicates them;
- ``tune_space``: what a sweep searches for it, constructor argument -> values;
- ``loss_terms(epoch, step)``: terms added to the loss of its last training forward (a VAE's
  KL term, with its annealing schedule).
"""

from __future__ import annotations

import inspect

_MODELS: dict[str, type] = {}


def register(name: str):
    """A class decorator: registers the model class under ``name`` (``--model NAME``)."""

    def decorate(cls: type) -> type:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is taken by {_MODELS[name].__qualname__}")
        cls.registered_name = name
        _MODELS[name] = cls
        return cls

    return decorate


def names() -> list[str]:
    """The registered models' names, in the order they registered."""
    return list(_MODELS)


def model_class(name: str) -> type:
    """The model class registered as ``name``, or named so (its class name, as a snapshot
    records it: ``recoder_dist.nn.autoencoder.DynamicAutoencoder`` or ``DynamicAutoencoder``).

    Raises:
        ValueError: no registered model has this name.
    """
    if name in _MODELS:
        return _MODELS[name]
    short = name.rsplit(".", 1)[-1]
    for cls in _MODELS.values():
        if cls.__name__ == short:
            return cls
    known = ", ".join(f"{key} ({cls.__name__})" for key, cls in _MODELS.items())
    raise ValueError(f"unknown model {name!r}; the registered models are {known}")


def parameters(cls: type) -> list[str]:
    """The hyper-parameters that ``cls``'s constructor takes by keyword."""
    signature = inspect.signature(cls.__init__)
    return [
        p.name
        for p in signature.parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def build(name: str, settings: dict, *, strict: dict | None = None):
    """A new (uninitialized) model ``name`` with the ``settings`` that its constructor takes;
    the others are left out (a setting of another model, as the command line gives every
    model's). ``strict``: settings that must all be the model's own.

    Raises:
        ValueError: an unknown model, a ``strict`` setting that the model does not take, or a
            value that the model refuses.
    """
    cls = model_class(name)
    accepted = parameters(cls)
    foreign = sorted(set(strict or {}) - set(accepted))
    if foreign:
        raise ValueError(
            f"{cls.__name__} ({name}) has no setting {', '.join(foreign)}; "
            f"its settings are {', '.join(accepted)}"
        )
    chosen = {
        key: value for key, value in {**settings, **(strict or {})}.items() if key in accepted
    }
    return cls(**chosen)
