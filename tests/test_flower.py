"""The Flower adapter: a simulation through Flower (Ray backend) equals the in-process runner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

for _name, _value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"), ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
    os.environ.setdefault(_name, _value)

import numpy as np
import pytest
import torch

from fedmoe.compress.quant import quantize
from fedmoe.ensemble import Ensemble
from fedmoe.experiment import assign_clients
from fedmoe.federation import train_federation
from fedmoe.assignment import MIXES
from fedmoe.strategies.flower import (
    FlowerConfig, build_federation, client_assignments, decode_tensors, encode_tensors, fedavg_baseline, fedmoe_client_units, simulate_federation,
)
from fedmoe.train import InnerConfig

CONFIG = FlowerConfig(grid=(2,), clients=10, profiles=MIXES["mixed"], rounds=2, inner=InnerConfig(steps=8), lr_schedule="cosine")


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Ensemble]:
    """One Flower simulation: 10 virtual clients of mixed profiles, 2 rounds on digits; its results and checkpoint."""
    out = tmp_path_factory.mktemp("flower") / "ensemble"
    results = simulate_federation(CONFIG, out=out)
    return results, Ensemble.load(out)


@pytest.fixture(scope="module")
def in_process() -> tuple:
    """The same config through `train_federation` in this process: the federation and its per-round stats."""
    fed = build_federation(CONFIG)
    history = train_federation(fed.model, fed.assignments, fed.task, CONFIG.rounds, CONFIG.inner, fed.outer, CONFIG.seed, lr_scale=fed.schedule)
    return fed, history


def test_grid_weights_equal_the_in_process_run(flower_run: tuple[dict, Ensemble], in_process: tuple) -> None:
    _, ensemble = flower_run
    fed, _ = in_process
    initial = fed.spec.build(CONFIG.seed).module_states()
    flower, local = ensemble.model.module_states(), fed.model.module_states()
    assert flower.keys() == local.keys() == initial.keys()
    for key in local:
        for name, t in local[key].items():
            assert not torch.equal(t, initial[key][name]), f"{key}/{name} did not change"
            assert torch.allclose(flower[key][name], t, rtol=1e-4, atol=1e-5), f"{key}/{name}: max diff {(flower[key][name] - t).abs().max():.2e}"


def test_round_metrics_match_the_in_process_run(flower_run: tuple[dict, Ensemble], in_process: tuple) -> None:
    results, _ = flower_run
    _, history = in_process
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert [c["variant"] for c in results["clients"]] == ["fp32", "int8", "int4-p50", "fp32-p25", "fp32"] * 2
    for row, stats in zip(results["rounds"], history):
        assert row["clients"] == 10
        assert row["upload_bytes"] == sum(s.upload_bytes for s in stats)
        assert row["loss"] == pytest.approx(np.mean([s.loss for s in stats]), rel=1e-4)
        assert 0.0 <= row["top1"] <= 1.0


def test_federated_centroids_are_the_shard_means(flower_run: tuple[dict, Ensemble]) -> None:
    _, ensemble = flower_run
    fed = build_federation(CONFIG)
    expected = np.stack([fed.task.features[shard].mean(0) for shard in fed.shards])
    assert np.allclose(ensemble.router.centroids.numpy(), expected, atol=1e-6)


def test_clients_are_assign_clients_when_every_path_has_one_per_profile() -> None:
    config = replace(CONFIG, clients=2 * len(MIXES["mixed"]))
    fed = build_federation(config)
    expected = assign_clients(fed.model, fed.paths, fed.shards, config.experiment())
    got = client_assignments(fed.model, fed.paths, fed.shards, config)
    assert [(a.path, a.variant, a.units.tolist()) for a in got] == [(a.path, a.variant, a.units.tolist()) for a in expected]


def test_tensors_round_trip_through_records() -> None:
    tensors = {f"0.{bits}.weight": quantize(torch.randn(5, 3), bits) for bits in (32, 16, 8, 4)}
    decoded = decode_tensors(*encode_tensors(tensors))
    assert decoded.keys() == tensors.keys()
    for name, q in tensors.items():
        assert (decoded[name].bits, decoded[name].shape, decoded[name].payload, decoded[name].scales) == (q.bits, q.shape, q.payload, q.scales)


def test_config_from_run_config_and_refusals() -> None:
    config = FlowerConfig.from_run_config({"grid": "2x2", "clients": 6, "profiles": "mixed", "steps": 7, "outer-lr": 1.0})
    assert (config.grid, config.clients, config.profiles, config.inner.steps, config.outer_lr) == ((2, 2), 6, MIXES["mixed"], 7, 1.0)
    with pytest.raises(ValueError, match="magnitude"):
        FlowerConfig(scheme="magnitude")
    with pytest.raises(ValueError, match="at least one client per path"):
        FlowerConfig(grid=(4,), clients=3)


def test_fedavg_baseline_on_fedmoe_clients_data_learns_and_uploads_fp32_weights() -> None:
    clients, paths = 4, 2
    fed = build_federation(FlowerConfig(grid=(paths,), clients=clients))
    units = fedmoe_client_units("digits", paths, clients, 0)
    assert [u.tolist() for u in units] == [a.units.tolist() for a in fed.assignments]
    assert sorted(np.concatenate(units).tolist()) == list(range(fed.task.n_units))
    result = fedavg_baseline(clients, 2, epochs=2, paths=paths)
    dense = fed.task.model_spec((1,)).build()
    assert [r["upload_bytes_per_client"] for r in result["rounds"]] == [4 * sum(p.numel() for p in dense.parameters())] * 2
    expected_steps = np.average([2 * -(-len(u) // 32) for u in units], weights=[len(u) for u in units])
    assert result["rounds"][0]["local_steps"] == pytest.approx(expected_steps)
    assert result["rounds"][-1]["accuracy"] > 0.2  # ten classes: chance is 0.1


def test_flwr_run_trains_the_app_from_pyproject(tmp_path) -> None:
    """`flwr run .` on a local simulation federation runs the ServerApp/ClientApp named in pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    home, out = tmp_path / "flwr-home", tmp_path / "ensemble"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    flwr = Path(sys.executable).with_name("flwr")
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # flwr starts flower-superlink from PATH
    command = [str(flwr), "run", str(root), "--federation-config", "num-supernodes=4",
               "--run-config", f"rounds=1 steps=3 clients=4 grid='2' out='{out}'", "--stream"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["clients"] == 4 and results["config"]["grid"] == [2]
        assert [r["round"] for r in results["rounds"]] == [1]
        assert results["rounds"][0]["clients"] == 4
        assert Ensemble.load(out).model.module_states().keys() == build_federation(FlowerConfig(grid=(2,), clients=4)).model.module_states().keys()
    finally:  # the local SuperLink that `flwr run` started stays up by design: stop the one under this FLWR_HOME
        ps = subprocess.run(["ps", "-ewwo", "pid=,args="], capture_output=True, text=True).stdout
        for line in ps.splitlines():
            pid, _, args = line.strip().partition(" ")
            if str(home) in args:
                os.kill(int(pid), signal.SIGTERM)


def test_simulate_runs_on_an_existing_ray_cluster(tmp_path) -> None:
    """`fedmoe simulate --ray-address` sends the virtual clients to a running Ray cluster (a head from `ray start`)."""
    bin_dir = Path(sys.executable).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address, out = f"127.0.0.1:{port}", tmp_path / "ensemble"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([str(bin_dir / "ray"), "status", f"--address={address}"], capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        done = subprocess.run(
            [str(bin_dir / "fedmoe"), "simulate", "--clients", "4", "--grid", "2", "--rounds", "1", "--steps", "2",
             "--ray-address", address, "--out", str(out)],
            capture_output=True, text=True, timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert [r["clients"] for r in results["rounds"]] == [4]
        drivers = list(Path(ray_dir).glob("session_*/logs/python-core-driver-*"))
        assert drivers, "no driver connected to the cluster"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
