"""SparseAdam with the same arithmetic as torch's, on the touched rows only.

``torch.optim.SparseAdam`` reads the moments of the touched rows through ``sparse_mask`` and
writes them back by adding sparse tensors, which sorts and merges index lists several times a
step.

On CPU (float32 or float64 weights), a compiled loop (``_adam_rows``) updates each touched row
in place, in one pass: the same float operations in the same order as torch's, each rounded to
the weights' dtype. Its square root is correctly rounded; torch's vectorized CPU ``sqrt`` is
not always, so the weights may differ from torch's in the last bits.

Elsewhere (GPU), and on CPU as the compiled loop's reference (``recoder_dist.kernels``), the
rows are gathered once (``index_select``), updated densely and scattered back
(``index_copy_``/``index_add_``): the same float operations in the same order, so the result
is bit-for-bit torch's. A gradient that has every row is applied in place on the whole
table, with the same operations and no gathering at all.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch.autograd.graph import increment_version

from recoder_dist import kernels


class RowwiseSparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` (same arguments, same state, same results), faster.

    Its gradients are row-sparse, as an embedding table's: a gradient sparse in more than one
    dimension is refused (torch's accepts it).
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise RuntimeError(
                        "SparseAdam does not support dense gradients, please consider Adam instead"
                    )
                if param.grad.sparse_dim() != 1:
                    raise ValueError(
                        "RowwiseSparseAdam updates whole rows (embedding tables); got a "
                        f"gradient sparse in {param.grad.sparse_dim()} dimensions"
                    )
                grad = -param.grad if group.get("maximize", False) else param.grad
                state = self.state[param]
                lr = float(group["lr"])  # torch reads a tensor lr as a number too
                self._update(param, grad, state, lr, beta1, beta2, group["eps"])
        return loss

    @staticmethod
    def _update(param, grad, state, lr, beta1, beta2, eps) -> None:
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        rows, values = _distinct_rows(grad)
        if values.numel() == 0:  # torch counts the step and updates nothing
            return
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        bias_correction1 = 1 - beta1 ** state["step"]
        bias_correction2 = 1 - beta2 ** state["step"]
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        if kernels.compiled() and _compiled_update_applies(param, values, exp_avg, exp_avg_sq):
            flat = [t.view(len(t), -1).numpy() for t in (param.detach(), exp_avg, exp_avg_sq)]
            scalar = flat[0].dtype.type  # torch rounds each scalar to the weights' dtype
            _adam_rows(
                *flat,
                rows.numpy(),
                values.view(len(values), -1).numpy(),
                scalar(1 - beta1),
                scalar(1 - beta2),
                scalar(eps),
                scalar(-step_size),
            )
            # Written through numpy: bump the version counters as torch's in-place operations
            # do, so that autograd still notices if a saved tensor was modified.
            for tensor in (param, exp_avg, exp_avg_sq):  # torch 2.3's takes one tensor a call
                increment_version(tensor)
            return
        if len(rows) == len(param):  # distinct rows, all of them: 0, 1, ..., len(param) - 1
            _update_every_row(param, values, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size)
            return

        old_avg = exp_avg.index_select(0, rows)
        old_avg_sq = exp_avg_sq.index_select(0, rows)
        # torch: update = (g - old) * (1 - beta); moment = old + update.
        avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)
        avg_sq = values.pow(2).sub_(old_avg_sq).mul_(1 - beta2).add_(old_avg_sq)
        exp_avg.index_copy_(0, rows, avg)
        exp_avg_sq.index_copy_(0, rows, avg_sq)
        param.index_add_(0, rows, avg.div_(avg_sq.sqrt_().add_(eps)).mul_(-step_size))


def _update_every_row(param, values, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size):
    """The update above when the gradient has every row (negative sampling off, or a group
    that touched every item): the same float operations in place, without gathering or
    scattering rows."""
    exp_avg.add_(values.sub(exp_avg).mul_(1 - beta1))
    exp_avg_sq.add_(values.pow(2).sub_(exp_avg_sq).mul_(1 - beta2))
    param.add_(exp_avg.div(exp_avg_sq.sqrt().add_(eps)).mul_(-step_size))


def _compiled_update_applies(param, values, exp_avg, exp_avg_sq) -> bool:
    tensors = (param, values, exp_avg, exp_avg_sq)
    return all(
        t.device.type == "cpu" and t.dtype == param.dtype and t.is_contiguous() for t in tensors
    ) and param.dtype in (torch.float32, torch.float64)


@numba.njit(nogil=True, cache=True)
def _adam_rows(param, exp_avg, exp_avg_sq, rows, values, keep1, keep2, eps, minus_step):
    """The update of ``_update`` for the distinct rows ``rows`` with gradient rows ``values``,
    in the same float operations and order. The scalars come in the weights' dtype, so no
    operation is widened to float64."""
    for i in range(len(rows)):
        row = rows[i]
        for j in range(values.shape[1]):
            grad = values[i, j]
            avg = (grad - exp_avg[row, j]) * keep1 + exp_avg[row, j]
            avg_sq = (grad * grad - exp_avg_sq[row, j]) * keep2 + exp_avg_sq[row, j]
            exp_avg[row, j] = avg
            exp_avg_sq[row, j] = avg_sq
            param[row, j] += avg / (np.sqrt(avg_sq) + eps) * minus_step


def _distinct_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a sparse gradient and their values, duplicate rows summed (as torch does).

    An embedding's gradient comes uncoalesced, but its rows are the looked-up items, which the
    collator hands over sorted and distinct; ``coalesce`` would sort and copy them anyway
    (a third of this optimizer's time on ml-1m), so a strictly increasing list skips it.
    """
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
            grad = grad.coalesce()
    return grad._indices()[0], grad._values()
