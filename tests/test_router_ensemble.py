import numpy as np
import pytest
import torch
from torch import nn

from fedmoe.ensemble import Ensemble
from fedmoe.models.lm import byte_transformer_levels
from fedmoe.modular import ModularModel, Path
from fedmoe.router import CentroidRouter, LearnedRouter, router_from_state, shard_labels
from fedmoe.spec import Spec, load_spec


def blobs(n_per=50, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = np.concatenate([c + rng.normal(scale=0.5, size=(n_per, 2)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(3), n_per), centres


def test_centroid_router_is_a_softmax_of_negative_squared_distance():
    router = CentroidRouter(np.array([[0.0, 0.0], [1.0, 0.0]]), temperature=0.5)
    p = router.probs(torch.tensor([[0.25, 0.0]]))
    expected = torch.softmax(torch.tensor([-(0.25**2) / 0.5, -(0.75**2) / 0.5]), -1)
    assert torch.allclose(p[0], expected)
    assert torch.allclose(p.sum(-1), torch.ones(1))
    with pytest.raises(ValueError):
        CentroidRouter(np.zeros((2, 2)), temperature=0)


def test_routers_find_the_right_shard_and_survive_a_save():
    x, y, centres = blobs()
    centroid = CentroidRouter(centres)
    assert (centroid.probs(torch.as_tensor(x)).argmax(-1).numpy() == y).mean() > 0.98
    torch.manual_seed(0)
    learned = LearnedRouter(2, 3, hidden=16)
    assert learned.fit(x, y, steps=300) > 0.95
    for router in (centroid, learned):
        again = router_from_state(router.config(), router.tensors())
        assert torch.allclose(again.probs(torch.as_tensor(x)), router.probs(torch.as_tensor(x)))


def test_shard_labels_cover_every_unit():
    assert shard_labels([np.array([0, 2]), np.array([1])], 3).tolist() == [0, 1, 0]
    with pytest.raises(ValueError):
        shard_labels([np.array([0])], 2)


class Constant(nn.Module):
    """An 'expert' that always predicts the same logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def constant_ensemble(centres):
    model = ModularModel([[Constant([5.0, 0.0, 0.0]), Constant([0.0, 5.0, 0.0]), Constant([0.0, 0.0, 5.0])]])
    return Ensemble(
        Spec("constant", [lambda: Constant([0.0, 0.0, 0.0])]),
        model,
        model.paths(),
        CentroidRouter(centres, temperature=1.0),
    )


def test_topk_mixture_runs_only_the_chosen_experts_and_mixes_by_renormalised_router_weights():
    _, _, centres = blobs()
    ensemble = constant_ensemble(centres)
    features = torch.tensor([[0.2, 0.1], [5.1, 0.0], [0.3, 4.0]], dtype=torch.float32)
    top1 = ensemble.predict(torch.zeros(3, 1), top_k=1, features=features)
    assert top1.experts[:, 0].tolist() == [0, 1, 2]
    assert torch.allclose(top1.weights, torch.ones(3, 1))
    assert torch.allclose(top1.outputs[0], torch.softmax(torch.tensor([5.0, 0.0, 0.0]), -1))
    full = ensemble.predict(torch.zeros(3, 1), features=features)
    route = ensemble.router.probs(features)
    expert_probs = torch.softmax(torch.eye(3) * 5.0, -1)
    assert torch.allclose(full.outputs, route @ expert_probs, atol=1e-6)
    top2 = ensemble.predict(torch.zeros(3, 1), top_k=2, features=features)
    assert torch.allclose(top2.weights.sum(-1), torch.ones(3)) and top2.experts.shape == (3, 2)
    with pytest.raises(ValueError, match="top_k"):
        ensemble.predict(torch.zeros(3, 1), top_k=4, features=features)


def tiny_lm() -> Spec:
    return Spec(
        "tiny-lm",
        byte_transformer_levels(d_model=32, n_layers=1, n_heads=2, context=8),
        featurize=lambda x: torch.stack([(x < 128).float().mean(1), (x >= 128).float().mean(1)], 1),
    )


TINY_LM = tiny_lm()


def test_ensemble_of_sequence_outputs_mixes_per_sequence(tmp_path):
    spec = load_spec("test_router_ensemble:TINY_LM")
    model = spec.build((2,), seed=3)
    ensemble = Ensemble(spec, model, model.paths(), CentroidRouter(np.eye(2, dtype=np.float32)))
    x = torch.randint(0, 256, (4, 8))
    out = ensemble.predict(x).outputs
    assert out.shape == (4, 8, 256) and torch.allclose(out.sum(-1), torch.ones(4, 8), atol=1e-5)
    ensemble.save(tmp_path / "ens")
    again = Ensemble.load(tmp_path / "ens")
    assert again.paths == [Path((0,)), Path((1,))] and again.spec.ref == "test_router_ensemble:TINY_LM"
    # identical outputs after a reload, through the recorded spec
    assert torch.equal(again.predict(x).outputs, out)
    for k in (1, 2):
        assert torch.equal(again.predict(x, top_k=k).experts, ensemble.predict(x, top_k=k).experts)


def test_an_ensemble_of_a_spec_without_an_import_string_says_how_to_save_it(tmp_path):
    model = TINY_LM.build((2,))
    with pytest.raises(ValueError, match="load_spec"):
        Ensemble(TINY_LM, model, model.paths(), CentroidRouter(np.eye(2, dtype=np.float32))).save(
            tmp_path / "ens"
        )


def test_loading_a_checkpoint_through_another_spec_names_the_differences(tmp_path):
    spec = load_spec("test_router_ensemble:TINY_LM")
    model = spec.build((2,))
    Ensemble(spec, model, model.paths(), CentroidRouter(np.eye(2, dtype=np.float32))).save(tmp_path / "ens")
    with pytest.raises(ValueError, match="do not fit spec"):
        Ensemble.load(tmp_path / "ens", spec="fedmoe.models.bible:spec")


def test_values_mix_linearly():
    spec = Spec("values", [lambda: nn.Linear(2, 2)], mix="values")
    model = spec.build((2,))
    router = CentroidRouter(np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32), temperature=1.0)
    x = torch.tensor([[0.2, 0.4]])
    mixed = Ensemble(spec, model, model.paths(), router).predict(x).outputs
    w = router.probs(x)[0]
    with torch.no_grad():
        expected = w[0] * model.module("0.0")(x) + w[1] * model.module("0.1")(x)
    assert torch.allclose(mixed, expected, atol=1e-6)
