"""Exact top k of ``bias + codes @ vectors.T`` from a bf16 product and fp32 rescoring, on CPU.

On a large catalog the fp32 product is most of evaluation's time (Gowalla, 500 users x 40,981
items x 200: 84 of 120 ms a batch, at ~100 GFLOPS on one core). A CPU with avx512_bf16 runs
the same product in bf16 in 40 ms. Its scores are approximate, so they only pick candidates:

1. ``approx`` = the bf16 product plus the fp32 bias. ``_margins`` bounds ``|approx - exact|``
   by ``m`` per user, where ``exact`` is the fp32 score that ``_rescore`` computes.
2. Let ``t`` be a user's k-th largest approx score. The k items that reach ``t`` have exact
   scores ``>= t - m``, so the exact k-th largest is ``>= t - m``, and each item of the exact
   top k has an approx score ``>= t - 2m``. The k-th largest maximum over blocks of 32 items
   is ``<= t`` (k distinct entries reach it), so thresholding there keeps them all.
3. Those candidates (Gowalla, trained model: ~370 a user, against 40,981) are rescored in fp32
   and ``torch.topk`` picks among them.

Only the bf16 products are kept whole (half the traffic of fp32 scores, which do not fit in
cache); the approx scores are made per slice for the block maxima, and again, with the same
operations and so the same bits, for the blocks that reach the threshold.

The bound, for one score, with ``S = sum_j |c_j v_j| <= |c| |v|`` (Cauchy-Schwarz) and unit
roundoffs ``u = 2^-8`` (bf16) and ``w = 2^-24`` (fp32), ``g = d w / (1 - d w)``:
rounding ``c`` and ``v`` to bf16 moves the product by ``(2u + u^2) S`` (bf16 products are
exact in fp32); summing ``d`` terms in fp32, in any order, by ``g (1+u)^2 S``; writing the
result as bf16 by ``u`` of its size; adding the bias in fp32 by ``w (|b| + 2S)``. The fp32
rescoring errs by ``g S + w (|b| + 2S)``. Together: ``(3u + 4u^2 + 3g + 4w) S + 2w |b|``,
plus ``d 2^-125`` for subnormals the bf16 kernel flushes to zero. It assumes the kernel
accumulates in fp32, as oneDNN's avx512_bf16 kernels do; ``applies`` checks that once per
width with a product whose fp32 and bf16 accumulations differ, and otherwise declines.
On a trained Gowalla model the largest error was 0.35 of this bound taken per item (``|c| |v|``
for each item); the row-wise bound used here (the largest ``|v|``) is looser still.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import numpy as np
import torch

BF16_ROUNDOFF = 2.0**-8
FP32_ROUNDOFF = 2.0**-24
ENABLED = True  # False: score with the fp32 product only (the same top k, slower)
BLOCK = 32  # items a block of the approx scores' maxima


def applies(codes: torch.Tensor, num_items: int, k: int) -> bool:
    """Whether the bf16 pass is on, exact and worth it here: fp32 scores, a CPU with native
    bf16 products, and a catalog where the k blocks that reach the threshold are at most a
    quarter of the items."""
    return (
        ENABLED
        and num_items >= 4 * k * BLOCK
        and codes.device.type == "cpu"
        and codes.dtype == torch.float32
        and _native_bf16()
        and _accumulates_in_fp32(codes.shape[1])
    )


def top_k_of_product(codes, vectors, bias, k: int, slices: list):
    """The top k (values, items) of the exact scores ``bias + codes @ vectors.T``.

    ``slices``: ``(lo, hi, rows, cols)`` for consecutive slices of items (each a whole number
    of blocks of ``BLOCK`` items, but the last), with the entries ``(rows, cols)`` to exclude.
    """
    products, maxima = _approximate(codes, vectors, bias, slices)
    padded_bias = torch.zeros(products.shape[1], dtype=bias.dtype)
    padded_bias[: len(bias)] = bias
    thresholds = _minus(_kth_largest(maxima, k), 2 * _margins(codes, vectors, bias))
    rows, items = _entries_at_least(products, padded_bias, maxima, thresholds)
    scores = _rescore(codes, vectors, bias, rows, items)
    padded, positions = _padded_rows(rows, scores, len(codes), k)
    padded_items = torch.zeros(padded.shape, dtype=torch.long)
    padded_items[rows, positions] = items
    top_values, picked = torch.topk(padded, k, dim=1)
    # A padding column is picked only at -inf, when a row has fewer than k finite scores.
    return top_values, padded_items.gather(1, picked)


def _approximate(codes, vectors, bias, slices: list):
    """The bf16 products (users x items padded to whole blocks; excluded entries and padding
    at -inf) and the maxima of the approx scores over blocks (step 1)."""
    num_users, num_items = len(codes), len(vectors)
    width = _whole_blocks(num_items)
    products = torch.empty((num_users, width), dtype=torch.bfloat16)
    products[:, num_items:] = -torch.inf
    maxima = torch.empty((num_users, width // BLOCK))
    scratch = torch.empty((num_users, _whole_blocks(slices[0][1] - slices[0][0])))
    codes16, vectors16 = codes.bfloat16(), _bf16_copy(vectors)
    minus_inf = torch.tensor(-torch.inf, dtype=torch.bfloat16)
    for lo, hi, rows, cols in slices:
        product = products[:, lo:hi]
        torch.mm(codes16, vectors16[lo:hi].t(), out=product)
        product.index_put_((rows, cols - lo), minus_inf)
        span = _whole_blocks(hi - lo)  # the last slice's padding joins its last block
        approx = scratch[:, :span]
        approx[:, hi - lo :] = -torch.inf
        approx[:, : hi - lo].copy_(product).add_(bias[lo:hi])  # bf16 to fp32 is exact
        maxima[:, lo // BLOCK : (lo + span) // BLOCK] = approx.unflatten(1, (-1, BLOCK)).amax(2)
    return products, maxima


def _whole_blocks(width: int) -> int:
    """``width`` rounded up to a whole number of blocks."""
    return -(-width // BLOCK) * BLOCK


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th largest value (numpy's introselect: 1.5x as fast as torch.topk on
    Gowalla's 500 x 1,281 block maxima)."""
    width = values.shape[1]
    return torch.from_numpy(np.partition(values.numpy(), width - k, axis=1)[:, width - k])


