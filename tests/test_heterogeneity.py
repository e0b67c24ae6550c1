"""Pruned and quantized clients: masks, wire sizes, aggregation over mixed variants, assignment."""

import copy

import pytest
import torch
from conftest import lm_grid, mlp_grid

from fedmoe.aggregate import aggregate
from fedmoe.assignment import DeviceProfile, assign_variant, parse_profiles, training_bytes
from fedmoe.compress.prune import (
    held_shape,
    held_values,
    hidden_layers,
    magnitude_masks,
    scatter_held,
    width_masks,
)
from fedmoe.compress.quant import ErrorFeedback, dequantize, fake_quantize, quantize, wire_bytes
from fedmoe.config import Config, InnerConfig, OuterConfig
from fedmoe.data import load_digits_split
from fedmoe.federation import LocalClient, run_federation
from fedmoe.modular import Path
from fedmoe.outer import OuterOptimizer
from fedmoe.spec import load_spec
from fedmoe.train import train_local
from fedmoe.worker import Upload, Variant, Worker, decode, deliver, make_job, round_masks, variant_bytes

DIGITS = load_spec("fedmoe.models.digits:spec")
TRAIN, _ = load_digits_split()


def mlp(hidden=8, grid=(1,)):
    return mlp_grid(grid, in_dim=4, hidden=hidden, depth=2, classes=3)


def run_round(model, variant, examples, inner, round=0, seed=0, feedback=None):
    """One client round on path (0,) of `model`, as every runner makes it:
    a job from the grid, the shared Worker.
    """
    path = Path((0,))
    worker = Worker(
        DIGITS,
        copy.deepcopy(model.compose(path)),
        examples.batches(16, seed),
        len(examples),
        variant,
        feedback=feedback,
    )
    return worker.train_round(make_job(model, path, variant, round, seed, inner))


def test_width_masks_slice_hidden_units_static_rolling_random():
    path = mlp().compose(Path((0,)))
    assert [(a, b) for a, _, b, _ in hidden_layers(path)] == [("0.0.0", "0.1.0"), ("0.1.0", "0.2")]
    static = width_masks(path, 0.5, "static")
    assert static["0.0.0.weight"].any(1).tolist() == [True] * 4 + [False] * 4  # rows = kept units
    assert static["0.0.0.bias"].tolist() == [True] * 4 + [False] * 4
    # the middle layer loses rows and columns; the head keeps its rows but only the kept columns
    assert (
        int(static["0.1.0.weight"].sum()) == 16
        and static["0.2.weight"].any(0).tolist() == [True] * 4 + [False] * 4
    )
    assert "0.2.bias" not in static and "0.0.0.weight" in static
    rolling = width_masks(path, 0.5, "rolling", round=6)
    assert rolling["0.0.0.bias"].nonzero().flatten().tolist() == [0, 1, 6, 7]  # units 6, 7, 8 % 8, 9 % 8
    random_a, random_b = (
        width_masks(path, 0.5, "random", round=1, seed=3),
        width_masks(path, 0.5, "random", round=2, seed=3),
    )
    assert not torch.equal(random_a["0.0.0.bias"], random_b["0.0.0.bias"])
    assert torch.equal(
        random_a["0.0.0.bias"], width_masks(path, 0.5, "random", round=1, seed=3)["0.0.0.bias"]
    )
    assert width_masks(path, 1.0) == {}
    with pytest.raises(ValueError):
        width_masks(path, 0.0)


def test_transformer_width_masks_touch_only_the_mlp_hidden_units():
    lm = lm_grid((1,), d_model=16, n_layers=1, n_heads=2, context=8).compose(Path((0,)))
    masks = width_masks(lm, 0.25, "static")
    assert sorted(masks) == ["0.1.mlp.0.bias", "0.1.mlp.0.weight", "0.1.mlp.2.weight"]
    assert int(masks["0.1.mlp.0.bias"].sum()) == 16  # a quarter of 4 x 16 hidden units


def test_magnitude_masks_keep_the_largest_weights():
    path = mlp().compose(Path((0,)))
    masks = magnitude_masks(path, 0.25)
    w, m = path[0][0][0].weight.detach(), masks["0.0.0.weight"]
    assert int(m.sum()) == w.numel() // 4
    assert w[m].abs().min() >= w[~m].abs().max()


