"""The Flower runner: a simulation through Flower (Ray backend) equals the in-process runner on one Config."""

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
import tomllib
from pathlib import Path

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_name, _value)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flwr.common.config import flatten_dict  # noqa: E402

from fedmoe import Config, Ensemble, load_spec, run_federation  # noqa: E402
from fedmoe.assignment import MIXES, PROFILES  # noqa: E402
from fedmoe.compress.quant import quantize  # noqa: E402
from fedmoe.config import ClientsConfig, InnerConfig  # noqa: E402
from fedmoe.data import load_digits_split  # noqa: E402
from fedmoe.engine import Engine  # noqa: E402
from fedmoe.modular import Path as GridPath  # noqa: E402
from fedmoe.spec import Spec  # noqa: E402
from fedmoe.strategies.flower import (  # noqa: E402
    config_from_run_config,
    decode_job,
    decode_tensors,
    decode_upload,
    encode_job,
    encode_tensors,
    encode_upload,
    job_cluster,
    load_checked,
    simulate_federation,
)
from fedmoe.worker import Upload, Variant  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SPEC = load_spec("fedmoe.models.digits:spec")
CONFIG = Config(  # paths in turn: these tests pin the turn contract (tests/test_flower_routing.py: by data)
    grid=(2,),
    rounds=2,
    inner=InnerConfig(steps=8, schedule="cosine"),
    clients=ClientsConfig(count=10, profiles=MIXES["mixed"]),
    routing={"assign": "turn"},
)


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Ensemble]:
    """One Flower simulation: 10 virtual clients of mixed profiles, 2 rounds on digits."""
    out = tmp_path_factory.mktemp("flower") / "ensemble"
    results = simulate_federation(CONFIG, out=out)
    return results, Ensemble.load(out)


@pytest.fixture(scope="module")
def in_process():
    """The same config through `run_federation` in this process."""
    return run_federation(SPEC, CONFIG)


def test_grid_weights_equal_the_in_process_run(flower_run: tuple[dict, Ensemble], in_process) -> None:
    _, ensemble = flower_run
    initial = SPEC.build(CONFIG.grid, CONFIG.seed).module_states()
    flower, local = ensemble.model.module_states(), in_process.engine.model.module_states()
    assert flower.keys() == local.keys() == initial.keys()
    for key in local:
        for name, t in local[key].items():
            assert not torch.equal(t, initial[key][name]), f"{key}/{name} did not change"
            got = flower[key][name]
            message = f"{key}/{name}: max diff {(got - t).abs().max():.2e}"
            assert torch.allclose(got, t, rtol=1e-4, atol=1e-5), message


def test_round_metrics_match_the_in_process_run(flower_run: tuple[dict, Ensemble], in_process) -> None:
    results, _ = flower_run
    assert results["metric"] == "accuracy" and results["config"] == CONFIG.model_dump(mode="json")
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    variants = [v for v in MIXES["mixed"] for _ in range(2)] + ["fp32"] * 2  # profile i // 2 of the mix
    assert [c["variant"] for c in results["clients"]] == variants
    assert results["clients"] == in_process.clients
    for row, local in zip(results["rounds"], in_process.rounds, strict=True):
        assert row.keys() == local.keys()
        assert (row["updates"], row["upload_bytes"]) == (10, local["upload_bytes"])
        assert row["loss"] == pytest.approx(local["loss"], rel=1e-4)
        assert row["accuracy"] == pytest.approx(local["accuracy"], abs=1e-3)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert 0.0 <= results["initial"]["accuracy"] <= 1.0


def test_federated_centroids_are_the_mean_features_of_each_paths_clients(flower_run: tuple) -> None:
    results, ensemble = flower_run
    n = CONFIG.clients.count
    by_path: dict[str, list[torch.Tensor]] = {}
    for i, client in enumerate(results["clients"]):
        by_path.setdefault(client["path"], []).append(SPEC.featurize(SPEC.data(i, n).train.inputs))
    assert [str(p) for p in ensemble.paths] == sorted(by_path)
    expected = np.stack([torch.cat(by_path[str(p)]).double().mean(0).numpy() for p in ensemble.paths])
    assert np.allclose(ensemble.router.centroids.numpy(), expected, atol=1e-5)


