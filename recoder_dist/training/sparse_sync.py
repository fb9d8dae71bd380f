"""Averaging sparse embedding gradients across ranks, sending only the rows a step touched.

DDP cannot do this everywhere: NCCL refuses sparse tensors, and all-reducing a dense
``num_items x dim`` gradient moves the whole table every step. Instead each rank all-gathers its
(row indices, row values), padded to the largest count, and the rows are summed and divided by
the world size: the result equals the dense DDP average, restricted to the rows that some rank
touched (the rows SparseAdam must update).

When the ranks together touch a large share of the table, all-gathering rows moves more than
a dense all-reduce would; then the rows are scattered into a dense buffer (with a "touched"
column) and all-reduced. Every rank sees the same counts, so every rank picks the same path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# All-gathered rows (world x the largest per-rank count) above this share of the table make a
# dense all-reduce cheaper: a ring all-reduce moves about twice the table through each rank.
DENSE_SHARE = 0.5


class SparseGradSync:
    """Synchronizes the sparse gradients of ``params`` after backward.

    Args:
        params: the parameters with sparse gradients (embedding weights).
        group: the process group (default: the world).
    """

    def __init__(self, params: list[torch.nn.Parameter], group=None):
        self.params = list(params)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0  # accumulates over steps; the caller reads and resets it
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
        for i, (param, (indices, values)) in enumerate(zip(self.params, grads)):
            counts_i = all_counts[:, i].tolist()
            if self.world_size * max(counts_i) <= DENSE_SHARE * param.shape[0]:
                param.grad = self._gather_rows(param, indices, values, counts_i)
            else:
                param.grad = self._reduce_dense(param, indices, values)

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
        longest = max(counts)
        padded_idx = indices.new_zeros(longest)
        padded_idx[: len(indices)] = indices
        padded_val = values.new_zeros((longest, *values.shape[1:]))
        padded_val[: len(values)] = values
        all_idx = [torch.empty_like(padded_idx) for _ in range(self.world_size)]
        all_val = [torch.empty_like(padded_val) for _ in range(self.world_size)]
        dist.all_gather(all_idx, padded_idx, group=self.group)
        dist.all_gather(all_val, padded_val, group=self.group)
        self.bytes_sent += padded_idx.numel() * padded_idx.element_size()
        self.bytes_sent += padded_val.numel() * padded_val.element_size()
        idx = torch.cat([t[:n] for t, n in zip(all_idx, counts)])
        val = torch.cat([t[:n] for t, n in zip(all_val, counts)]) / self.world_size
        # Rows touched by several ranks appear once per rank; the optimizers coalesce (sum).
        return torch.sparse_coo_tensor(idx.unsqueeze(0), val, param.shape, check_invariants=False)

    def _reduce_dense(self, param, indices, values) -> torch.Tensor:
        rows, width = param.shape[0], values[0].numel() if len(values) else param[0].numel()
        buffer = values.new_zeros((rows, width + 1))  # last column: touched by some rank
        buffer[indices, :width] = values.reshape(len(indices), width)
        buffer[indices, width] = 1.0
        dist.all_reduce(buffer, group=self.group)
        self.bytes_sent += buffer.numel() * buffer.element_size()
        touched = torch.nonzero(buffer[:, width] > 0).squeeze(1)
        val = (buffer[touched, :width] / self.world_size).reshape(len(touched), *param.shape[1:])
        return torch.sparse_coo_tensor(
            touched.unsqueeze(0), val, param.shape, is_coalesced=True, check_invariants=False
        )