def test_held_values_travel_as_a_submatrix_or_a_flat_vector():
    t = torch.arange(12.0).reshape(3, 4)
    rect = torch.zeros(3, 4, dtype=torch.bool)
    rect[[0, 2]] = torch.tensor([True, False, True, False])
    assert held_values(t, rect).tolist() == [[0.0, 2.0], [8.0, 10.0]] and held_shape(rect, t.shape) == (2, 2)
    ragged = torch.eye(3, 4, dtype=torch.bool)
    ragged[0, 1] = True
    assert held_values(t, ragged).tolist() == [0.0, 1.0, 5.0, 10.0] and held_shape(ragged, t.shape) == (4,)
    for mask in (rect, ragged):
        back = scatter_held(held_values(t, mask), mask, t.shape)
        assert torch.equal(back, t * mask)


def upload(path, variant, weight, values):
    """A hand-made upload: `values` gives the full-shaped delta per path parameter;
    only held coordinates travel.
    """
    model = GRID
    masks = round_masks(model.compose(path), variant, 0, 0)
    tensors = {n: quantize(held_values(v, masks.get(n)), variant.bits) for n, v in values.items()}
    return Upload(path, variant, 0, 0, weight, tensors, 0.0)


# two levels: a shared hidden layer (module 0.0) and two heads (1.0 and 1.1); in 2 -> hidden 2 -> 2 classes
GRID = mlp_grid((1, 2), in_dim=2, hidden=2, depth=1, classes=2)
V = 127 / 256  # exact in int8: the channel scale is 2**-8


def test_aggregate_mixed_masks_bits_and_a_client_that_holds_nothing_of_a_module():
    names = [n for n, _ in GRID.compose(Path((0, 0))).named_parameters()]
    assert names == ["0.0.0.weight", "0.0.0.bias", "1.0.weight", "1.0.bias"]
    ones = {n: torch.ones_like(p) for n, p in GRID.compose(Path((0, 0))).named_parameters()}
    full = upload(Path((0, 0)), Variant(32), 1.0, ones)  # fp32, dense, path through head 1.0
    # int8, unit 0 only, head 1.1
    half = upload(Path((0, 1)), Variant(8, 0.5, "static"), 3.0, {n: V * t for n, t in ones.items()})
    mean, held = aggregate(GRID, [full, half])
    shared = (1 * 1 + 3 * V) / 4
    assert torch.allclose(mean["0.0"]["0.0.weight"], torch.tensor([[shared, shared], [1.0, 1.0]]))
    assert torch.allclose(mean["0.0"]["0.0.bias"], torch.tensor([shared, 1.0]))
    assert torch.equal(mean["1.0"]["0.weight"], torch.ones(2, 2))  # only the fp32 client holds head 1.0
    # unit 1 was pruned away
    assert torch.allclose(mean["1.1"]["0.weight"], torch.tensor([[V, 0.0], [V, 0.0]]))
    assert held["1.1"]["0.weight"].tolist() == [[True, False], [True, False]] and held["1.1"]["0.bias"].all()
    model = copy.deepcopy(GRID)
    before = model.module_states()
    OuterOptimizer(model, lr=1.0, momentum=0.0).step(mean, held)
    after = model.module_states()
    # nobody held it: unchanged
    assert torch.equal(after["1.1"]["0.weight"][:, 1], before["1.1"]["0.weight"][:, 1])
    assert torch.allclose(after["1.1"]["0.weight"][:, 0], before["1.1"]["0.weight"][:, 0] - V)


def test_unheld_coordinates_keep_their_momentum_too():
    model = copy.deepcopy(GRID)
    outer = OuterOptimizer(model, lr=1.0, momentum=0.9)
    ones = {n: torch.ones_like(p) for n, p in model.compose(Path((0, 1))).named_parameters()}
    # momentum builds on every coordinate
    outer.step(*aggregate(model, [upload(Path((0, 1)), Variant(32), 1.0, ones)]))
    before = model.module_states()
    outer.step(*aggregate(model, [upload(Path((0, 1)), Variant(32, 0.5, "static"), 1.0, ones)]))
    after = model.module_states()
    assert torch.equal(after["1.1"]["0.weight"][:, 1], before["1.1"]["0.weight"][:, 1])
    assert not torch.equal(after["1.1"]["0.weight"][:, 0], before["1.1"]["0.weight"][:, 0])


def test_decode_rejects_uploads_that_do_not_match_the_variant():
    ones = {n: torch.ones_like(p) for n, p in GRID.compose(Path((0, 0))).named_parameters()}
    good = upload(Path((0, 0)), Variant(4, 0.5, "static"), 1.0, ones)
    wrong_shape = Upload(
        good.path, good.variant, 0, 0, 1.0, {**good.tensors, "1.0.weight": quantize(torch.ones(2, 2), 4)}, 0.0
    )
    with pytest.raises(ValueError, match="1.0.weight"):
        decode(GRID, wrong_shape)
    missing = Upload(
        good.path, good.variant, 0, 0, 1.0, {k: v for k, v in good.tensors.items() if k != "1.0.bias"}, 0.0
    )
    with pytest.raises(ValueError):
        decode(GRID, missing)


