"""Averaging sparse embedding gradients across ranks, sending only the rows a step touched.

DDP cannot do this everywhere: NCCL refuses sparse tensors, and all-reducing a dense
``num_items x dim`` gradient moves the whole table every step. Instead every rank gets every
rank's (row indices, row values divided by the world size), in rank order, and the optimizer
sums the rows that several ranks touched: the result equals the dense DDP average, restricted
to the rows that some rank touched (the rows SparseAdam must update).

Two ways to get them, with the same result to the bit:
- ``"ring"``: point-to-point sends around the ring of ranks, each rank's rows exactly (no
  padding), every table of a step in one batch of sends per hop. gloo's sends were measured
  faster than its all-gather of the same bytes (benchmarks/RESULTS.md, "the sparse sync's rows
  sent around a ring").
- ``"all_gather"``: one all-gather of the indices and one of the values per table, each rank's
  rows padded to the longest, the padding dropped after: NCCL's tuned collective, and the
  ring's reference.

When the ranks together touch a large share of the table, all-gathering rows moves more than
a dense all-reduce would; then the rows are scattered into a dense buffer (with a "touched"
count per row) and all-reduced, one buffer and one collective for all such tables. Every rank
sees the same counts, so every rank picks the same path.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

# All-gathered rows (world x the largest per-rank count) above this share of the table make a
# dense all-reduce cheaper. A ring all-reduce moves 2 (world - 1) / world of the table through
# each rank; the all-gather brings in (world - 1) x the longest rank's rows, and the rows that
# several ranks touched come in once per rank, which the optimizer must sort and sum. The
# crossover was measured (benchmarks/RESULTS.md, "Sparse gradient sync: where the paths cross").
DENSE_SHARE = 1.0

# All ranks' tensors into one: torch 2.13 names it all_gather_single and deprecates (with a
# warning) all_gather_into_tensor, the only name before it.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


EXCHANGES = ("ring", "all_gather")


def default_exchange(group, device: torch.device) -> str:
    """``"ring"`` for CPU tensors on gloo (where it was measured), ``"all_gather"`` otherwise:
    on NCCL, and for CUDA tensors on gloo, which its collectives take but its sends may not."""
    return "ring" if dist.get_backend(group) == "gloo" and device.type == "cpu" else "all_gather"


class SparseGradSync:
    """Synchronizes the sparse gradients of ``params`` after backward.

    Args:
        params: the parameters with sparse gradients (embedding weights).
        group: the process group (default: the world).
        exchange: how the rows of tables below ``DENSE_SHARE`` travel: ``"ring"`` or
            ``"all_gather"`` (see the module's docstring); by default ``default_exchange``'s.
    """

    def __init__(self, params: list[torch.nn.Parameter], group=None, exchange: str | None = None):
        self.params = list(params)
        exchange = exchange or default_exchange(group, self.params[0].device)
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        self.group = group
        self.exchange = exchange
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        # Bytes of the rows that this rank contributed (padded for all_gather), and of the dense
        # buffer: accumulates over steps; the caller reads and resets it.
        self.bytes_sent = 0
        # What a dense all-reduce of the same gradients would carry per step.
        self.dense_bytes = sum(p.numel() * p.element_size() for p in self.params)

    def synchronize(self) -> None:
        """Replaces every parameter's local sparse gradient by the average over ranks."""
        grads = [self._local_rows(p) for p in self.params]
        device = self.params[0].device
        counts = torch.tensor([len(idx) for idx, _ in grads], device=device, dtype=torch.int64)
        all_counts = [torch.empty_like(counts) for _ in range(self.world_size)]
        dist.all_gather(all_counts, counts, group=self.group)
        all_counts = torch.stack(all_counts).cpu()  # one host sync for all parameters
        gathered, dense = [], []
        for i, (param, (indices, values)) in enumerate(zip(self.params, grads)):
            counts_i = all_counts[:, i].tolist()
            if self.world_size * max(counts_i) <= DENSE_SHARE * param.shape[0]:
                gathered.append((param, indices, values, counts_i))
            else:
                dense.append((param, indices, values))
        if self.exchange == "ring":
            self._ring_rows(gathered)
        else:
            for param, indices, values, counts_i in gathered:
                param.grad = self._gather_rows(param, indices, values, counts_i)
        if dense:
            self._reduce_dense(dense)

    @staticmethod
    def _local_rows(param) -> tuple[torch.Tensor, torch.Tensor]:
        dim = param.shape[1:]
        if param.grad is None:  # this rank's batch touched no row
            empty = torch.empty(0, dtype=torch.int64, device=param.device)
            return empty, torch.empty((0, *dim), dtype=param.dtype, device=param.device)
        if not param.grad.is_sparse:
            raise RuntimeError(
                "a parameter registered as sparse got a dense gradient: read sparse embeddings "
                "through their forward (embedding(indices)), not through .weight"
            )
        grad = param.grad.coalesce()
        return grad.indices()[0], grad.values()

    def _gather_rows(self, param, indices, values, counts: list[int]) -> torch.Tensor:
        """All-gathers every rank's rows, each rank's padded to the longest, divided by the
        world size before they are sent (as DDP does)."""
        longest, world = max(counts), self.world_size
        send_idx = indices.new_zeros(longest)
        send_idx[: len(indices)] = indices
        send_val = values.new_zeros((longest, *values.shape[1:]))
        torch.div(values, world, out=send_val[: len(values)])
        all_idx = send_idx.new_empty(world * longest)
        all_val = send_val.new_empty((world * longest, *send_val.shape[1:]))
        _all_gather_single(all_idx, send_idx, group=self.group)
        _all_gather_single(all_val, send_val, group=self.group)
        self.bytes_sent += send_idx.numel() * send_idx.element_size()
        self.bytes_sent += send_val.numel() * send_val.element_size()
        if min(counts) < longest:  # drop the padding
            keep = torch.cat(
                [torch.arange(r * longest, r * longest + n) for r, n in enumerate(counts)]
            ).to(all_idx.device)
            all_idx, all_val = all_idx[keep], all_val[keep]
        return _rows_of_all_ranks(param, all_idx, all_val)

    def _ring_rows(self, grads: list[tuple]) -> None:
        """Sets the gradient of every (param, indices, values, counts) in ``grads`` to all
        ranks' rows in rank order (``_gather_rows``'s result, without padding): each rank writes
        its own rows, divided by the world size, into its slot of the result, and at hop ``k``
        sends slot ``rank - k`` to the next rank and receives slot ``rank - k - 1`` from the
        previous one. A slot of no rows is neither sent nor received (every rank knows the
        counts)."""
        world, rank = self.world_size, self.rank
        after, before = (rank + 1) % world, (rank - 1) % world
        tables = []
        for _, indices, values, counts in grads:
            starts = [0, *itertools.accumulate(counts)]
            all_idx = indices.new_empty(starts[-1])
            all_val = values.new_empty((starts[-1], *values.shape[1:]))
            all_idx[starts[rank] : starts[rank + 1]] = indices
            torch.div(values, world, out=all_val[starts[rank] : starts[rank + 1]])
            self.bytes_sent += indices.numel() * indices.element_size()
            self.bytes_sent += values.numel() * values.element_size()
            tables.append((starts, all_idx, all_val))
        for hop in range(world - 1):
            ops = []
            for op, other, slot in (
                (dist.isend, after, rank - hop),
                (dist.irecv, before, rank - hop - 1),
            ):
                slot %= world
                for t, (starts, *tensors) in enumerate(tables):
                    if starts[slot] == starts[slot + 1]:
                        continue
                    for j, tensor in enumerate(tensors):  # the tag pairs a send with its receive
                        part = tensor[starts[slot] : starts[slot + 1]]
                        ops.append(
                            dist.P2POp(op, part, group=self.group, tag=2 * t + j, group_peer=other)
                        )
            for request in dist.batch_isend_irecv(ops) if ops else []:
                request.wait()
        for (param, *_), (_, all_idx, all_val) in zip(grads, tables):
            param.grad = _rows_of_all_ranks(param, all_idx, all_val)

    def _reduce_dense(self, grads: list[tuple]) -> None:
        """All-reduces the rows of every (param, indices, values) in ``grads`` in one dense
        buffer (one collective for all of them), with a "touched by some rank" count per row."""
        layout, size = [], 0
        for param, _, _ in grads:
            rows, width = param.shape[0], param[0].numel()
            layout.append((size, rows, width))
            size += rows * (width + 1)
        buffer = grads[0][2].new_zeros(size)
        for (_, indices, values), (start, rows, width) in zip(grads, layout):
            rows_view, touched = _views(buffer, start, rows, width)
            rows_view.index_copy_(0, indices, values.reshape(len(indices), width))
            touched[indices] = 1.0
        dist.all_reduce(buffer, group=self.group)
        self.bytes_sent += buffer.numel() * buffer.element_size()
        for (param, _, _), (start, rows, width) in zip(grads, layout):
            rows_view, touched = _views(buffer, start, rows, width)
            touched = torch.nonzero(touched).squeeze(1)
            val = rows_view.index_select(0, touched).div_(self.world_size)
            param.grad = torch.sparse_coo_tensor(
                touched.unsqueeze(0),
                val.reshape(len(touched), *param.shape[1:]),
                param.shape,
                is_coalesced=True,
                check_invariants=False,
            )


def _rows_of_all_ranks(param, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``param``'s gradient of every rank's rows in rank order: rows touched by several ranks
    appear once per rank, and the optimizers coalesce (sum) them."""
    return torch.sparse_coo_tensor(
        indices.unsqueeze(0), values, param.shape, check_invariants=False
    )


def _views(buffer: torch.Tensor, start: int, rows: int, width: int):
    """The ``rows x width`` gradient rows and the ``rows`` touched-counts of one parameter in
    the fused dense buffer."""
    end = start + rows * width
    return buffer[start:end].view(rows, width), buffer[end : end + rows]
