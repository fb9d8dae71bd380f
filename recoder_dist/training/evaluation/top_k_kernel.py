"""Exact top k of each row of a float32 matrix on CPU, compiled with numba.

``torch.topk`` on CPU copies each row into (value, index) pairs and runs ``nth_element`` on
them; this kernel reads each row a few times in vectorized passes instead (measured in
``benchmarks/eval_speed.py``; figures in ``benchmarks/RESULTS.md``). Its reference is
``torch.topk`` (``top_k(..., compiled=False)``).

Per row:

1. Each float's bits become an int32 key in the same order (negative floats have their other
   31 bits flipped), so every later comparison is an integer one and the passes vectorize. NaN
   becomes the largest key: ``torch.topk`` ranks NaN above every number too.
2. The maxima of blocks of 8 keys, and of super-blocks of 8 blocks.
3. The threshold ``t``: the k-th largest block maximum. The k largest block maxima are k
   distinct entries, so the row's k-th largest entry is ``>= t``, and every entry of the top k
   lies in a block whose maximum is ``>= t``. With at least k super-blocks, ``t`` is selected
   among the blocks of the super-blocks that reach the k-th largest super-block maximum
   ``t0 <= t`` only: every block whose maximum is ``>= t`` lies in one of them.
4. The entries ``>= t`` of the blocks that reach it (~1.5 to 3k of them), packed as int64
   ``key << 32 | (n - 1 - column)``: distinct, and ordered by value, then by column.
5. A selection of the k largest packed entries, then a sort of those k.

Selections run on distinct int64 entries (the position in the low bits) and are quickselect
with a branchless partition: on random data, a branch at each comparison is mispredicted half
of the time, and on many equal entries quickselect would take quadratic time.

The values are ``torch.topk``'s, bit for bit, except that -0.0 ranks below 0.0 here where
``torch.topk`` takes them as equal. Among equal values the lowest column comes first, so the
result does not depend on the implementation (``torch.topk`` picks any of them).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

BLOCK = 8  # entries a block; also blocks a super-block
_PAD = np.iinfo(np.int32).min  # below every key: the key of -inf is -2**31 + 2**23 - 1


def applies(scores: torch.Tensor, k: int) -> bool:
    """Whether ``top_k_rows`` takes ``scores``: a float32 CPU matrix with at least k blocks
    in a row (``k`` blocks give the threshold) and columns that fit in 32 bits."""
    return (
        scores.device.type == "cpu"
        and scores.dtype == torch.float32
        and scores.dim() == 2
        and 1 <= k <= -(-scores.shape[1] // BLOCK)
        and scores.shape[1] < 2**32
    )


def top_k_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)``: values sorted, largest first, ties by column."""
    if not applies(scores, k):
        raise ValueError(f"top_k_rows takes a float32 CPU matrix with >= {k} blocks of {BLOCK}")
    bits = scores.detach().contiguous().view(torch.int32).numpy()
    values = torch.empty((len(scores), k), dtype=torch.float32)
    columns = torch.empty((len(scores), k), dtype=torch.int64)
    _top_k(bits, k, values.view(torch.int32).numpy(), columns.numpy())
    return values, columns


@numba.njit(nogil=True, cache=True)
def _top_k(bits, k, out_bits, out_columns):
    rows, n = bits.shape
    num_supers = -(-n // (BLOCK * BLOCK))
    keys = np.full(num_supers * BLOCK * BLOCK, _PAD, np.int32)
    maxima = np.empty(num_supers * BLOCK, np.int32)
    supers = np.empty(num_supers, np.int32)
    scratch = np.empty(num_supers * BLOCK, np.int64)
    packed = np.empty(num_supers * BLOCK * BLOCK + 1, np.int64)
    for r in range(rows):
        row = bits[r]
        for j in range(n):
            x = row[j]
            key = x ^ ((x >> 31) & 0x7FFFFFFF)
            keys[j] = 0x7FFFFFFF if (x & 0x7FFFFFFF) > 0x7F800000 else key  # NaN: largest
        for b in range(len(maxima)):
            m = keys[b * BLOCK]
            for j in range(b * BLOCK + 1, b * BLOCK + BLOCK):
                m = max(m, keys[j])
            maxima[b] = m
        for s in range(num_supers):
            m = maxima[s * BLOCK]
            for b in range(s * BLOCK + 1, s * BLOCK + BLOCK):
                m = max(m, maxima[b])
            supers[s] = m

        floor = _PAD
        if num_supers >= k:
            for s in range(num_supers):
                scratch[s] = (np.int64(supers[s]) << 32) | s
            floor = _kth_largest(scratch, num_supers, k) >> 32
        count = 0
        for b in range(len(maxima)):
            scratch[count] = (np.int64(maxima[b]) << 32) | b
            count += supers[b // BLOCK] >= floor
        threshold = _kth_largest(scratch, count, k) >> 32

        count = 0
        for s in range(num_supers):
            if supers[s] < threshold:
                continue
            for b in range(s * BLOCK, s * BLOCK + BLOCK):
                if maxima[b] >= threshold:
                    for j in range(b * BLOCK, b * BLOCK + BLOCK):
                        packed[count] = (np.int64(keys[j]) << 32) | (n - 1 - j)
                        count += keys[j] >= threshold  # padding is never counted
        _kth_largest(packed, count, k)
        top = packed[count - k : count]
        top.sort()
        for q in range(k):
            entry = top[k - 1 - q]
            key = np.int32(entry >> 32)
            out_bits[r, q] = key ^ ((key >> 31) & 0x7FFFFFFF)
            out_columns[r, q] = n - 1 - (entry & 0xFFFFFFFF)


@numba.njit(nogil=True, cache=True, inline="always")
def _kth_largest(a, count, k):
    """Reorders ``a[:count]`` so that ``a[count - k]`` is its k-th largest element, with the
    k largest after it, and returns that element (quickselect, median of three)."""
    target = count - k
    lo, hi = 0, count - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[mid] < a[hi]:
            a[mid], a[hi] = a[hi], a[mid]
        pivot = a[hi]  # the median of the three
        i = lo
        for j in range(lo, hi):  # branchless: a[lo:i] < pivot <= a[i:j]
            x = a[j]
            a[j] = a[i]
            a[i] = x
            i += x < pivot
        a[i], a[hi] = a[hi], a[i]
        if i == target:
            break
        if i < target:
            lo = i + 1
        else:
            hi = i - 1
    return a[target]
