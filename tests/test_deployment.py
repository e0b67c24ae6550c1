"""The deployment path as real processes on 127.0.0.1:
coordinator, heterogeneous clients, inference service, `fedmoe predict`.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from fedmoe.clients.runtime import connect
from fedmoe.data import load_digits_split
from fedmoe.ensemble import Ensemble
from fedmoe.router import CentroidRouter
from fedmoe.security import ENROLMENT_ENV
from fedmoe.server.inference import start_inference
from fedmoe.spec import Spec, load_spec
from fedmoe.v1 import inference_pb2, inference_pb2_grpc

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]
TESTS = Path(__file__).resolve().parent
# a user's spec, not built into fedmoe: 5 numbers in, 3 classes out; served from this module on PYTHONPATH
tabular = Spec("tabular", [lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))])


def start(args, log, env=None):
    """Start a fedmoe command logging to the file `log`; return the process and the port it printed."""
    with open(log, "w") as stderr:
        proc = subprocess.Popen(FEDMOE + args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        found = re.search(r"on port (\d+)", line)
        if found:
            return proc, int(found.group(1))
        assert time.monotonic() < deadline
    raise AssertionError(f"{args[0]} exited before listening; see {log}")


def fedmoe(args, env=None):
    """Run a fedmoe command to its end."""
    return subprocess.run(FEDMOE + args, capture_output=True, text=True, timeout=120, env=env, check=False)


def predicted(args, env=None):
    """`fedmoe predict`'s answer."""
    proc = fedmoe(["predict", *args], env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def untrained_ensemble(spec, grid, features, directory):
    """A saved ensemble of a freshly built grid, routed by random centroids."""
    model = spec.build(grid)
    centroids = np.random.default_rng(0).normal(size=(len(model.paths()), features)).astype(np.float32)
    return Ensemble(spec, model, model.paths(), CentroidRouter(centroids), grid).save(directory)


def test_federation_of_processes_over_tls_trains_and_serves_the_ensemble(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(FEDMOE + ["certs", "--out", str(certs)], check=True, capture_output=True)
    # as in docker compose: coordinator and clients enrol with the token `fedmoe certs` wrote beside the CA
    env = {k: v for k, v in os.environ.items() if k != ENROLMENT_ENV}
    state = tmp_path / "state"
    server_log = tmp_path / "server.log"
    coordinator, port = start(
        [
            "server",
            "--address",
            "127.0.0.1:0",
            "--state",
            str(state),
            "--grid",
            "2",
            "--rounds",
            "3",
            "--steps",
            "15",
            "--min-clients",
            "3",
            "--certs",
            str(certs),
            "--exit-when-done",
        ],
        server_log,
        env,
    )
    clients = []
    try:
        second = fedmoe(
            [
                "server",
                "--address",
                f"127.0.0.1:{port}",
                "--state",
                str(tmp_path / "other"),
                "--certs",
                str(certs),
            ]
        )
        # not a second server sharing the port
        assert second.returncode != 0 and f"port {port} is in use" in second.stderr
        for i, profile in enumerate(("fp32", "int8", "int4-p50")):
            clients.append(
                subprocess.Popen(
                    FEDMOE
                    + [
                        "client",
                        "--server",
                        f"localhost:{port}",
                        "--profile",
                        profile,
                        "--certs",
                        str(certs),
                        "--partition",
                        str(i),
                        "--partitions",
                        "3",
                        "--timeout",
                        "240",
                        "--quiet",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        summaries = []
        for proc in clients:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            summaries.append(json.loads(out))
        assert sorted(s["variant"] for s in summaries) == ["fp32", "int4-p50", "int8"]
        assert all(s["rounds"] == [0, 1, 2] for s in summaries)
        assert coordinator.wait(timeout=60) == 0
    finally:
        for proc in [coordinator, *clients]:
            proc.kill()
    checkpoint = state / "ensemble"
    ensemble = Ensemble.load(checkpoint)
    assert [m["round"] for m in json.loads((checkpoint / "manifest.json").read_text())["metrics"]] == [
        1,
        2,
        3,
    ]
    serve_log = tmp_path / "serve.log"
    service, serve_port = start(
        ["serve", "--checkpoint", str(checkpoint), "--address", "127.0.0.1:0", "--certs", str(certs)],
        serve_log,
    )
    try:
        test = load_digits_split()[1]
        with connect(f"localhost:{serve_port}", str(certs)) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for i in range(5):
                for k in (1, 2):
                    reply = stub.Predict(
                        inference_pb2.PredictRequest(inputs=test.inputs[i].tolist(), top_k=k), timeout=30
                    )
                    local = ensemble.predict(test.inputs[i : i + 1], top_k=k)
                    assert torch.allclose(torch.tensor(list(reply.outputs)), local.outputs[0], atol=1e-6)
                    assert list(reply.experts) == local.experts[0].tolist()
            with pytest.raises(grpc.RpcError) as bad:
                stub.Predict(inference_pb2.PredictRequest(inputs=[1.0, 2.0]), timeout=30)
            assert (
                bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and "inputs of shape (1, 2)" in bad.value.details()
            )
        answer = predicted(["--server", f"localhost:{serve_port}", "--certs", str(certs), "--digit", "3"])
        assert torch.allclose(
            torch.tensor(answer["outputs"]), ensemble.predict(test.inputs[3:4], top_k=1).outputs[0], atol=1e-6
        )
    finally:
        service.kill()


def test_serve_answers_for_a_user_spec_as_ensemble_load_predicts_and_refuses_a_port_in_use(tmp_path):
    checkpoint = untrained_ensemble(load_spec(f"{__name__}:tabular"), (3,), 5, tmp_path / "tabular")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    service, port = start(
        ["serve", "--checkpoint", str(checkpoint), "--address", "127.0.0.1:0", "--top-k", "2"],
        tmp_path / "serve.log",
        env,
    )
    try:
        values = [0.5, -1.0, 2.0, 0.0, 3.5]
        answer = predicted(["--server", f"127.0.0.1:{port}", "--inputs", ",".join(map(str, values))], env)
        expected = Ensemble.load(checkpoint).predict(torch.tensor([values]), top_k=2)
        assert torch.equal(torch.tensor(answer["outputs"]), expected.outputs[0])
        assert answer["experts"] == expected.experts[0].tolist() and answer["prediction"] == int(
            expected.outputs[0].argmax()
        )
        assert answer["weights"] == pytest.approx(expected.weights[0].tolist())
        text = fedmoe(["predict", "--server", f"127.0.0.1:{port}", "--text", "hello"], env)
        assert (
            text.returncode != 0
            and "INVALID_ARGUMENT" in text.stderr
            and "has no encode_text: send `inputs`" in text.stderr
        )
        second = fedmoe(["serve", "--checkpoint", str(checkpoint), "--address", f"127.0.0.1:{port}"], env)
        assert second.returncode != 0 and f"port {port} is in use" in second.stderr
    finally:
        service.kill()


def test_a_language_model_answers_a_text_prompt_with_its_next_token(tmp_path):
    spec = load_spec("fedmoe.models.bible:spec")
    ensemble = Ensemble.load(untrained_ensemble(spec, (2,), 1024, tmp_path / "lm"))
    server, port = start_inference(ensemble, "127.0.0.1:0")
    try:
        with connect(f"127.0.0.1:{port}") as channel:
            reply = inference_pb2_grpc.InferenceStub(channel).Predict(
                inference_pb2.PredictRequest(text="In the beginning"), timeout=30
            )
        expected = ensemble.predict(spec.encode_text("In the beginning"), top_k=1).outputs[0][-1]
        assert len(reply.outputs) == 256 and torch.allclose(
            torch.tensor(list(reply.outputs)), expected, atol=1e-6
        )
    finally:
        server.stop(0).wait()


def test_plain_text_is_refused_off_loopback():
    proc = fedmoe(["server", "--address", "0.0.0.0:0"])
    assert proc.returncode != 0 and "--certs" in proc.stderr
