"""Optimizers by name, with sparse embedding gradients routed to SparseAdam."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recoder_dist.training.worker.sparse_adam import RowwiseSparseAdam


@dataclass(frozen=True)
class _OptimizerKind:
    build: Callable[[list, float], torch.optim.Optimizer]
    # The optimizer for sparse embedding gradients, or None if this kind cannot take them.
    build_sparse: Callable[[list, float], torch.optim.Optimizer] | None = None


OPTIMIZERS = {
    "adam": _OptimizerKind(
        build=lambda groups, lr: torch.optim.Adam(groups, lr=lr),
        build_sparse=lambda groups, lr: RowwiseSparseAdam(groups, lr=lr),
    ),
    # Adam whose weight decay shrinks the weights apart from the gradient's moments (Loshchilov
    # and Hutter, "Decoupled Weight Decay Regularization"): each step multiplies a weight by
    # 1 - lr * weight_decay, however large its gradients.
    "adamw": _OptimizerKind(
        build=lambda groups, lr: torch.optim.AdamW(groups, lr=lr),
        build_sparse=lambda groups, lr: RowwiseSparseAdam(groups, lr=lr),
    ),
    # SGD keeps a dense momentum buffer, so sparse rows get exactly the dense update.
    "sgd": _OptimizerKind(
        build=lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
        build_sparse=lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
    ),
    # Adagrad updates sparse gradients natively, with the same arithmetic as dense ones.
    "adagrad": _OptimizerKind(
        build=lambda groups, lr: torch.optim.Adagrad(groups, lr=lr),
        build_sparse=lambda groups, lr: torch.optim.Adagrad(groups, lr=lr),
    ),
    "rmsprop": _OptimizerKind(
        build=lambda groups, lr: torch.optim.RMSprop(groups, lr=lr, momentum=0.9)
    ),
}


def check_optimizer_type(optimizer_type: str) -> None:
    if optimizer_type not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer_type {optimizer_type!r}; choose one of {sorted(OPTIMIZERS)}"
        )


def sparse_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that receive sparse gradients: the weights of every
    ``nn.Embedding``/``nn.EmbeddingBag`` built with ``sparse=True``, however deeply nested."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            names.append(f"{module_name}.weight" if module_name else "weight")
    # A module shared under two names (tied embeddings) is one parameter: keep its first name.
    first_names = {id(p): n for n, p in reversed(list(model.named_parameters()))}
    return sorted({first_names[id(model.get_parameter(n))] for n in names})


@dataclass
class Optimizers:
    """The dense optimizer and the sparse one (either may be None)."""

    dense: torch.optim.Optimizer | None
    sparse: torch.optim.Optimizer | None

    def each(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.dense, self.sparse) if opt is not None]

    def zero_grad(self) -> None:
        for opt in self.each():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.each():
            opt.step()

    def set_lr(self, dense: float, sparse: float) -> None:
        """The learning rates of the dense optimizer and of the sparse one."""
        for opt, lr in ((self.dense, dense), (self.sparse, sparse)):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = lr

    def state_dict(self) -> dict:
        return {
            "dense": None if self.dense is None else self.dense.state_dict(),
            "sparse": None if self.sparse is None else self.sparse.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key, opt in (("dense", self.dense), ("sparse", self.sparse)):
            if opt is not None and state.get(key) is not None:
                opt.load_state_dict(state[key])


def check_optimizers(model: nn.Module, optimizer_type: str) -> None:
    """What :func:`build_optimizers` refuses, found without building an optimizer (torch's
    first one imports its compiler, seconds that the driver need not spend).

    Raises:
        ValueError: unknown ``optimizer_type``, or a sparse model with an optimizer that cannot
            update sparse gradients.
    """
    check_optimizer_type(optimizer_type)
    sparse_names = sparse_parameter_names(model)
    sparse = [n for n, p in model.named_parameters() if p.requires_grad and n in sparse_names]
    if sparse and OPTIMIZERS[optimizer_type].build_sparse is None:
        raise ValueError(
            f"optimizer_type={optimizer_type!r} cannot update the sparse embedding gradients of "
            f"{sorted(sparse_names)}; use optimizer_type='adam' (SparseAdam for embeddings) or "
            "'adagrad' or 'sgd', or build the model with sparse=False"
        )


def build_optimizers(
    model: nn.Module, optimizer_type: str, lr: float, weight_decay: float
) -> Optimizers:
    """Optimizers for ``model``: ``optimizer_type`` for dense parameters; for sparse
    embeddings SparseAdam ('adam', 'adamw'), Adagrad ('adagrad') or SGD ('sgd').

    Weight decay applies to dense weights, not to biases, and not to sparse embeddings
    (neither sparse optimizer supports it).

    Raises:
        ValueError: see :func:`check_optimizers`.
    """
    check_optimizers(model, optimizer_type)
    kind = OPTIMIZERS[optimizer_type]
    sparse_names = set(sparse_parameter_names(model))
    dense_groups, sparse_params = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in sparse_names:
            sparse_params.append(param)
        else:
            decay = 0.0 if "bias" in name else weight_decay  # bias, decoder_bias.weight, ...
            dense_groups.append({"params": [param], "weight_decay": decay})
    return Optimizers(
        dense=kind.build(dense_groups, lr) if dense_groups else None,
        sparse=kind.build_sparse([{"params": sparse_params}], lr) if sparse_params else None,
    )


def lr_at_epoch(lr: float, milestones: list[int] | None, epoch: int) -> float:
    """Learning rate of ``epoch`` (1-based): ``lr`` times 0.1 per milestone reached (as
    MultiStepLR stepped at the start of every epoch, as recsys-recoder does)."""
    passed = sum(1 for m in (milestones or []) if epoch >= m)
    return lr * 0.1**passed


def epoch_lrs(
    lr: float, milestones: list[int] | None, epoch: int, decay_sparse: bool
) -> tuple[float, float]:
    """``(dense, sparse)`` learning rates of ``epoch``. As in recsys-recoder 0.4.0, whose
    ``MultiStepLR`` wraps the dense optimizer only, the milestones decay the dense optimizer;
    the sparse embeddings keep ``lr`` unless ``decay_sparse``."""
    dense = lr_at_epoch(lr, milestones, epoch)
    return dense, dense if decay_sparse else lr
