"""Exact top-k over every item for a batch of users, fast on CPU.

Two costs dominate evaluation on CPU (batches of 500 users, top 100, one thread):
``torch.topk`` itself, 25 us a row on ml-1m's 2,810 items and 90 us on Gowalla's 40,981; and,
on a large catalog, the score product written whole. Gowalla's is 82 MB, past the caches, and
runs at ~44 GFLOPS against ~90 in slices of 1,024 items.

So the product is taken slice by slice (``top_k_of_product``), and the top k is found in rounds
of block maxima (``top_k``). The top k of a row lies in the k blocks of consecutive entries
that have the largest maxima. Proof: the k largest block maxima are k distinct entries, so
the row's k-th largest entry is at least the k-th largest block maximum ``t``. An entry of the
top k is then ``>= t``, hence so is its block's maximum, and only the top k blocks have a
maximum ``>= t`` (up to ties at ``t``). A round is one pass for the maxima (made while each
slice is still cached), a top k of the maxima, and a gather of the chosen blocks.
Gowalla: 40,981 entries, blocks of 32 give 3,200 candidates, blocks of 4 give 400, then
``torch.topk`` sorts the top 100 of those.

The values are ``torch.topk``'s, bit for bit. Among entries tied at the k-th value, the ones
picked may differ, as they may between any two top-k implementations. Off CPU, ``torch.topk``
runs on the whole matrix (one kernel on a GPU; no device here to measure more).

Where the CPU multiplies bf16 natively, the sliced product of a large catalog is taken in bf16
and its candidates rescored in fp32 instead (``bf16_candidates``: Gowalla 1.4x faster again).
The top k is then that of the rescored fp32 scores, which equal the fp32 product's up to its
rounding (each is summed in another order).
"""

from __future__ import annotations

import torch

from recoder_dist.training import bf16_candidates

