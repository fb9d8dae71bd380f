"""The decoder and its loss where the scores are: each owner scores its items for every user.

A step's items are those of the whole global batch (the union of every rank's users' items)
with negative sampling, every item without: each owner knows its part of that set from the
entries it received, so no item list travels. Every rank's codes are gathered on every rank
(``world x batch x hidden``: the term that grows with the world), each owner computes
``bias + codes @ rows.T`` over its items and its share of the loss, and the shares are summed.
Why not send the scores back: they are ``batch x items``, far more than the codes.

mse and logistic are sums of per-entry terms: each owner's share is the loss of its columns.
logloss (multinomial NLL) needs each row's log-sum-exp over all items: one all-reduce of the
rows' maxima and one of their sums of exponentials (``global batch`` floats each).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from recoder_dist.losses import MSELoss, MultinomialNLLLoss, build_loss
from recoder_dist.sharded import comm
from recoder_dist.sharded.routes import EntryRoutes
from recoder_dist.sharded.tables import ShardedTable


class _GlobalLogSumExp(torch.autograd.Function):
    """Each row's log-sum-exp over the columns of every rank's ``scores``."""

    @staticmethod
    def forward(ctx, scores, group):
        if scores.shape[1]:
            local_max = scores.amax(1)
        else:  # an owner none of whose items the step touched
            local_max = scores.new_full((len(scores),), float("-inf"))
        row_max = comm.all_reduce(local_max, dist.ReduceOp.MAX, group)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        exps = torch.exp(scores - row_max.unsqueeze(1))
        sum_exp = comm.all_reduce(exps.sum(1), group=group)
        ctx.save_for_backward(exps, sum_exp)  # the softmax is exps / sum_exp: no second exp
        ctx.group = group
        return row_max + torch.log(sum_exp)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        exps, sum_exp = ctx.saved_tensors
        # Every rank's share of the loss uses the same lse: its gradient is their sum.
        grad = comm.all_reduce(grad, group=ctx.group)
        return exps * (grad / sum_exp).unsqueeze(1), None


def computes(loss_fn: nn.Module) -> bool:
    """Whether ``sharded_loss`` computes ``loss_fn`` (a module of ``build_loss``): the
    project's own mse, logistic and logloss, not a subclass (whose ``forward`` may differ)."""
    if type(loss_fn) is nn.BCEWithLogitsLoss:
        return loss_fn.reduction == "sum" and loss_fn.weight is None and loss_fn.pos_weight is None
    return type(loss_fn) in (MSELoss, MultinomialNLLLoss)


def sharded_loss(
    codes: torch.Tensor,
    routes: EntryRoutes,
    targets: torch.Tensor,
    decoder: ShardedTable,
    bias: ShardedTable,
    loss: str | nn.Module = "mse",
    loss_params: dict | None = None,
    negative_sampling: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's loss over the global batch, averaged over its users (as ``batch_loss``).

    A collective: every rank calls it.

    Args:
        codes: this rank's users' codes (the decoder's last hidden layer), ``users x dim``.
        routes: the step's routes.
        targets: this rank's entries' target values, aligned with the routed entries.
        decoder: this rank's shard of the output item vectors.
        bias: this rank's shard of the item biases (``dim`` 1).
        loss: ``"mse"``, ``"logistic"``, ``"logloss"`` or such a module from
            ``recoder_dist.losses.build_loss``.
        loss_params: the loss's parameters (e.g. ``{"confidence": 1.0}`` for mse).
        negative_sampling: score the step's items only; when False, every item.

    Returns:
        ``(share, total)``: this rank's share of the loss (call ``backward`` on it on every
        rank: the shares' gradients add up to the loss's) and the loss itself (detached, the
        same on every rank).

    Raises:
        ValueError: a loss that is not a sum of per-row terms handled here.
    """
    loss_fn = build_loss(loss, loss_params)
    if not computes(loss_fn):
        raise ValueError(
            f"the sharded decoder computes mse, logistic (reduction='sum', no weights) and "
            f"logloss, not {loss_fn}"
        )

    items, columns = routes.scored_items(len(decoder.weight), negative_sampling)
    all_codes = comm.gather_rows(codes, routes.batch_sizes, routes.group)
    scores = torch.addmm(bias(items).squeeze(1), all_codes, decoder(items).t())
    targets = routes.to_owners(targets.detach())
    if isinstance(loss_fn, MultinomialNLLLoss):
        # -sum_i t_ui log_softmax(s_u)_i = -sum_i t_ui s_ui + (sum_i t_ui) lse_u, split by owner;
        # the targets are zero but at the entries.
        lse = _GlobalLogSumExp.apply(scores, routes.group)
        row_targets = targets.new_zeros(len(scores)).index_add_(0, routes.users, targets)
        share = (row_targets * lse).sum() - (scores[routes.users, columns] * targets).sum()
    else:  # elementwise: the owner's columns' terms
        dense_targets = scores.new_zeros(scores.shape)
        dense_targets[routes.users, columns] = targets
        share = loss_fn(scores, dense_targets)
    share = share / max(routes.num_users, 1)
    total = comm.all_reduce(share.detach(), group=routes.group)
    return share, total
