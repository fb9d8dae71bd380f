"""The bf16 candidate pass of evaluation: its rounding bound against measured errors, and the
exact top k on integer scores that bf16 cannot rank, against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recoder_dist.training import bf16_candidates
from recoder_dist.training import top_k as top_k_module
from recoder_dist.training.sparse_adam import RowwiseSparseAdam
from recoder_dist.training.top_k import top_k_of_product


def use_bf16_path(monkeypatch, width: int) -> None:
    """Takes the bf16 path here, also on a CPU without native bf16 products (slower there, and
    as exact), unless its bf16 products do not accumulate in fp32."""
    monkeypatch.setattr(bf16_candidates, "_native_bf16", lambda: True)
    if not bf16_candidates._accumulates_in_fp32(width):
        pytest.skip("this CPU's bf16 products do not accumulate in fp32: the bf16 path is off")
    assert bf16_candidates.applies(torch.zeros(1, width), 1280, 10)


def test_the_approximate_pass_against_the_whole_bf16_product(monkeypatch):
    """Products and block maxima, slice by slice, equal those of the whole product: 3,001
    items, slices of 1,024 (the last 953, not a whole number of blocks), masked entries."""
    use_bf16_path(monkeypatch, 16)
    generator = torch.Generator().manual_seed(5)
    codes = torch.randn(40, 16, generator=generator)
    vectors = torch.randn(3001, 16, generator=generator)
    bias = torch.randn(3001, generator=generator)
    rows = torch.randint(0, 40, (600,), generator=generator)
    cols = torch.randint(0, 3001, (600,), generator=generator)

    products, maxima = bf16_candidates._approximate(
        codes, vectors, bias, top_k_module._slices(3001, rows, cols)
    )

    whole = codes.bfloat16() @ vectors.bfloat16().t()
    whole[rows, cols] = -torch.inf
    expected = torch.full((40, 3008), -torch.inf, dtype=torch.bfloat16)
    expected[:, :3001] = whole
    assert torch.equal(products, expected)
    approx = F.pad(whole.float() + bias, (0, 7), value=-torch.inf)
    assert torch.equal(maxima, approx.unflatten(1, (-1, 32)).amax(2))


def test_margins_bound_the_measured_error():
    """|approx - rescored| over 300 users x 5,000 items, against each user's margin."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.tanh(torch.randn(300, 200, generator=generator))
    vectors = torch.randn(5000, 200, generator=generator) * 0.3
    bias = torch.randn(5000, generator=generator) * 3
    approx = (codes.bfloat16() @ vectors.bfloat16().t()).float() + bias
    rows = torch.arange(300).repeat_interleave(5000)
    items = torch.arange(5000).repeat(300)
    exact = bf16_candidates._rescore(codes, vectors, bias, rows, items).view(300, 5000)
    errors = (approx.double() - exact.double()).abs().amax(1)
    margins = bf16_candidates._margins(codes, vectors, bias)
    ratio = float((errors / margins).max())
    print("RATIO", ratio)
    assert ratio <= 1.0
    assert ratio > 0.05  # and not so loose that it keeps every item
    torch.testing.assert_close(exact, torch.addmm(bias, codes, vectors.t()), rtol=0, atol=1e-4)


