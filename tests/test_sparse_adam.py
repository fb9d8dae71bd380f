"""RowwiseSparseAdam against torch.optim.SparseAdam: the same updates, bit for bit."""

from __future__ import annotations

import pytest
import torch

from recoder_dist.training.worker.sparse_adam import RowwiseSparseAdam

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

ROWS, DIM = 50, 6


def sparse_grad(generator, rows, dim=DIM) -> torch.Tensor:
    """An uncoalesced sparse gradient: ``rows`` may repeat and come in any order."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    values = torch.randn(len(rows), dim, generator=generator)
    return torch.sparse_coo_tensor(rows[None], values, (ROWS, dim))


def gradient_sequence(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(12):
        if step == 4:
            rows = []  # an empty gradient: torch counts the step and updates nothing
        elif step == 7:
            rows = [3, 3, 3, 9, 3]  # duplicates are summed before the update
        elif step == 8:
            rows = [2, 2, 5, 40]  # sorted, yet not distinct
        elif step in (9, 10):
            rows = [1, 4, 7, 30, 49]  # sorted and distinct, as an embedding lookup of the items
        elif step in (5, 11):
            # Every row: in order, as an ml-1m batch's items, and reversed with a duplicate,
            # which coalescing turns into every row.
            rows = list(range(ROWS)) if step == 11 else [0, *reversed(range(ROWS))]
        else:
            rows = torch.randint(0, ROWS, (20,), generator=generator).tolist()
        steps.append(sparse_grad(generator, rows))
    return steps


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Bit for bit with torch's operations."""
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "options",
    [dict(lr=1e-3), dict(lr=0.05, betas=(0.5, 0.9), eps=1e-4), dict(lr=0.01, maximize=True)],
)
def test_same_weights_and_state_as_torch_sparse_adam(options):
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    params = {
        cls: torch.nn.Parameter(start.clone())
        for cls in (torch.optim.SparseAdam, RowwiseSparseAdam)
    }
    optimizers = {cls: cls([p], **options) for cls, p in params.items()}
    for grad in gradient_sequence(seed=2):
        for cls, param in params.items():
            param.grad = grad.clone()
            optimizers[cls].step()
    ours, theirs = params[RowwiseSparseAdam], params[torch.optim.SparseAdam]
    assert not torch.equal(ours, start)
    assert_same(ours, theirs)
    our_state = optimizers[RowwiseSparseAdam].state[ours]
    their_state = optimizers[torch.optim.SparseAdam].state[theirs]
    assert our_state["step"] == their_state["step"] == 12
    for key in ("exp_avg", "exp_avg_sq"):  # no square root in the moments: bit for bit
        assert torch.equal(our_state[key], their_state[key]), key


@pytest.mark.parametrize(
    "first, second",
    [(RowwiseSparseAdam, torch.optim.SparseAdam), (torch.optim.SparseAdam, RowwiseSparseAdam)],
)
def test_a_run_resumed_with_the_other_optimizer_ends_where_one_run_does(first, second):
    """Snapshots written by either optimizer resume with the other: 6 steps, then its
    state_dict into the other for 6 more, give exactly the weights of 12 uninterrupted steps."""
    grads = gradient_sequence(seed=3)
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(4))
    resumed, uninterrupted = (torch.nn.Parameter(start.clone()) for _ in range(2))
    one_run = torch.optim.SparseAdam([uninterrupted], lr=0.02)
    optimizer = first([resumed], lr=0.02)
    for step, grad in enumerate(grads):
        if step == 6:
            state = optimizer.state_dict()
            optimizer = second([resumed], lr=0.02)
            optimizer.load_state_dict(state)
        for param, opt in ((resumed, optimizer), (uninterrupted, one_run)):
            param.grad = grad.clone()
            opt.step()
    assert_same(resumed, uninterrupted)


def test_a_step_counts_as_an_in_place_change():
    """Every update bumps the version counters: autograd's check of saved tensors sees it as
    it sees torch's in-place operations."""
    param = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    optimizer = RowwiseSparseAdam([param])
    param.grad = sparse_grad(torch.Generator().manual_seed(6), [1, 4])
    before = param._version
    optimizer.step()
    assert param._version > before
    assert bool(param[[1, 4]].ne(0).all()) and not bool(param[0].any())


def test_dense_gradient_is_refused():
    param = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    optimizer = RowwiseSparseAdam([param])
    param.grad = torch.ones(ROWS, DIM)
    with pytest.raises(RuntimeError, match="dense gradients"):
        optimizer.step()


def test_gradient_sparse_in_two_dimensions_is_refused():
    """Only row-sparse gradients (embedding tables) are updated row by row."""
    param = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    optimizer = RowwiseSparseAdam([param])
    param.grad = torch.eye(ROWS, DIM).to_sparse()
    with pytest.raises(ValueError, match="sparse in 2 dimensions"):
        optimizer.step()