# Block sizes of the rounds, each used where it pays (measured on random 500 x 40,981 and
# 500 x 2,810 scores, k 20 and 100: the largest gain, against torch.topk, of the pairs of sizes
# tried; on a trained Gowalla model (32, 4) and (32, 8) are within 1%).
BLOCKS = (32, 4)
SLICE = 1024  # items per slice of the product: 500 users x 1,024 floats (2 MB) stay cached


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` (values sorted, largest first) for a 2-D matrix."""
    num_items = scores.shape[1]
    if scores.device.type != "cpu" or not _round_sizes(num_items, k):
        return torch.topk(scores, k, dim=1)
    # The blocks are read in place: a padded copy (Gowalla: 82 MB) cost more than the rounds
    # save (trained Gowalla scores, 500 users: 66 ms with the copy, 32 without, torch.topk 41).
    block = BLOCKS[0]
    whole = num_items // block * block
    maxima = torch.empty((len(scores), -(-num_items // block)), dtype=scores.dtype)
    maxima[:, : whole // block] = scores[:, :whole].unflatten(1, (-1, block)).amax(2)
    if whole < num_items:
        maxima[:, -1] = scores[:, whole:].amax(1)  # the last block, short
    return _top_k_in_blocks(scores, k, num_items, maxima)


def top_k_of_product(
    codes: torch.Tensor,
    vectors: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    excluded_rows: torch.Tensor,
    excluded_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` of ``bias + codes @ vectors.T`` with the entries ``(excluded_rows[j],
    excluded_cols[j])`` set to -inf; on a large catalog, computed in slices of ``SLICE`` items."""
    num_users, num_items = len(codes), len(vectors)
    block = BLOCKS[0]
    if codes.device.type != "cpu" or not _round_sizes(num_items, k):
        scores = torch.addmm(bias, codes, vectors.t())
        scores[excluded_rows, excluded_cols] = -torch.inf
        return top_k(scores, k)

    slices = _slices(num_items, excluded_rows, excluded_cols)
    if bf16_candidates.applies(codes):
        return bf16_candidates.top_k_of_product(codes, vectors, bias, k, slices, block)
    scores = torch.empty((num_users, _padded_width(num_items)), dtype=codes.dtype)
    scores[:, num_items:] = -torch.inf
    maxima = torch.empty((num_users, scores.shape[1] // block), dtype=codes.dtype)
    minus_inf = torch.tensor(-torch.inf, dtype=codes.dtype)
    for lo, hi, rows, cols in slices:
        part = scores[:, lo:hi]
        torch.addmm(bias[lo:hi], codes, vectors[lo:hi].t(), out=part)
        part.index_put_((rows, cols - lo), minus_inf)
        width = -(-(hi - lo) // block) * block  # the last slice's padding joins its last block
        blocks = scores[:, lo : lo + width].unflatten(1, (-1, block))
        maxima[:, lo // block : (lo + width) // block] = blocks.amax(2)  # while still cached
    return _top_k_in_blocks(scores, k, num_items, maxima)


def _slices(num_items: int, excluded_rows, excluded_cols) -> list:
    """``(lo, hi, rows, cols)`` for each slice ``lo:hi`` of ``SLICE`` items: the excluded
    entries ``(rows[j], cols[j])`` that fall in it."""
    slice_of = excluded_cols // SLICE
    order = torch.argsort(slice_of, stable=True)
    excluded_rows, excluded_cols = excluded_rows[order], excluded_cols[order]
    ends = torch.bincount(slice_of, minlength=-(-num_items // SLICE)).cumsum(0).tolist()
    starts = [0] + ends[:-1]
    return [
        (lo, min(lo + SLICE, num_items), excluded_rows[start:end], excluded_cols[start:end])
        for lo, start, end in zip(range(0, num_items, SLICE), starts, ends)
    ]


def _round_sizes(width: int, k: int) -> list[int]:
    """The block sizes of the rounds for rows of ``width`` entries: a round pays when its
    candidates (k blocks) are at most a quarter of the entries before it. (Blocks of 4 alone
    over ml-1m's 2,810 items, k 100, beat torch.topk by a third on random scores but not on a
    trained model's: 25,200 against 25,800 users/s.)"""
    sizes = []
    for size in BLOCKS:
        if width < 4 * k * size:
            break
        sizes.append(size)
        width = k * size
    return sizes


def _padded_width(num_items: int) -> int:
    return -(-num_items // BLOCKS[0]) * BLOCKS[0]


def _top_k_in_blocks(scores, k: int, num_items: int, maxima):
    """Rounds of block selection, then ``torch.topk``. The first round picks the k blocks of
    ``BLOCKS[0]`` columns of ``scores`` with the largest ``maxima`` (a block that runs past the
    last column of ``scores`` reads -inf there; columns past ``num_items`` hold -inf)."""
    rows, width = scores.shape
    first, *later = _round_sizes(num_items, k)
    _, blocks = torch.topk(maxima, k, dim=1, sorted=False)
    positions = _block_columns(blocks, first)  # the column of scores that each value is
    if width % first == 0:  # the blocks tile each row: copy them whole
        values = _copy_blocks(scores, blocks, first)
    else:
        values = scores.gather(1, positions.clamp_max(width - 1))
        values.masked_fill_(positions >= width, -torch.inf)
    for size in later:
        _, blocks = torch.topk(values.unflatten(1, (-1, size)).amax(2), k, dim=1, sorted=False)
        values = _copy_blocks(values, blocks, size)
        positions = positions.gather(1, _block_columns(blocks, size))
    top_values, picked = torch.topk(values, k, dim=1)
    # A padding column is picked only at -inf, when a row has fewer than k finite scores.
    return top_values, positions.gather(1, picked).clamp_max_(num_items - 1)


def _block_columns(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """The columns of the blocks ``blocks`` (rows x k block numbers) of ``size`` columns."""
    return (blocks[:, :, None] * size + torch.arange(size)).flatten(1)


def _copy_blocks(values: torch.Tensor, blocks: torch.Tensor, size: int) -> torch.Tensor:
    """The blocks ``blocks`` of each row of ``values`` (a whole number of blocks wide), in
    order: rows x (k * size)."""
    rows = len(values)
    flat_blocks = (torch.arange(rows)[:, None] * (values.shape[1] // size) + blocks).view(-1)
    return values.reshape(-1, size).index_select(0, flat_blocks).view(rows, -1)
