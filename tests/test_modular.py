import pytest
import torch
from conftest import lm_grid, mlp_grid
from torch import nn

from fedmoe.modular import ModularModel, Path, flatten_states, unflatten_states
from fedmoe.spec import Spec, load_spec


def test_grid_paths_and_composition_share_modules():
    model = mlp_grid((2, 3), depth=3)
    assert model.grid == (2, 3)
    assert len(model.paths()) == 6 and model.paths()[0] == Path((0, 0))
    a, b = model.compose(Path((1, 0))), model.compose(Path((1, 2)))
    assert a[0] is b[0] and a[1] is not b[1]  # module 1 of level 0 is shared, level 1 differs
    assert a(torch.rand(5, 64)).shape == (5, 10)


def test_modules_start_different_and_builds_are_reproducible():
    model = mlp_grid((3,), seed=1)
    w = [model.module(f"0.{i}")[0][0].weight for i in range(3)]
    assert not torch.equal(w[0], w[1])
    again = mlp_grid((3,), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(model.parameters(), again.parameters()))


def test_compose_rejects_paths_outside_the_grid():
    model = mlp_grid((2, 2))
    with pytest.raises(ValueError, match="level 1 has modules 0..1"):
        model.compose(Path((0, 2)))
    with pytest.raises(ValueError, match="levels"):
        model.compose(Path((0,)))


def test_load_module_states_changes_only_the_named_module():
    model = mlp_grid((2, 2))
    before = model.module_states()
    model.load_module_states({"0.1": {n: t + 1 for n, t in before["0.1"].items()}})
    after = model.module_states()
    assert all(torch.equal(after["0.1"][n], before["0.1"][n] + 1) for n in before["0.1"])
    assert all(torch.equal(after[k][n], before[k][n]) for k in ("0.0", "1.0", "1.1") for n in before[k])


def test_flatten_roundtrip_and_path_parse():
    model = lm_grid((2, 1), d_model=32, n_layers=2, n_heads=2, context=16)
    states = model.module_states()
    assert unflatten_states(flatten_states(states)).keys() == states.keys()
    assert Path.parse(str(Path((3, 0, 12)))) == Path((3, 0, 12))


def test_byte_lm_is_causal():
    lm = lm_grid((1,), d_model=32, n_layers=2, n_heads=2, context=16).compose(Path((0,))).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(lm(x)[0, :10], lm(y)[0, :10], atol=1e-6)
        assert not torch.allclose(lm(x)[0, 10:], lm(y)[0, 10:])


def test_a_spec_of_fixed_levels_builds_any_number_of_modules_per_level():
    spec = Spec("two-level", [lambda: nn.Linear(4, 8), lambda: nn.Linear(8, 3)])
    model = spec.build((3, 2), seed=5)
    assert model.grid == (3, 2) and model.compose(Path((2, 1)))(torch.rand(2, 4)).shape == (2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), spec.build((3, 2), seed=5).parameters()))
    with pytest.raises(ValueError, match="give a grid of 2 number"):
        spec.build((4,))
    with pytest.raises(ValueError):
        ModularModel([])


def test_specs_are_named_by_import_string():
    spec = load_spec("fedmoe.models.digits:spec")
    assert spec.ref == "fedmoe.models.digits:spec" and spec.name == "digits"
    with pytest.raises(ValueError, match="package.module:attr"):
        load_spec("fedmoe.models.digits")
    with pytest.raises(ValueError, match="cannot import"):
        load_spec("no_such_package.mod:spec")
    with pytest.raises(ValueError, match="no attribute"):
        load_spec("fedmoe.models.digits:nope")
    with pytest.raises(ValueError, match="not a fedmoe.Spec"):
        load_spec("fedmoe.models.digits:client_data")
