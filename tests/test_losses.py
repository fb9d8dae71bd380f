"""build_loss and the reconstruction losses, against naive element-by-element sums."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recoder_dist.losses import build_loss

# Scores and targets: implicit feedback with counts and fractions, zeros included.
INPUT = torch.tensor(
    [[0.5, -1.25, 2.0, 0.0, 3.5], [-0.75, 1.5, -2.5, 0.25, 1.0], [4.0, -3.0, 0.125, 2.5, -0.5]],
    dtype=torch.float64,
)
TARGET = torch.tensor(
    [[1.0, 0.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.5, 1.0, 0.0], [2.0, 1.0, 0.0, 0.0, 1.0]],
    dtype=torch.float64,
)


def cells():
    for r in range(INPUT.shape[0]):
        for c in range(INPUT.shape[1]):
            yield r, float(INPUT[r, c]), float(TARGET[r, c])


def naive_mse(confidence: float) -> float:
    return sum((1 + confidence * (t > 0)) * (x - t) ** 2 for _, x, t in cells())


def naive_logistic(pos_weight: float = 1.0) -> float:
    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    return sum(
        -(pos_weight * t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))
        for _, x, t in cells()
    )


def naive_logloss() -> float:
    total = 0.0
    for r in range(INPUT.shape[0]):
        row = INPUT[r].tolist()
        log_norm = math.log(sum(math.exp(v) for v in row))
        total -= sum(t * (v - log_norm) for v, t in zip(row, TARGET[r].tolist()))
    return total


@pytest.mark.parametrize("confidence", [0.0, 3.0])
def test_mse_weights_observed_cells(confidence):
    """mse = sum over cells of (1 + confidence * [target > 0]) * (input - target)^2."""
    loss = build_loss("mse", {"confidence": confidence})(INPUT, TARGET)
    assert loss.shape == ()
    assert float(loss) == pytest.approx(naive_mse(confidence), rel=1e-12)


def test_mse_default_confidence_is_zero():
    """Without loss_params, mse is the plain summed squared error."""
    assert float(build_loss("mse")(INPUT, TARGET)) == pytest.approx(naive_mse(0.0), rel=1e-12)
    assert float(build_loss("mse", {})(INPUT, TARGET)) == pytest.approx(naive_mse(0.0), rel=1e-12)


def test_mse_hand_example():
    """A 1x2 example worked by hand: confidence 1 doubles the observed cell's squared error."""
    loss = build_loss("mse", {"confidence": 1.0})
    got = loss(torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert float(got) == 2 * (3 - 1) ** 2 + 1 * (1 - 0) ** 2  # 9


def test_logistic_is_summed_binary_cross_entropy():
    """logistic = sum of -(t log s(x) + (1 - t) log(1 - s(x))) over binary targets."""
    binary = (TARGET > 0).to(TARGET.dtype)
    got = build_loss("logistic")(INPUT, binary)
    expected = sum(
        -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
        for x, t in zip(INPUT.flatten().tolist(), binary.flatten().tolist())
    )
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_logistic_with_params():
    """loss_params reach BCEWithLogitsLoss (pos_weight scales the positive term)."""
    got = build_loss("logistic", {"pos_weight": torch.tensor(2.5, dtype=torch.float64)})
    assert float(got(INPUT, TARGET)) == pytest.approx(naive_logistic(2.5), rel=1e-12)
    assert float(build_loss("logistic")(INPUT, TARGET)) == pytest.approx(
        naive_logistic(), rel=1e-12
    )


def test_logloss_is_multinomial_nll():
    """logloss = -sum over rows of target . log_softmax(row)."""
    got = build_loss("logloss")(INPUT, TARGET)
    assert float(got) == pytest.approx(naive_logloss(), rel=1e-12)


def test_logloss_hand_example():
    """Two equal scores: log_softmax is -log 2 each, so a target of 3 costs 3 log 2."""
    got = build_loss("logloss")(torch.tensor([[0.7, 0.7]]), torch.tensor([[3.0, 0.0]]))
    assert float(got) == pytest.approx(3 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("name", ["mse", "logistic", "logloss"])
def test_losses_sum_over_users(name):
    """Each loss is a sum over rows: the batch loss equals the sum of per-row losses."""
    loss = build_loss(name)
    per_row = sum(float(loss(INPUT[r : r + 1], TARGET[r : r + 1])) for r in range(3))
    assert float(loss(INPUT, TARGET)) == pytest.approx(per_row, rel=1e-12)


def test_losses_give_gradients():
    """The built losses are differentiable: d mse / d input = 2 * w * (input - target)."""
    x = INPUT.clone().requires_grad_(True)
    build_loss("mse", {"confidence": 3.0})(x, TARGET).backward()
    weights = 1 + 3.0 * (TARGET > 0).to(TARGET.dtype)
    torch.testing.assert_close(x.grad, 2 * weights * (INPUT - TARGET), rtol=1e-12, atol=1e-12)


def test_module_passes_through():
    """A Module is returned as is (loss_params are then ignored)."""
    module = nn.L1Loss(reduction="sum")
    assert build_loss(module) is module
    assert build_loss(module, {"confidence": 2.0}) is module


def test_unknown_loss_name():
    """An unknown name raises ValueError naming it and the choices."""
    with pytest.raises(ValueError, match=r"'hinge'.*logistic.*logloss.*mse"):
        build_loss("hinge")


@pytest.mark.parametrize(
    "name, params",
    [("mse", {"confidance": 1.0}), ("logloss", {"confidence": 1.0}), ("logistic", {"bogus": 1})],
)
def test_bad_loss_params(name, params):
    """loss_params that the loss does not take raise ValueError naming loss and parameter."""
    key = next(iter(params))
    with pytest.raises(ValueError, match=rf"bad loss_params.*{key}.*{name}"):
        build_loss(name, params)


@pytest.mark.parametrize("loss, type_name", [(42, "int"), (None, "NoneType"), (nn.MSELoss, "type")])
def test_loss_of_wrong_type(loss, type_name):
    """Neither a name nor a Module instance: TypeError naming the type."""
    with pytest.raises(TypeError, match=type_name):
        build_loss(loss)


@pytest.mark.parametrize(
    "name, params", [("mse", {}), ("mse", {"confidence": 3.0}), ("logloss", {})]
)
def test_sparse_target_gives_the_dense_value_and_gradient(name, params):
    """A sparse COO target (what the trainer passes on CPU) costs and differentiates as the
    dense one: same naive value, same gradient."""
    loss = build_loss(name, params)
    assert loss.accepts_sparse_target
    naive = naive_logloss() if name == "logloss" else naive_mse(params.get("confidence", 0.0))
    grads = {}
    for layout, target in (("dense", TARGET), ("sparse", TARGET.to_sparse().coalesce())):
        x = INPUT.clone().requires_grad_(True)
        value = loss(x, target)
        value.backward()
        assert value.item() == pytest.approx(naive, rel=1e-12), layout
        grads[layout] = x.grad
    torch.testing.assert_close(grads["sparse"], grads["dense"], rtol=1e-12, atol=1e-12)


def naive_bpr(drawn: torch.Tensor) -> float:
    """BPR by a loop over the observed cells in row-major order, ``drawn[k]`` the columns drawn
    for the k-th; a drawn column that the row has is skipped."""
    total, k = 0.0, 0
    for r in range(INPUT.shape[0]):
        for c in range(INPUT.shape[1]):
            if TARGET[r, c] <= 0:
                continue
            for j in drawn[k].tolist():
                if TARGET[r, j] == 0:
                    margin = float(INPUT[r, c] - INPUT[r, j])
                    total += -math.log(1 / (1 + math.exp(-margin)))
            k += 1
    return total


@pytest.mark.parametrize("negatives", [1, 3])
def test_bpr_is_the_pairwise_loss_of_the_drawn_items(negatives):
    """BPRLoss against a loop over the same draws (the generator's stream replayed), dense
    and sparse targets alike; a drawn positive is left out."""
    loss = build_loss("bpr", {"negatives": negatives})
    observed = int((TARGET > 0).sum())
    for seed in range(5):
        torch.manual_seed(seed)
        drawn = torch.randint(0, INPUT.shape[1], (observed, negatives))
        expected = naive_bpr(drawn)
        for target in (TARGET, TARGET.to_sparse().coalesce()):
            torch.manual_seed(seed)
            assert loss(INPUT, target).item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="negatives must be >= 1"):
        build_loss("bpr", {"negatives": 0})


@pytest.mark.parametrize("confidence", [-5.0, float("nan"), float("inf"), "1"])
def test_mse_confidence_that_would_weigh_observed_cells_below_zero_is_refused(confidence):
    """1 + confidence weighs an observed cell: below -1 the loss falls without bound."""
    with pytest.raises(ValueError, match="confidence must be a finite number >= -1"):
        build_loss("mse", {"confidence": confidence})
    assert build_loss("mse", {"confidence": -1.0}).confidence == -1.0  # observed cells unweighed