def _margins(codes, vectors, bias) -> torch.Tensor:
    """Per row, a bound on ``|approx - exact|`` over all items (module docstring), in float64."""
    width = codes.shape[1]
    accumulation = width * FP32_ROUNDOFF / (1 - width * FP32_ROUNDOFF)
    u, w = BF16_ROUNDOFF, FP32_ROUNDOFF
    relative = 3 * u + 4 * u * u + 3 * accumulation + 4 * w
    largest_sum = codes.double().norm(dim=1) * _vector_norms(vectors).max()
    bound = relative * largest_sum + 2 * w * float(bias.abs().max()) + width * 2.0**-125
    return bound * (1 + 2.0**-20)  # room for the rounding of the norms


def _minus(values: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """``values - margins`` rounded down to float32, so a comparison never drops a candidate."""
    lower = (values.double() - margins).float()
    return torch.nextafter(lower, torch.tensor(-torch.inf))


def _entries_at_least(products, padded_bias, maxima, thresholds):
    """``(rows, items)`` of the finite approx scores ``>= thresholds[row]``, row by row. Only
    the blocks whose maximum reaches the threshold are read."""
    thresholds = thresholds.clamp_min(torch.finfo(maxima.dtype).min)  # -inf never passes
    block_rows, blocks = (maxima >= thresholds[:, None]).nonzero(as_tuple=True)
    flat_blocks = block_rows * maxima.shape[1] + blocks
    entries = products.view(-1, BLOCK).index_select(0, flat_blocks).float()
    entries += padded_bias.view(-1, BLOCK).index_select(0, blocks)
    kept = entries >= thresholds.index_select(0, block_rows)[:, None]
    flat = torch.from_numpy(np.flatnonzero(kept.numpy()))  # 2x torch's nonzero here
    which = flat // BLOCK
    items = blocks.index_select(0, which) * BLOCK + flat % BLOCK
    return block_rows.index_select(0, which), items


def _padded_rows(rows, values, num_rows: int, min_width: int):
    """Ragged ``values`` (grouped by row, ``rows`` ascending) as a ``num_rows`` x width matrix
    padded with -inf, at least ``min_width`` wide, and each value's column."""
    counts = torch.bincount(rows, minlength=num_rows)
    width = max(int(counts.max()) if len(rows) else 0, min_width)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(len(rows)) - starts[rows]
    padded = torch.full((num_rows, width), -torch.inf, dtype=values.dtype)
    padded[rows, positions] = values
    return padded, positions


def _rescore(codes, vectors, bias, rows, items) -> torch.Tensor:
    """fp32 ``codes[rows] . vectors[items] + bias[items]`` (``rows`` ascending), by
    ``torch.sparse.sampled_addmm``: one vectorized dot a pair, summed in an order that depends
    on the width only, so a user's scores do not depend on the batch (N workers rank as one).
    5x faster here than gathering the vectors and summing their products."""
    counts = torch.bincount(rows, minlength=len(codes))
    row_starts = torch.zeros(len(codes) + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=row_starts[1:])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pairs = torch.sparse_csr_tensor(
            row_starts, items, bias[items], size=(len(codes), len(vectors)), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pairs, codes, vectors.t()).values()


# One cached bf16 copy: evaluation scores every batch against the same weights.
_cache: dict = {}


def _bf16_copy(vectors: torch.Tensor) -> torch.Tensor:
    return _cached(vectors)[0]


def _vector_norms(vectors: torch.Tensor) -> torch.Tensor:
    return _cached(vectors)[1]


def _cached(vectors: torch.Tensor):
    """(bf16 copy, float64 row norms) of ``vectors``, kept while the same tensor is unchanged
    (same object, same in-place version): the weights, batch after batch."""
    entry = _cache.get("vectors")
    if entry is None or entry[0]() is not vectors or entry[1] != vectors._version:
        copies = (vectors.detach().bfloat16(), vectors.detach().double().norm(dim=1))
        entry = (weakref.ref(vectors), vectors._version, copies)
        _cache["vectors"] = entry
    return entry[2]


def _native_bf16() -> bool:
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(supported and supported())


@functools.cache
def _accumulates_in_fp32(width: int) -> bool:
    """A 1 then ``width - 1`` entries of 2^-8, dotted with ones: fp32 accumulation gives
    ``1 + (width - 1) 2^-8``; bf16 accumulation loses every 2^-8 against the 1."""
    row = torch.full((width,), 2.0**-8)
    row[0] = 1.0
    codes = row.expand(64, width).bfloat16()
    vectors = torch.ones((1024, width), dtype=torch.bfloat16)
    product = torch.mm(codes, vectors.t()).float()
    expected = 1 + (width - 1) * 2.0**-8
    return bool(((product - expected).abs() <= BF16_ROUNDOFF * expected).all())