def test_int4_half_width_worker_sends_exactly_what_its_variant_costs():
    model = DIGITS.build((1,))
    variant = Variant(4, 0.5, "rolling")
    sent = run_round(model, variant, TRAIN.subset(range(200)), InnerConfig(steps=5), round=2)
    path_model = model.compose(Path((0,)))
    masks = round_masks(path_model, variant, 2, 0)
    assert sent.nbytes == variant_bytes(path_model, variant, masks)["upload"]
    assert sent.nbytes == sum(
        wire_bytes(held_shape(masks.get(n), p.shape), 4) for n, p in path_model.named_parameters()
    )
    fp32 = run_round(model, Variant(), TRAIN.subset(range(200)), InnerConfig(steps=5), round=2)
    assert fp32.nbytes == 4 * sum(p.numel() for p in path_model.parameters())
    assert sent.nbytes * 12 < fp32.nbytes  # int4 at half width
    update = decode(model, sent)
    for name, mask in update.masks["0.0"].items():
        assert (update.deltas["0.0"][name][~mask] == 0).all()  # nothing outside the sub-model moves


def test_a_quantized_worker_sends_the_change_of_the_weights_it_computed_with():
    """A 4-bit client's outer gradient ends at its fake-quantized weights,
    not at its latent full-precision copy.
    """
    model = DIGITS.build((1,))
    path_model = model.compose(Path((0,)))
    start = {n: dequantize(q) for n, q in deliver(path_model, Variant(4), {}).items()}
    # the outer gradient unquantized (32-bit error feedback), to see where it ends
    sent = run_round(
        model, Variant(4), TRAIN.subset(range(200)), InnerConfig(steps=20), feedback=ErrorFeedback(32)
    )
    matrices = [n for n, p in path_model.named_parameters() if p.dim() >= 2]
    for name in matrices:
        end = start[name] - dequantize(sent.tensors[name])
        assert not torch.equal(end, start[name])
        assert torch.allclose(end, fake_quantize(end, 4), atol=1e-6), f"{name} does not end on its 4-bit grid"


def test_one_fp32_worker_with_plain_outer_sgd_lands_on_its_own_end_point():
    """Pins the sign of the outer gradient end to end: start - end, stepped with lr 1 and no momentum."""
    inner = InnerConfig(steps=7, schedule="constant")
    reference = DIGITS.build((1,)).compose(Path((0,)))
    train_local(reference, TRAIN.batches(inner.batch_size, 0), inner)
    config = Config(grid=(1,), rounds=1, inner=inner, outer=OuterConfig(lr=1.0, momentum=0.0))
    model = run_federation(DIGITS, config, [LocalClient(TRAIN)]).engine.model
    for a, b in zip(model.compose(Path((0,))).parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_mixed_federation_trains_every_variant():
    history = []
    clients = [LocalClient(TRAIN, profile) for profile in ("fp32", "int8", "int4-p50", "fp32-p25")]
    config = Config(grid=(1,), rounds=3, inner=InnerConfig(steps=20))
    run_federation(DIGITS, config, clients, on_round=lambda engine, metrics, uploads: history.append(uploads))
    assert [u.variant.name for u in history[0]] == ["fp32", "int8", "int4-p50", "fp32-p25"]
    assert all(last.loss < first.loss for first, last in zip(history[0], history[-1]))


def test_assignment_picks_the_densest_variant_that_fits():
    path = GRID.compose(Path((0, 0)))  # 12 parameters: 2x2 + 2 + 2x2 + 2
    assert training_bytes(path, Variant(32)) == 12 * 4 + 12 * 20
    laptop = DeviceProfile("laptop", training_bytes(path, Variant(4, 0.5)), 4, (1.0, 0.5, 0.25))
    assert assign_variant(laptop, path) == Variant(4, 0.5)
    roomy = DeviceProfile("roomy", 10**9, 8, (1.0, 0.5))
    assert assign_variant(roomy, path) == Variant(8, 1.0)
    with pytest.raises(ValueError, match="cannot hold"):
        assign_variant(DeviceProfile("tiny", 10, 4, (0.25,)), path)
    assert parse_profiles("mixed") == ("fp32", "int8", "int4-p50", "fp32-p25") and parse_profiles("") == ()
    with pytest.raises(ValueError, match="unknown profile"):
        parse_profiles("fp32,gpu9000")