def test_jobs_uploads_and_tensors_round_trip_through_records() -> None:
    tensors = {f"0.{bits}.weight": quantize(torch.randn(5, 3), bits) for bits in (32, 16, 8, 4)}
    decoded = decode_tensors(*encode_tensors(tensors))
    assert decoded.keys() == tensors.keys()
    for name, q in tensors.items():
        got = decoded[name]
        assert (got.bits, got.shape, got.payload, got.scales) == (q.bits, q.shape, q.payload, q.scales)

    config = CONFIG.model_copy(update={"grid": (2, 2)})
    engine = Engine(SPEC, config)
    engine.assign("c0000", PROFILES["int4-p50"])
    job = engine.job("c0000")
    got = decode_job(encode_job(job))
    fields = ("path", "variant", "round", "seed", "inner")
    assert [getattr(got, f) for f in fields] == [getattr(job, f) for f in fields]

    def wire(tensors: dict) -> dict:
        return {k: (q.bits, q.shape, q.payload, q.scales) for k, q in tensors.items()}

    assert wire(got.tensors) == wire(job.tensors)

    assert job_cluster(encode_job(job)) is None and job_cluster(encode_job(job, 2)) == 2

    evaluation = {"accuracy": 0.75, "examples": 40.0}
    upload = Upload(GridPath((1, 0)), Variant(8, 0.5, "static"), 3, 7, 120.0, tensors, 1.25, evaluation)
    back = decode_upload(encode_upload(upload))
    fields = ("path", "variant", "round", "seed", "weight", "loss", "nbytes", "evaluation")
    assert [getattr(back, f) for f in fields] == [getattr(upload, f) for f in fields]


