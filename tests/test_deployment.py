"""The deployment path as real processes on 127.0.0.1: coordinator, heterogeneous clients, inference service."""

import json
import re
import subprocess
import sys
import time

import grpc
import pytest
import torch

from fedmoe.clients.runtime import connect
from fedmoe.data import load_digits_split
from fedmoe.ensemble import Ensemble
from fedmoe.v1 import inference_pb2, inference_pb2_grpc

FEDMOE = [sys.executable, "-m", "fedmoe.cli"]


def start(args, log):
    """Start a fedmoe command; return the process and the port it printed."""
    proc = subprocess.Popen(FEDMOE + args, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        found = re.search(r"on port (\d+)", line)
        if found:
            return proc, int(found.group(1))
        assert time.monotonic() < deadline
    raise AssertionError(f"{args[0]} exited before listening; see {log.name}")


def test_federation_of_processes_over_tls_trains_and_serves_the_ensemble(tmp_path):
    certs = tmp_path / "certs"
    subprocess.run(FEDMOE + ["certs", "--out", str(certs)], check=True, capture_output=True)
    state = tmp_path / "state"
    server_log = open(tmp_path / "server.log", "w")
    coordinator, port = start(["server", "--address", "127.0.0.1:0", "--state", str(state), "--grid", "2", "--rounds", "3",
                               "--steps", "15", "--min-clients", "3", "--certs", str(certs), "--exit-when-done"], server_log)
    clients = []
    try:
        for profile in ("fp32", "int8", "int4-p50"):
            clients.append(subprocess.Popen(FEDMOE + ["client", "--server", f"localhost:{port}", "--profile", profile, "--certs", str(certs),
                                                      "--timeout", "240", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
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
    serve_log = open(tmp_path / "serve.log", "w")
    service, serve_port = start(["serve", "--checkpoint", str(checkpoint), "--address", "127.0.0.1:0", "--certs", str(certs)], serve_log)
    try:
        test = load_digits_split()[1]
        with connect(f"localhost:{serve_port}", str(certs)) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for i in range(5):
                for k in (1, 2):
                    reply = stub.Predict(inference_pb2.PredictRequest(inputs=test.inputs[i].tolist(), top_k=k), timeout=30)
                    local = ensemble.predict(test.inputs[i : i + 1], test.inputs[i : i + 1], top_k=k)
                    assert torch.allclose(torch.tensor(list(reply.probs)), local.probs[0], atol=1e-6)
                    assert list(reply.experts) == local.experts[0].tolist()
            with pytest.raises(grpc.RpcError) as bad:
                stub.Predict(inference_pb2.PredictRequest(inputs=[1.0, 2.0]), timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        service.kill()


def test_plain_text_is_refused_off_loopback():
    proc = subprocess.run(FEDMOE + ["server", "--address", "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--certs" in proc.stderr
