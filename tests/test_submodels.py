"""Width sub-models are real: a pruned client builds and trains sliced layers (d of the hidden units), and the
coordinator maps its update back into the full grid."""

import copy

import torch
from torch.nn.utils import parametrize

from fedmoe.compress.prune import reheld, width_masks, width_slices
from fedmoe.config import Config, InnerConfig, OuterConfig, RoutingConfig
from fedmoe.data import load_digits_split
from fedmoe.engine import Engine
from fedmoe.federation import LocalClient, enrol
from fedmoe.memory import measure_round
from fedmoe.modular import Path
from fedmoe.spec import load_spec
from fedmoe.train import train_local
from fedmoe.worker import Restrict, Variant, Worker, make_job

DIGITS = load_spec("fedmoe.models.digits:spec")  # 64 -> 32 -> 32 -> 10
TRAIN, _ = load_digits_split()
FULL_SHAPES = {
    "0.0.0.weight": (32, 64),
    "0.0.0.bias": (32,),
    "0.1.0.weight": (32, 32),
    "0.1.0.bias": (32,),
    "0.2.weight": (10, 32),
    "0.2.bias": (10,),
}
QUARTER_SHAPES = {
    "0.0.0.weight": (8, 64),
    "0.0.0.bias": (8,),
    "0.1.0.weight": (8, 8),
    "0.1.0.bias": (8,),
    "0.2.weight": (10, 8),
    "0.2.bias": (10,),
}


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_a_quarter_width_client_trains_a_quarter_of_the_hidden_units_aggregated_with_full_width_ones():
    inner = InnerConfig(steps=5, schedule="constant")
    config = Config(
        grid=(1,),
        rounds=1,
        inner=inner,
        outer=OuterConfig(lr=1.0, momentum=0.0),  # the new weights are the start minus the mean update
        routing=RoutingConfig(assign="turn"),
    )
    engine = Engine(DIGITS, config)
    start = copy.deepcopy(engine.model.compose(Path((0,))))
    halves = (TRAIN.subset(range(600)), TRAIN.subset(range(600, 1000)))
    clients = [LocalClient(halves[0], "fp32"), LocalClient(halves[1], "fp32-p25")]
    ids, workers = enrol(engine, clients)
    dense, quarter = workers
    assert quarter.variant.sliced and not dense.variant.sliced
    assert shapes(quarter.model) == QUARTER_SHAPES  # the model it trains: a quarter of the hidden units
    assert shapes(dense.model) == FULL_SHAPES
    assert quarter.model[0][1][0].in_features == 8 and quarter.model[0][2].in_features == 8
    assert all(p.device.type == "meta" for p in quarter.path_model.parameters())  # shapes only, no memory

    uploads = [worker.train_round(engine.job(i)) for i, worker in zip(ids, workers)]
    assert shapes(quarter.model) == QUARTER_SHAPES
    assert {n: q.shape for n, q in uploads[1].tensors.items()} == QUARTER_SHAPES
    engine.close_round(uploads, [engine.decode(i, u) for i, u in zip(ids, uploads)])

    # independently of the engine: each held coordinate moves by the examples-weighted mean of the changes of
    # the clients that hold it; the quarter client's sliced coordinates are placed by its round's masks
    masks = width_masks(start, 0.25, "rolling", 0, engine.assignments[ids[1]].seed)
    kept = width_slices(start, 0.25, "rolling", 0, engine.assignments[ids[1]].seed)
    after = dict(engine.model.compose(Path((0,))).named_parameters())
    dense_end, quarter_end = dict(dense.model.named_parameters()), dict(quarter.model.named_parameters())
    w_dense, w_quarter = 600.0, 400.0
    for name, p0 in start.named_parameters():
        change_dense = p0.detach() - dense_end[name].detach()
        change_quarter = torch.zeros_like(p0)
        mask = masks.get(name, torch.ones_like(p0, dtype=torch.bool))
        change_quarter[mask] = (
            p0.detach()[mask].view(quarter_end[name].shape) - quarter_end[name].detach()
        ).flatten()
        expected = torch.where(
            mask,
            p0 - (w_dense * change_dense + w_quarter * change_quarter) / (w_dense + w_quarter),
            p0 - change_dense,
        )
        assert torch.allclose(after[name], expected, atol=1e-5), name
        if name in kept:
            assert mask.sum() < mask.numel()  # a hidden layer: the quarter client held part of it