def _integer_scores(num_users: int, num_items: int, seed: int):
    """Integer codes, vectors and bias whose dot products are exact in fp32 in any order
    (|c|, |v|, |b| < 1,024 and width 8: sums < 2^24), with the items' vectors a shared vector
    plus a small change: their scores differ by less than bf16 resolves."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1023, 1024, (num_users, 8), generator=generator).float()
    shared = torch.randint(-1000, 1001, (8,), generator=generator)
    vectors = (shared + torch.randint(-7, 8, (num_items, 8), generator=generator)).float()
    bias = torch.randint(-20, 21, (num_items,), generator=generator).float()
    return codes, vectors, bias


def test_exact_top_k_where_bf16_cannot_rank(monkeypatch):
    num_users, num_items, k = 40, 3001, 10  # three slices, the last 953 items
    use_bf16_path(monkeypatch, 8)
    codes, vectors, bias = _integer_scores(num_users, num_items, seed=1)
    generator = torch.Generator().manual_seed(2)
    rows = torch.randint(0, num_users, (900,), generator=generator)
    cols = torch.randint(0, num_items, (900,), generator=generator)
    exact = bias.double() + codes.double() @ vectors.double().t()
    exact[rows, cols] = -torch.inf
    expected = torch.topk(exact, k, dim=1).values

    values, items = top_k_of_product(codes, vectors, bias, k, rows, cols)

    assert torch.equal(values.double(), expected)
    assert torch.equal(exact.gather(1, items), expected)  # ties may pick other items
    # bf16 alone ranks these wrongly, so the margins are what makes this exact.
    approx = (codes.bfloat16() @ vectors.bfloat16().t()).float() + bias
    approx[rows, cols] = -torch.inf
    by_approx = exact.gather(1, torch.topk(approx, k, dim=1).indices)
    assert int((by_approx != expected).any(1).sum()) > num_users // 2


def test_exact_where_bf16_reverses_the_order(monkeypatch):
    """Codes and vectors just under 1 + 2^-8 all round down to 1 in bf16, so every approx
    product is 8 and the bias alone orders the approx scores: by ascending item. The exact
    scores descend. The exact top k (the first items) then sit 0.022 under the k-th largest
    block maximum, a fifth of the margin (0.095): a margin a tenth of it drops them."""
    num_items, k = 3001, 10
    use_bf16_path(monkeypatch, 8)
    codes = torch.full((3, 8), 1 + 2.0**-8 - 2.0**-20)
    steps = torch.arange(num_items, dtype=torch.float64) / num_items
    vectors = (1 + 2.0**-8 * (1 - steps - 1 / num_items)).float()[:, None].expand(-1, 8)
    bias = (0.025 * steps).float()
    exact = bias.double() + codes.double() @ vectors.double().t()
    assert bool((torch.diff(exact, dim=1) < 0).all())
    assert torch.equal(codes.bfloat16().float(), torch.ones(3, 8))

    values, items = top_k_of_product(
        codes, vectors, bias, k, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )

    # fp32 rescoring resolves ~2 ulps between neighbours, so allow the first 3k items.
    assert int(items.max()) < 3 * k
    torch.testing.assert_close(values.double(), exact[:, :k], rtol=0, atol=1e-5)


def test_users_with_fewer_items_than_k(monkeypatch):
    num_users, num_items, k = 6, 3001, 10
    use_bf16_path(monkeypatch, 8)
    codes, vectors, bias = _integer_scores(num_users, num_items, seed=3)
    all_but_four = torch.arange(4, num_items)
    rows = torch.cat(
        [torch.zeros(len(all_but_four), dtype=torch.long), torch.ones(num_items, dtype=torch.long)]
    )
    cols = torch.cat([all_but_four, torch.arange(num_items)])

    values, items = top_k_of_product(codes, vectors, bias, k, rows, cols)

    exact = bias.double() + codes.double() @ vectors.double().t()
    assert torch.equal(values[0, :4].double(), torch.sort(exact[0, :4], descending=True).values)
    assert bool(torch.isneginf(values[0, 4:]).all()) and bool(torch.isneginf(values[1]).all())
    assert sorted(items[0, :4].tolist()) == [0, 1, 2, 3]
    assert int(items.min()) >= 0 and int(items.max()) < num_items
    assert torch.equal(values[2:], torch.topk(exact[2:], k, dim=1).values.float())


def test_a_user_ranks_the_same_in_any_batch(monkeypatch):
    """The rescored scores of a user do not depend on who else is in the batch, bit for bit:
    N workers, which batch users differently, rank as one."""
    use_bf16_path(monkeypatch, 64)
    generator = torch.Generator().manual_seed(4)
    codes = torch.tanh(torch.randn(60, 64, generator=generator))
    vectors = torch.randn(4000, 64, generator=generator)
    bias = torch.randn(4000, generator=generator)
    rows = torch.randint(0, 60, (2000,), generator=generator)
    cols = torch.randint(0, 4000, (2000,), generator=generator)
    values, items = top_k_of_product(codes, vectors, bias, 20, rows, cols)

    chosen = (rows >= 10) & (rows < 17)
    part_values, part_items = top_k_of_product(
        codes[10:17], vectors, bias, 20, rows[chosen] - 10, cols[chosen]
    )

    assert torch.equal(part_values, values[10:17])
    assert torch.equal(part_items, items[10:17])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("step", ["in-place add", "RowwiseSparseAdam"])
def test_the_bf16_copy_follows_in_place_updates(step):
    """Also the sparse optimizer's, which writes the weights through numpy on CPU."""
    weights = torch.nn.Parameter(torch.randn(50, 8))
    optimizer = RowwiseSparseAdam([weights], lr=0.1)
    with torch.no_grad():
        before = bf16_candidates._bf16_copy(weights)
        assert bf16_candidates._bf16_copy(weights) is before  # reused batch after batch
    if step == "in-place add":
        with torch.no_grad():
            weights.add_(1.0)
    else:
        rows = torch.arange(0, 50, 2)
        weights.grad = torch.sparse_coo_tensor(rows[None], torch.ones(25, 8), (50, 8))
        optimizer.step()
    after = bf16_candidates._bf16_copy(weights)
    assert torch.equal(after, weights.detach().bfloat16())
    assert not torch.equal(after, before)


def test_the_path_is_fp32_scores_only_on_a_large_catalog(monkeypatch):
    monkeypatch.setattr(bf16_candidates, "_native_bf16", lambda: True)
    assert not bf16_candidates.applies(torch.zeros(3, 8, dtype=torch.float64), 1280, 10)
    assert not bf16_candidates.applies(torch.zeros(3, 8), 1279, 10)  # 10 blocks of 32: > 1/4
