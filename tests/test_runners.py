"""Every spec in examples/ runs unchanged through all three runners, and the runners agree weight for weight.

The gRPC runs are real: a `fedmoe server` process on loopback and three SDK clients of different devices
(fp32, int8, int4 at half width), joining one after the other so that enrolment order, and with it every
path, variant and seed, is the same as in the in-process and Flower runners.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from fedmoe import Config, Ensemble, load_spec, run_federation
from fedmoe.clients import run
from fedmoe.clients.runtime import connect
from fedmoe.strategies.flower import simulate_federation
from fedmoe.v1 import coordinator_pb2 as pb
from fedmoe.v1 import coordinator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
FEDMOE = Path(sys.executable).with_name("fedmoe")
PROFILES = ("fp32", "int8", "int4-p50")
EXAMPLES = ["examples.tabular:spec", "examples.digits_cnn:spec", "examples.byte_lm:spec"]


def small(ref: str, grid: tuple[int, ...] | None = None, rounds: int = 1, steps: int = 2) -> Config:
    """Three clients (fp32, int8, int4-p50) on one path unless a grid is given; a small budget."""
    levels = load_spec(ref).default_levels
    return Config.load(
        None,
        {
            "spec": ref,
            "grid": list(grid or (1,) * levels),
            "rounds": rounds,
            "inner.steps": steps,
            "inner.batch_size": 16,
            "clients.count": 3,
            "clients.profiles": list(PROFILES),
        },
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def members(address: str) -> int:
    """How many clients the coordinator at `address` has enrolled (0 while it is not up)."""
    with connect(address) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=5)
        except grpc.RpcError:
            return 0
    return len(json.loads(reply.json)["members"])


def grpc_run(config: Config, tmp_path: Path) -> tuple[Ensemble, list[dict]]:
    """`fedmoe server` with `config`'s settings and three SDK clients joining in order; the final ensemble."""
    address, state = f"127.0.0.1:{free_port()}", tmp_path / "state"
    settings = [
        "--spec",
        config.spec,
        "--grid",
        "x".join(map(str, config.grid)),
        "--rounds",
        str(config.rounds),
        "--steps",
        str(config.inner.steps),
        "--batch-size",
        str(config.inner.batch_size),
    ]
    server = subprocess.Popen(
        [
            str(FEDMOE),
            "server",
            *settings,
            "--address",
            address,
            "--state",
            str(state),
            "--min-clients",
            "3",
            "--exit-when-done",
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    summaries: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client(i: int, profile: str) -> None:
        try:
            summaries[i] = run(
                address,
                spec=config.spec,
                profile=profile,
                partition=i,
                partitions=3,
                retry_s=60,
                timeout_s=240,
            )
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    threads = []
    try:
        for i, profile in enumerate(PROFILES):
            threads.append(threading.Thread(target=client, args=(i, profile), daemon=True))
            threads[-1].start()
            deadline = time.monotonic() + 60
            # the next client joins after this one: a fixed order
            while members(address) < i + 1 and not errors:
                assert time.monotonic() < deadline and server.poll() is None, "a client did not join"
                time.sleep(0.1)
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
        server.wait(timeout=60)
        assert server.returncode == 0, server.stdout.read()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return Ensemble.load(state / "ensemble"), [summaries[i] for i in range(3)]


def max_difference(a: Ensemble, b: Ensemble) -> float:
    sa, sb = a.model.module_states(), b.model.module_states()
    assert sa.keys() == sb.keys()
    return max((sa[k][n] - sb[k][n]).abs().max().item() for k in sa for n in sa[k])


@pytest.fixture(scope="module")
def tabular_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ensemble]:
    """The tabular example, one path, three unlike clients, 2 rounds: through each runner."""
    config = small("examples.tabular:spec", rounds=2, steps=5)
    out = tmp_path_factory.mktemp("flower") / "ensemble"
    simulate_federation(config, out=out)
    grpc_ensemble, summaries = grpc_run(config, tmp_path_factory.mktemp("grpc"))
    assert [s["variant"] for s in summaries] == ["fp32", "int8", "int4-p50"]
    return {
        "in-process": run_federation(config.spec, config).ensemble,
        "grpc": grpc_ensemble,
        "flower": Ensemble.load(out),
    }


def test_the_three_runners_reach_the_same_weights(tabular_runs: dict[str, Ensemble]) -> None:
    local = tabular_runs["in-process"]
    initial = load_spec("examples.tabular:spec").build((1,), 0).module_states()
    assert any(not torch.equal(t, initial["0.0"][n]) for n, t in local.model.module_states()["0.0"].items())
    for runner in ("grpc", "flower"):
        difference = max_difference(local, tabular_runs[runner])
        print(f"{runner} vs in-process: max weight difference {difference:.2e}")
        assert difference < 1e-4, f"{runner} differs from the in-process run by {difference:.2e}"


def test_the_tabular_ensemble_over_grpc_is_as_good_as_a_central_logistic_regression(tmp_path: Path) -> None:
    from examples.tabular import TEST, TRAIN

    central = LogisticRegression(max_iter=2000).fit(TRAIN.inputs.numpy(), TRAIN.targets.numpy())
    reference = central.score(TEST.inputs.numpy(), TEST.targets.numpy())
    ensemble, summaries = grpc_run(small("examples.tabular:spec", grid=(3,), rounds=6, steps=40), tmp_path)
    assert sorted(s["path"] for s in summaries) == ["0", "1", "2"]
    accuracy = ensemble.score(TEST, top_k=1)["accuracy"]
    print(f"tabular: routed ensemble over gRPC {accuracy:.4f}, central logistic regression {reference:.4f}")
    assert accuracy >= reference - 0.03


@pytest.mark.parametrize("ref", EXAMPLES[1:])
def test_every_example_runs_through_every_runner(ref: str, tmp_path: Path) -> None:
    spec = load_spec(ref)
    config = small(ref)
    scores = {"in-process": run_federation(ref, config).ensemble.score(spec.eval_data())[spec.metric]}
    flower = simulate_federation(config, out=tmp_path / "flower")
    assert [c["variant"] for c in flower["clients"]] == list(PROFILES)
    scores["flower"] = Ensemble.load(tmp_path / "flower").score(spec.eval_data())[spec.metric]
    ensemble, summaries = grpc_run(config, tmp_path)
    assert [s["rounds"] for s in summaries] == [[0]] * 3
    scores["grpc"] = ensemble.score(spec.eval_data())[spec.metric]
    print(f"{ref}: {spec.metric} after one small round {scores}")
    # finite metrics from all three
    assert all(not math.isnan(value) and value != float("inf") for value in scores.values())
    assert os.path.isdir(tmp_path / "state" / "ensemble")
