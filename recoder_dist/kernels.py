"""The choice between the CPU fast paths and their plain references, as an argument.

Each CPU fast path that pays end to end (``benchmarks/fast_paths.py``) has a reference beside
it that computes the same result with plain numpy/torch operations. ``Recoder(...,
kernels=...)`` picks them for a whole run, and the objects and functions that hold a fast path
take the choice as an argument (``compiled=True``); the tests run one suite over both.
"""

from __future__ import annotations

MODES = ("compiled", "reference")


def compiled(mode: str) -> bool:
    """Whether ``mode`` ('compiled' or 'reference') selects the fast paths.

    Raises:
        ValueError: any other mode.
    """
    if mode not in MODES:
        raise ValueError(f"kernels={mode!r}: choose one of {MODES}")
    return mode == "compiled"