def test_a_sliced_sub_model_trains_exactly_what_the_masked_full_model_would():
    """The sub-model is the masked full model without its dead units: same update, a quarter of the work."""
    model = DIGITS.build((1,))
    path = model.compose(Path((0,)))
    variant, inner = Variant(32, 0.25, "random"), InnerConfig(steps=10, schedule="constant")
    job = make_job(model, path=Path((0,)), variant=variant, round=3, seed=7, inner=inner)
    worker = Worker(DIGITS, copy.deepcopy(path), TRAIN.batches(16, 0), len(TRAIN), variant)
    upload = worker.train_round(job)

    reference = copy.deepcopy(path)
    masks = width_masks(reference, 0.25, "random", 3, 7)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    for module_name, module in reference.named_modules():
        for name, _ in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}"
            if full in masks:
                parametrize.register_parametrization(module, name, Restrict(masks[full], 32))
    train_local(reference, DIGITS.training_batches(TRAIN.batches(16, 0), 7 * 1_000_003 + 3), inner)
    for module_name, module in reference.named_modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    for name, p in reference.named_parameters():
        mask = masks.get(name)
        change = before[name] - p.detach()
        expected = change if mask is None else change[mask].view(upload.tensors[name].shape)
        got = torch.frombuffer(bytearray(upload.tensors[name].payload), dtype=torch.float32)
        assert torch.allclose(got.view(expected.shape), expected, atol=1e-6), name


def test_held_state_moves_with_the_units():
    t = torch.arange(6.0).reshape(3, 2)  # rows are units 1, 2, 4 of 6; both columns
    old = (torch.tensor([1, 2, 4]), None)
    new = (torch.tensor([2, 4, 5]), None)
    moved = reheld(t, old, new, torch.Size([6, 2]))
    assert moved.tolist() == [[2.0, 3.0], [4.0, 5.0], [0.0, 0.0]]  # units 2 and 4 keep theirs, 5 starts at 0
    bias = reheld(torch.tensor([1.0, 2.0]), (torch.tensor([0, 3]),), (torch.tensor([3, 4]),), torch.Size([5]))
    assert bias.tolist() == [2.0, 0.0]


def test_a_rolling_sub_model_carries_adam_state_for_the_units_it_keeps():
    model = DIGITS.build((1,))
    path = model.compose(Path((0,)))
    variant, inner = Variant(32, 0.5, "rolling"), InnerConfig(steps=3)
    worker = Worker(DIGITS, copy.deepcopy(path), TRAIN.batches(16, 0), len(TRAIN), variant)
    worker.train_round(make_job(model, Path((0,)), variant, 0, 0, inner))
    first = worker.optimizer_state["state"][0]["exp_avg"].clone()  # "0.0.0.weight": rows are units 0..15
    worker.train_round(make_job(model, Path((0,)), variant, 1, 0, inner))
    # round 1 holds units 1..16: before its steps, unit u's state sat in row u - 1; unit 16 started at zero
    second = copy.deepcopy(worker)
    second.held_round = 0
    second.optimizer_state = {"state": {0: {"exp_avg": first}}, "param_groups": []}
    second.feedback.restore({})
    order = [n for n, _ in second.model.named_parameters()]
    second.follow_units(make_job(model, Path((0,)), variant, 1, 0, inner), order)
    moved = second.optimizer_state["state"][0]["exp_avg"]
    assert torch.equal(moved[:15], first[1:]) and not moved[15].any()


def test_the_memory_estimate_holds_and_half_width_needs_at_most_six_tenths():
    """The assignment's estimate against the measured peak of real rounds (fresh processes, an 8.5M-parameter
    MLP), and what a 50%-width client saves."""
    wide = "fedmoe.models.digits:wide"
    measured = {
        v.name: measure_round(wide, v, steps=2) for v in (Variant(32), Variant(32, 0.5), Variant(4, 0.25))
    }
    for name, m in measured.items():
        assert 0.9 <= m["peak"] / m["estimate"] <= 1.3, (name, m)
    assert measured["fp32-p50"]["peak"] <= 0.6 * measured["fp32"]["peak"]
    assert measured["int4-p25"]["peak"] <= 0.15 * measured["fp32"]["peak"]
