import pytest
import torch
from torch import nn

from fedmoe.aggregate import combine
from fedmoe.modular import ModularModel
from fedmoe.outer import OuterOptimizer, Update


def two_param_grid(values):
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return ModularModel([[layer]])


def outer_gradient(start, end):
    """start - end per module and parameter, as workers compute it."""
    return {k: {n: start[k][n] - t for n, t in s.items()} for k, s in end.items()}


def test_two_parameter_outer_step_sign_and_arithmetic():
    """theta = [1, 2]; worker A (shard 1) ends at [0, 2], worker B (shard 3) ends at [1, 0]."""
    model = two_param_grid([1.0, 2.0])
    start = model.module_states()
    ends = [{"0.0": {"weight": torch.tensor([[0.0, 2.0]])}}, {"0.0": {"weight": torch.tensor([[1.0, 0.0]])}}]
    updates = [Update(outer_gradient(start, end), w) for end, w in zip(ends, (1.0, 3.0))]
    avg, _ = combine(updates)
    # weighted mean of [1, 0] (w=1) and [0, 2] (w=3): [0.25, 1.5]
    assert torch.allclose(avg["0.0"]["weight"], torch.tensor([[0.25, 1.5]]), atol=1e-6)
    outer = OuterOptimizer(model, lr=0.7, momentum=0.9, nesterov=True)
    outer.step(avg)
    # first Nesterov step: buf = g, update = g + 0.9 * buf = 1.9 g; theta -= 0.7 * 1.9 * g
    assert torch.allclose(
        model.levels[0][0].weight, torch.tensor([[1 - 1.33 * 0.25, 2 - 1.33 * 1.5]]), atol=1e-6
    )
    # second step with the same g: buf = 0.9 g + g = 1.9 g, update = g + 0.9 * 1.9 g = 2.71 g
    outer.step(avg)
    assert torch.allclose(
        model.levels[0][0].weight,
        torch.tensor([[1 - (1.33 + 0.7 * 2.71) * 0.25, 2 - (1.33 + 0.7 * 2.71) * 1.5]]),
        atol=1e-6,
    )


def test_plain_outer_sgd_with_lr_one_lands_on_the_average_of_end_points():
    model = two_param_grid([1.0, 2.0])
    start = model.module_states()
    ends = [{"0.0": {"weight": torch.tensor([[3.0, 0.0]])}}, {"0.0": {"weight": torch.tensor([[1.0, 4.0]])}}]
    outer = OuterOptimizer(model, lr=1.0, momentum=0.0, nesterov=False)
    outer.step(*combine([Update(outer_gradient(start, e), 1.0) for e in ends]))
    assert torch.allclose(model.levels[0][0].weight, torch.tensor([[2.0, 2.0]]))  # FedAvg


def test_modules_average_only_over_the_paths_that_hold_them():
    g = lambda v: {"w": torch.tensor([v])}  # noqa: E731
    updates = [Update({"0.0": g(1.0), "1.0": g(10.0)}, 1.0), Update({"0.0": g(3.0), "1.1": g(20.0)}, 1.0)]
    avg, _held = combine(updates)
    assert avg["0.0"]["w"].item() == 2.0  # shared module: mean over both paths
    assert avg["1.0"]["w"].item() == 10.0 and avg["1.1"]["w"].item() == 20.0  # each path alone


def test_untouched_modules_and_their_momentum_stay_put():
    model = ModularModel([[nn.Linear(2, 2), nn.Linear(2, 2)]])
    before = model.module_states()
    outer = OuterOptimizer(model)
    outer.step({"0.0": {n: torch.ones_like(t) for n, t in before["0.0"].items()}})
    after = model.module_states()
    assert all(torch.equal(before["0.1"][n], after["0.1"][n]) for n in before["0.1"])
    assert not torch.equal(before["0.0"]["weight"], after["0.0"]["weight"])
    assert all(p not in outer.sgd.state or not outer.sgd.state[p] for p in model.levels[0][1].parameters())


def test_bad_updates_are_rejected():
    model = two_param_grid([0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        OuterOptimizer(model).step({"0.0": {"weight": torch.zeros(3)}})
    with pytest.raises(ValueError, match="positive"):
        combine([Update({"0.0": {"weight": torch.zeros(1, 2)}}, 0.0)])