def test_config_from_run_config_and_refusals(tmp_path: Path) -> None:
    config = config_from_run_config(
        {
            "spec": "fedmoe.models.digits:spec",
            "config": "",
            "out": "runs/x",
            "grid": "2x2",
            "clients": 6,
            "profiles": "mixed",
            "inner.steps": 7,
            "inner.batch-size": 16,
            "outer.lr": 1.0,
            "outer.momentum": "",
            "aggregation.rule": "median",
        }
    )
    assert (config.grid, config.clients.count, config.clients.profiles) == ((2, 2), 6, MIXES["mixed"])
    assert (config.inner.steps, config.inner.batch_size) == (7, 16)
    assert (config.outer.lr, config.outer.momentum, config.aggregation.rule) == (1.0, None, "median")
    job = tmp_path / "job.toml"
    job.write_text("[federation]\ngrid = [3]\nrounds = 5\n\n[inner]\nsteps = 9\nlr = 0.01\n")
    config = config_from_run_config({"config": str(job), "inner.steps": 3, "clients.profiles": "fp32,int8"})
    assert (config.grid, config.rounds, config.inner.steps, config.inner.lr) == ((3,), 5, 3, 0.01)
    assert config.clients.profiles == ("fp32", "int8")

    with open(ROOT / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    config = config_from_run_config(flatten_dict(table))  # what `flwr run .` hands the ServerApp
    assert config.spec == "fedmoe.models.digits:spec" and load_checked(config).name == "digits"

    with pytest.raises(ValueError, match="stepz"):
        config_from_run_config({"inner.stepz": 3})
    with pytest.raises(ValueError, match="magnitude"):
        simulate_federation(Config(compression={"scheme": "magnitude"}))
    with pytest.raises(ValueError, match="data loader"):
        load_checked(Config(spec=f"{__name__}:NO_DATA"))


NO_DATA = Spec(name="no-data", levels=[lambda: torch.nn.Linear(2, 2)])


def test_a_robust_rule_runs_through_flower() -> None:
    """aggregation.rule reaches the engine: Flower's median run is the in-process one, unlike the mean's."""
    config = Config(
        grid=(2,),
        rounds=1,
        inner=InnerConfig(steps=4),
        clients=ClientsConfig(count=6),
        aggregation={"rule": "median"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        simulate_federation(config, out=Path(tmp))
        flower = Ensemble.load(tmp).model.module_states()
    median = run_federation(SPEC, config).engine.model.module_states()
    mean_config = config.with_overrides({"aggregation.rule": "mean"})
    mean = run_federation(SPEC, mean_config).engine.model.module_states()
    for key in median:
        for name, t in median[key].items():
            assert torch.allclose(flower[key][name], t, rtol=1e-4, atol=1e-5), f"{key}/{name}"
    assert any(not torch.allclose(median[k][n], mean[k][n]) for k in median for n in median[k])


def test_fedavg_baseline_on_fedmoe_clients_data_learns_and_uploads_fp32_weights(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    paths = [str(BENCH), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))  # Ray's workers import it too
    from fedavg import client_examples, dense_model, fedavg_baseline

    clients = 2  # two k-means clusters of digits: FedAvg learns on them in two rounds (on four, not yet)
    fedmoe_parts = [client_examples(SPEC, i, clients) for i in range(clients)]
    assert all(torch.equal(p.inputs, SPEC.data(i, clients).train.inputs) for i, p in enumerate(fedmoe_parts))
    iid = [client_examples(SPEC, i, clients, iid=True) for i in range(clients)]
    assert sum(map(len, fedmoe_parts)) == sum(map(len, iid)) == len(load_digits_split()[0].targets)
    result = fedavg_baseline(clients, 2, epochs=2)
    dense = dense_model(SPEC)
    fp32_weights = 4 * sum(p.numel() for p in dense.parameters())
    assert [r["upload_bytes_per_client"] for r in result["rounds"]] == [fp32_weights] * 2
    sizes = [len(p) for p in fedmoe_parts]
    expected_steps = np.average([2 * -(-n // 32) for n in sizes], weights=sizes)
    assert result["rounds"][0]["local_steps"] == pytest.approx(expected_steps)
    assert result["rounds"][-1]["accuracy"] > 0.2  # ten classes: chance is 0.1


def test_flwr_run_trains_the_app_from_pyproject(tmp_path) -> None:
    """`flwr run .` on a local simulation federation runs the ServerApp/ClientApp named in pyproject.toml,
    here routing by data (a node whose digits span two clusters trains both paths, in one message)."""
    home, out = tmp_path / "flwr-home", tmp_path / "ensemble"
    home.mkdir()
    federation = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    (home / "config.toml").write_text(federation)
    flwr = Path(sys.executable).with_name("flwr")
    path = f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}"  # flwr starts flower-superlink from PATH
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": path}
    command = [
        str(flwr),
        "run",
        str(ROOT),
        "--federation-config",
        "num-supernodes=4",
        "--run-config",
        f"rounds=1 inner.steps=3 clients=4 grid='2' routing.assign='data' out='{out}'",
        "--stream",
    ]
    try:
        done = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        config = results["config"]
        assert (config["clients"]["count"], config["grid"], config["inner"]["steps"]) == (4, [2], 3)
        assert config["spec"] == "fedmoe.models.digits:spec" and config["routing"]["assign"] == "data"
        assert [r["round"] for r in results["rounds"]] == [1]
        local = run_federation(SPEC, Config.model_validate(config))
        assert results["clients"] == local.clients
        nodes = [c["client"].split(".")[0] for c in results["clients"]]
        assert sorted(set(nodes)) == [f"c{i:04d}" for i in range(4)] and len(nodes) > 4
        assert results["rounds"][0]["updates"] == results["rounds"][0]["client_reports"] == len(nodes)
        flower, expected = Ensemble.load(out).model.module_states(), local.engine.model.module_states()
        for key in expected:
            for name, t in expected[key].items():
                assert torch.allclose(flower[key][name], t, rtol=1e-4, atol=1e-5), f"{key}/{name}"
    finally:  # the local SuperLink that `flwr run` started stays up by design: stop the one of this FLWR_HOME
        ps = subprocess.run(["ps", "-ewwo", "pid=,args="], check=False, capture_output=True, text=True).stdout
        for line in ps.splitlines():
            pid, _, args = line.strip().partition(" ")
            if str(home) in args:
                os.kill(int(pid), signal.SIGTERM)


def test_simulate_runs_on_an_existing_ray_cluster(tmp_path) -> None:
    """`fedmoe simulate --ray-address` sends the virtual clients to a running Ray cluster (`ray start`)."""
    bin_dir = Path(sys.executable).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={ray_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address, out = f"127.0.0.1:{port}", tmp_path / "ensemble"
    try:
        deadline = time.monotonic() + 90
        status = [str(bin_dir / "ray"), "status", f"--address={address}"]
        while subprocess.run(status, check=False, capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        done = subprocess.run(
            [
                str(bin_dir / "fedmoe"),
                "simulate",
                "--clients",
                "4",
                "--grid",
                "2",
                "--rounds",
                "1",
                "--steps",
                "2",
                "--profiles",
                "mixed",
                "--routing",
                "turn",
                "--ray-address",
                address,
                "--out",
                str(out),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "spec fedmoe.models.digits:spec, grid 2, 1 rounds x 2 steps" in done.stdout
        results = json.loads((out / "results.json").read_text())
        assert [r["updates"] for r in results["rounds"]] == [4]
        assert [c["variant"] for c in results["clients"]] == ["fp32", "fp32", "int8", "int8"]
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
