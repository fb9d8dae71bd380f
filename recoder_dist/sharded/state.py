"""A sharded model's state as a whole model's, and back: the model's ``state_dict`` and its
optimizers' states.

A sharded model names its parameters as the whole model does, in the same order
(``ShardedAutoencoder``), so the two states differ only in the tables' rows: the shard holds
rows ``rank::world`` of each table and of each per-row optimizer state (Adam's moments), and
the rest (dense layers, their optimizer states, step counts) is the same on every rank. Going
from whole to shard slices rows (back is the shard files' business, ``sharded.checkpoint``). A
whole state loads on any world size: that is resharding.
"""

from __future__ import annotations

import torch
from torch import nn

from recoder_dist.sharded.tables import ShardedTable


def table_names(model: nn.Module) -> dict[str, ShardedTable]:
    """The ``state_dict`` keys of ``model``'s sharded tables (a tied table under each of its
    names), with their tables."""
    return {
        f"{name}.weight": module
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, ShardedTable)
    }


def table_rows(model: nn.Module) -> dict[str, int]:
    """The rows of each sharded table of ``model``, whole (by ``state_dict`` key): what a
    shard file records to lay its rows out under any world size."""
    return {key: table.num_items for key, table in sorted(table_names(model).items())}


def sharded_state(full_state: dict, model: nn.Module) -> dict:
    """This rank's part of a whole model's ``state_dict`` for the sharded ``model``."""
    tables = table_names(model)
    return {
        key: _rows_of(value, tables[key]) if key in tables else value
        for key, value in full_state.items()
    }


def sharded_optimizer_state(full_state: dict, optimizers, model: nn.Module) -> dict:
    """This rank's part of the optimizers' state of the whole model (``Optimizers.state_dict``
    of the whole model's optimizers), for ``optimizers`` of the sharded ``model``."""
    return map_optimizer_rows(
        full_state, optimizers, model, lambda value, table, key: _rows_of(value, table)
    )


def map_optimizer_rows(state: dict, optimizers, model: nn.Module, per_row) -> dict:
    """``state`` (``Optimizers.state_dict()``) with ``per_row(value, table, key)`` in place of
    each state tensor that has a row per item of a table (in the optimizers' own order; dense,
    see ``_dense``); ``key`` is its place, ``(kind, index, name)``: ``state[kind]["state"]
    [index][name]``."""
    tables = {id(table.weight): table for table in table_names(model).values()}
    out = {}
    for kind, optimizer in (("dense", optimizers.dense), ("sparse", optimizers.sparse)):
        kind_state = state.get(kind)
        if optimizer is None or kind_state is None:
            out[kind] = kind_state
            continue
        params = [p for group in optimizer.param_groups for p in group["params"]]
        mapped = {}
        for index in sorted(kind_state["state"]):  # the same order on every rank
            table = tables.get(id(params[index]))
            mapped[index] = {
                name: per_row(_dense(value), table, (kind, index, name))
                if table is not None and torch.is_tensor(value) and value.dim() >= 1
                else value
                for name, value in kind_state["state"][index].items()
            }
        out[kind] = {**kind_state, "state": mapped}
    return out


def _dense(value: torch.Tensor) -> torch.Tensor:
    """A state tensor with rows: SGD's momentum of a sparse gradient is sparse (its values are
    the same dense; an optimizer given the dense one goes on with the same arithmetic)."""
    return value.to_dense() if value.is_sparse else value


def _rows_of(value: torch.Tensor, table: ShardedTable) -> torch.Tensor:
    if value.shape[0] != table.num_items:
        raise ValueError(
            f"a table of {value.shape[0]} rows for a sharded table of {table.num_items} items"
        )
    return value[table.rank :: table.ownership.world].clone()
