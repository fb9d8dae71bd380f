"""One switch between the compiled loops (numba) and their plain numpy/torch references.

Each compiled loop of the package has a reference beside it that computes the same result
with numpy or torch: the collator's item marking (``np.unique``) and row numbers
(``np.repeat``), the exact top k (``torch.topk``), evaluation's hit test (a binary search of
sorted keys) and SparseAdam's row update (``index_select``/``index_copy_``). The compiled loops
are used by default. ``RECODER_DIST_KERNELS=reference`` in the environment selects the
references in every process that imports this package (Ray workers inherit the variable from
the driver's cluster); :func:`use` switches within a process, as the tests do to run one suite
over both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV = "RECODER_DIST_KERNELS"
MODES = ("compiled", "reference")


def _checked(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: choose one of {MODES} (environment: {ENV})")
    return mode


_mode = _checked(os.environ.get(ENV, "compiled"))


def compiled() -> bool:
    """Whether the compiled loops are in use (otherwise the references)."""
    return _mode == "compiled"


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
    """Within the block, use ``mode`` ('compiled' or 'reference') in this process."""
    global _mode
    previous, _mode = _mode, _checked(mode)
    try:
        yield
    finally:
        _mode = previous
