"""The client SDK's checks: each mistake is caught before joining where it can be, naming the fix."""

import inspect
import itertools
import logging
import socket
import threading
import time

import pytest

from fedmoe.clients import run
from fedmoe.config import Config
from fedmoe.models.classifier import mlp_levels
from fedmoe.server.coordinator import Coordinator
from fedmoe.server.service import start_server
from fedmoe.spec import Spec, load_spec

SPEC = load_spec("fedmoe.models.digits:spec")
TRAIN = SPEC.data(0, 2).train
INPUTS, TARGETS = TRAIN.inputs[:64], TRAIN.targets[:64]
NOWHERE = "127.0.0.1:9"  # checks that fail before connecting never reach it
DIGITS = "spec 'fedmoe.models.digits:spec'"


def batches(inputs=INPUTS, targets=TARGETS):
    return itertools.repeat((inputs, targets))


@pytest.fixture
def coordinator(tmp_path):
    config = Config(
        grid=(2,), rounds=1, inner={"steps": 3}, policy={"min_clients": 2}, routing={"assign": "turn"}
    )
    coordinator = Coordinator(config, tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    try:
        yield coordinator, f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "server, fix",
    [
        ("http://127.0.0.1:7000", "drop the scheme: give host:port, e.g. '127.0.0.1:7000'"),
        (
            "https://coordinator.example:7000/",
            "drop the scheme: give host:port, e.g. 'coordinator.example:7000'",
        ),
        ("grpc://coordinator:7000", "drop the scheme"),
        ("coordinator.example", "is not host:port: give e.g. '127.0.0.1:7000'"),
        ("coordinator:http", "is not host:port"),
        ("::1:7000", "put an IPv6 address in brackets, e.g. '[::1]:7000'"),
    ],
)
def test_a_server_address_that_is_not_host_port_is_refused_with_the_fix(server, fix):
    with pytest.raises(ValueError) as error:
        run(server, SPEC)
    assert fix in str(error.value)


def test_an_unknown_profile_lists_the_known_ones():
    known = "fp32, fp16, int8, int4, int4-p50, fp32-p25, laptop"
    with pytest.raises(ValueError, match=f"unknown profile 'int3'; known: {known}"):
        run(NOWHERE, SPEC, "int3")


@pytest.mark.parametrize(
    "data, weight, error, fix",
    [
        ([(INPUTS, TARGETS)], 100, TypeError, "wrap it: iter(batches) or a generator"),
        ((INPUTS.numpy(), TARGETS.numpy()), None, TypeError, "convert them with torch.as_tensor"),
        (42, None, TypeError, "an endless iterator of (inputs, targets) batches"),
        (iter([{"x": INPUTS}]), 100, TypeError, "got a dict: make your data yield (inputs, targets) tuples"),
        (iter([INPUTS]), 100, TypeError, "a batch is two torch tensors (inputs, targets), got a Tensor"),
        (iter([(INPUTS, TARGETS)]), None, ValueError, "with an iterator of batches, pass weight="),
        (
            (INPUTS, TARGETS.float()),
            None,
            TypeError,
            f"targets are torch.float32, but {DIGITS} trains with cross-entropy, which takes class indices",
        ),
        ((INPUTS, TARGETS.float()), None, TypeError, "pass targets.long()"),
        (
            (INPUTS[:, :63], TARGETS),
            None,
            ValueError,
            "does not accept inputs of shape (8, 63) (torch.float32)",
        ),
        ((INPUTS.double(), TARGETS), None, ValueError, "convert them with inputs.to(torch.float32)"),
        (
            (INPUTS, TARGETS + 10),
            None,
            ValueError,
            f"but the model of {DIGITS} has 10 outputs (labels 0..9): renumber the classes from 0, or give",
        ),
        ((INPUTS, TARGETS - 20), None, ValueError, "renumber the classes from 0"),
        ((INPUTS, TARGETS[:10]), None, ValueError, "64 inputs but 10 targets"),
    ],
)
def test_data_is_checked_against_the_spec_before_joining(data, weight, error, fix):
    with pytest.raises(error) as raised:
        run(NOWHERE, SPEC, data=data, weight=weight)
    assert fix in str(raised.value)


