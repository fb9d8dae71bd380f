"""Where the training steps' time goes, per rank and per epoch: recorded when asked.

``Recoder.train(..., profile=True)`` times each phase of every step:

- ``data``: waiting for the next batch (made ahead by the prefetch thread);
- ``forward``: moving the batch to the device and computing the loss (with sharded tables,
  the exchanges of entries and codes with the tables' owners too);
- ``backward``: autograd, less the DDP all-reduce inside it (with sharded tables, the
  gradients of codes and partial sums going back to their ranks too);
- ``wait``: waiting for the slowest rank, before the step's first collective;
- ``ddp_allreduce``: DDP's all-reduce of the dense gradients (replicated tables);
- ``sparse_sync``: averaging the sparse embedding gradients (``SparseGradSync``, replicated
  tables), or summing the dense layers' gradients (sharded tables);
- ``optimizer``: the optimizers' step;
- ``other``: the rest of the epoch (zeroing gradients, the loss sum, the end-of-epoch
  collectives).

Beside them, not part of the step: ``batches_cpu``, the CPU seconds that the prefetch thread
spent making the epoch's batches (reading rows, sampling), which run while the steps do and
compete with them for the same cores.

To separate the waiting from the transfers, a profiled run puts a barrier before the step's
collectives and makes DDP's all-reduce blocking (it otherwise overlaps the backward), and on a
GPU synchronizes the device at each phase boundary. So a profiled epoch is a little slower than
an unprofiled one, and its phases add up to its time. Unprofiled, every phase is a no-op.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

PHASES = (
    "data",
    "forward",
    "backward",
    "wait",
    "ddp_allreduce",
    "sparse_sync",
    "optimizer",
    "other",
)

_END = object()


class StepProfile:
    """Seconds per phase of the steps of one epoch on this rank (see the module's docstring).

    ``phase(name)`` is a context manager; phases may nest (the DDP all-reduce runs inside the
    backward), and a phase's time excludes that of the phases nested in it.
    """

    def __init__(self, enabled: bool, device: torch.device, clock=time.perf_counter):
        self.enabled = enabled
        self._cuda = device.type == "cuda"
        self._clock = clock
        self.restart()

    def restart(self) -> None:
        """Starts a new epoch's profile."""
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._nested = [0.0]  # time of nested phases, one entry per open phase (+ the base)
        self._started = self._clock()

    def phase(self, name: str):
        if not self.enabled:
            return contextlib.nullcontext()
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str):
        self._synchronize()
        start = self._clock()
        self._nested.append(0.0)
        try:
            yield
        finally:
            self._synchronize()
            elapsed = self._clock() - start
            nested = self._nested.pop()
            self._seconds[name] += elapsed - nested
            self._nested[-1] += elapsed

    def timed(self, items: Iterable, name: str) -> Iterator:
        """``items``, the wait for each one timed as phase ``name``."""
        items = iter(items)
        while True:
            with self.phase(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def barrier(self, group=None) -> None:
        """With more than one rank, waits for every rank (timed as ``wait``), when enabled."""
        if self.enabled and dist.is_initialized() and dist.get_world_size(group) > 1:
            with self.phase("wait"):
                dist.barrier(group=group)

    def epoch_seconds(self) -> dict[str, float]:
        """This rank's seconds per phase since the profile started; ``other`` is the epoch's
        time that no phase took."""
        seconds = dict(self._seconds)
        seconds["other"] = self._clock() - self._started - sum(seconds.values())
        return seconds

    def _synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


def gathered(seconds: dict[str, float], world: int, device) -> dict[str, list[float]]:
    """Every rank's ``seconds`` (name -> seconds, the same names in the same order on every
    rank), as name -> one value per rank."""
    names = list(seconds)
    local = torch.tensor([seconds[n] for n in names], dtype=torch.float64, device=device)
    if world > 1 and dist.is_initialized():
        ranks = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(ranks, local)
        table = torch.stack(ranks).cpu()
    else:
        table = local.cpu().unsqueeze(0)
    return {name: [float(v) for v in table[:, i]] for i, name in enumerate(names)}


def timed_allreduce_hook(profile: StepProfile):
    """A DDP communication hook that averages a gradient bucket as DDP's default one does
    (divided by the world size, then summed), but blocking and timed: ``wait`` for the other
    ranks, then ``ddp_allreduce``."""

    def hook(state, bucket):
        group = state if state is not None else dist.group.WORLD
        tensor = bucket.buffer()
        profile.barrier(group)
        with profile.phase("ddp_allreduce"):
            tensor.div_(dist.get_world_size(group))
            dist.all_reduce(tensor, group=group)
        future = torch.futures.Future()
        future.set_result(tensor)
        return future

    return hook
