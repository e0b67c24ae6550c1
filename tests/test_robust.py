"""Robust aggregation: median, trimmed mean and norm clipping, with masks and bit-widths."""

import copy

import pytest
import torch

from fedmoe.aggregate import aggregate, clipped, robust_average, update_norm
from fedmoe.compress.quant import dequantize, quantize
from fedmoe.config import Config, InnerConfig, OuterConfig
from fedmoe.data import load_digits_split
from fedmoe.federation import LocalClient, run_federation
from fedmoe.modular import Path
from fedmoe.outer import OuterOptimizer, Update
from fedmoe.spec import load_spec
from fedmoe.worker import Upload, Variant, Worker, make_job

DIGITS = load_spec("fedmoe.models.digits:spec")


def one(values, mask=None):
    return Update(
        {"m": {"w": torch.tensor(values)}}, 1.0, None if mask is None else {"m": {"w": torch.tensor(mask)}}
    )


def test_median_and_trimmed_mean_by_hand_with_masks():
    updates = [
        one([1.0, 5.0, 0.0]),
        one([2.0, 7.0, 0.0], [True, True, False]),
        one([100.0, -50.0, 0.0], [True, False, False]),
    ]
    median, held = robust_average(updates, "median", 0.0)
    # coordinate 0: {1, 2, 100} -> 2; coordinate 1: {5, 7} -> 5 (the lower middle value);
    # coordinate 2: {0} -> 0
    assert median["m"]["w"].tolist() == [2.0, 5.0, 0.0] and held["m"]["w"].all()
    trimmed, _ = robust_average(updates, "trimmed-mean", 0.34)
    # three holders: one dropped at each end -> 2; two holders: floor(2 * 0.34) = 0 dropped -> 6
    assert trimmed["m"]["w"].tolist() == [2.0, 6.0, 0.0]
    nobody, held = robust_average([one([1.0, 1.0], [True, False])], "median", 0.0)
    assert held["m"]["w"].tolist() == [True, False] and nobody["m"]["w"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        robust_average(updates, "trimmed-mean", 0.5)


def test_norm_clipping_scales_only_large_updates():
    big, small = one([3.0, 4.0]), one([0.3, 0.4])
    assert update_norm(clipped(big, 1.0)) == pytest.approx(1.0)
    assert clipped(small, 1.0) is small


def test_one_poisoned_client_wrecks_the_mean_but_not_the_robust_rules():
    train, test = load_digits_split()
    config = Config(
        grid=(1,), rounds=3, inner=InnerConfig(steps=100), outer=OuterConfig(lr=1.0, momentum=0.0)
    )
    model = run_federation(DIGITS, config, [LocalClient(train)]).engine.model
    path = Path((0,))
    inner = InnerConfig(steps=50)
    variants = [Variant(32), Variant(8), Variant(4), Variant(32, 0.5, "static"), Variant(8)]
    uploads = []
    for i, v in enumerate(variants):
        part = train.subset(range(i, len(train), 5))
        worker = Worker(DIGITS, copy.deepcopy(model.compose(path)), part.batches(32, i), 250.0, v)
        uploads.append(worker.train_round(make_job(model, path, v, 0, i, inner)))
    honest = uploads[-1]
    poison = Upload(
        path,
        Variant(32),
        0,
        honest.seed,
        250.0,
        {n: quantize(-50 * dequantize(q), 32) for n, q in honest.tensors.items()},
        0.0,
    )
    accuracy = {}
    for rule in ("mean", "median", "trimmed-mean"):
        for name, batch in (("clean", uploads[:-1]), ("poisoned", [*uploads[:-1], poison])):
            after = copy.deepcopy(model)
            OuterOptimizer(after, lr=1.0, momentum=0.0).step(*aggregate(after, batch, rule, trim=0.25))
            accuracy[rule, name] = DIGITS.evaluate(after.compose(path), test)["accuracy"]
    assert accuracy["mean", "clean"] > 0.9 and accuracy["mean", "poisoned"] < 0.5, accuracy
    for rule in ("median", "trimmed-mean"):
        assert accuracy[rule, "poisoned"] > accuracy["mean", "clean"] - 0.03, accuracy
    clipped_mean = copy.deepcopy(model)
    OuterOptimizer(clipped_mean, lr=1.0, momentum=0.0).step(
        *aggregate(clipped_mean, [*uploads[:-1], poison], "mean", clip_norm=1.0)
    )
    assert DIGITS.evaluate(clipped_mean.compose(path), test)["accuracy"] > accuracy["mean", "poisoned"]