def test_a_first_batch_of_a_stream_is_checked_too():
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(64, 32\)"):
        run(NOWHERE, SPEC, data=batches(INPUTS[:, :32]), weight=64)
    with pytest.raises(ValueError, match="renumber the classes"):
        run(NOWHERE, SPEC, data=batches(targets=TARGETS + 10), weight=64)
    with pytest.raises(ValueError, match="the data iterator is empty"):
        run(NOWHERE, SPEC, data=iter([]), weight=64)


def test_bad_weights_and_specs_are_refused_before_joining():
    with pytest.raises(TypeError, match="weight is the number of examples"):
        run(NOWHERE, SPEC, data=batches(), weight="many")
    with pytest.raises(ValueError, match="a positive number"):
        run(NOWHERE, SPEC, data=batches(), weight=0)
    with pytest.raises(ValueError, match="is it installed, or on PYTHONPATH"):
        run(NOWHERE, "no_such_package.spec:spec")
    with pytest.raises(ValueError, match="has no data loader: pass data="):
        run(NOWHERE, Spec("bare", mlp_levels(in_dim=64, hidden=8, classes=10)))


def test_a_model_unlike_the_coordinators_is_refused_naming_the_parameters_before_joining(coordinator):
    coordinator, server = coordinator
    wider = Spec("wider", mlp_levels(in_dim=64, hidden=48, depth=2, classes=10))
    with pytest.raises(ValueError) as error:
        run(server, wider, data=(INPUTS, TARGETS))
    message = str(error.value)
    assert "builds a model unlike the coordinator's (spec 'fedmoe.models.digits:spec', grid 2)" in message
    assert "0.0/0.0.weight: shape (48, 64) vs (32, 64)" in message
    assert "run the client with the coordinator's spec" in message
    deeper = Spec("deeper", mlp_levels(in_dim=64, hidden=32, depth=3, classes=10))
    with pytest.raises(ValueError, match="missing|unexpected"):
        run(server, deeper, data=(INPUTS, TARGETS))
    assert not coordinator.members


def test_an_unreachable_coordinator_is_retried_with_warnings_then_given_up_naming_the_address(caplog):
    defaults = inspect.signature(run).parameters
    assert defaults["retry_s"].default == 120.0 and defaults["timeout_s"].default is None
    server = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(ConnectionError) as error:
        run(server, SPEC, data=(INPUTS, TARGETS), retry_s=2.0)
    assert time.monotonic() - started < 10
    assert f"cannot reach the coordinator at {server} for 2 s" in str(error.value)
    assert "check the address (host:port)" in str(error.value)
    retries = [r for r in caplog.records if r.levelno == logging.WARNING and server in r.getMessage()]
    assert len(retries) >= 2 and all("retrying in" in r.getMessage() for r in retries)


def test_every_accepted_form_of_data_trains_and_an_integer_weight_is_signed_as_a_float(coordinator):
    coordinator, server = coordinator
    summaries = {}

    def client(name, **kwargs):
        summaries[name] = run(server, name=name, **kwargs)

    stream = {"spec": SPEC, "data": batches(), "weight": 10_000}  # an int, as people write it
    tensors = {"data": (INPUTS, TARGETS), "profile": "int8"}  # no spec: the coordinator's, by its name
    threads = [
        threading.Thread(target=client, args=(name,), kwargs=kwargs)
        for name, kwargs in (("stream", stream), ("tensors", tensors))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert summaries["stream"]["rounds"] == [0] and summaries["tensors"]["rounds"] == [0]
    assert summaries["stream"]["examples"] == 10_000.0
    assert summaries["tensors"]["spec"] == "fedmoe.models.digits:spec"
    engine, names = coordinator.engine, {c: m.name for c, m in coordinator.members.items()}
    assert {names[c]: n for c, n in engine.feature_counts.items()} == {"stream": 10_000.0, "tensors": 64.0}
    means = {names[c]: s / engine.feature_counts[c] for c, s in engine.feature_sums.items()}
    exact = SPEC.featurize(INPUTS).double().mean(0).numpy()
    assert means["tensors"] == pytest.approx(exact)
    assert means["stream"] == pytest.approx(exact)  # a stream: the mean of its first batch
    assert coordinator.finished and coordinator.metrics[0]["updates"] == 2
