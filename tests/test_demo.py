"""The in-process runner and the `fedmoe demo` command, on a reduced budget."""

import json
import subprocess
import sys

import numpy as np
import torch

from fedmoe.config import Config, InnerConfig
from fedmoe.data import iid
from fedmoe.ensemble import Ensemble
from fedmoe.experiment import Experiment, train_dense, train_experts
from fedmoe.federation import LocalClient, run_federation
from fedmoe.spec import load_spec

DIGITS = load_spec("fedmoe.models.digits:spec")
SMALL = Experiment(Config(grid=(2,), rounds=3, inner=InnerConfig(steps=20)), shared_rounds=1)


def test_dipaco_grid_trains_shared_modules_from_every_path():
    config = Config(
        grid=(2, 2), rounds=3, inner=InnerConfig(steps=30, schedule="constant"), routing={"assign": "turn"}
    )
    before = DIGITS.build(config.grid, config.seed).module_states()
    history = []
    train = DIGITS.data(0, 1).train
    clients = [LocalClient(train.subset(part)) for part in iid(len(train), 4)]  # each path sees every class
    result = run_federation(
        DIGITS, config, clients, on_round=lambda engine, metrics, uploads: history.append(uploads)
    )
    after = result.engine.model.module_states()
    assert all(not torch.equal(before[k]["0.0.weight"], after[k]["0.0.weight"]) for k in ("0.0", "0.1"))
    # the inner loss falls over the rounds
    assert np.mean([u.loss for u in history[-1]]) < np.mean([u.loss for u in history[0]])
    assert result.engine.outer_choice == (0.7, 0.9)  # two paths share every module: DiLoCo's outer step
    test = DIGITS.eval_data()
    assert DIGITS.evaluate(result.engine.model.compose(result.engine.paths[0]), test)["accuracy"] > 0.5


def test_cosine_schedule_spans_the_whole_run():
    inner = InnerConfig(lr=1.0)
    assert inner.lr_at(0, 10) == 1.0 and abs(inner.lr_at(9, 10) - 0.1) < 1e-9
    assert InnerConfig(lr=1.0, schedule="constant").lr_at(9, 10) == 1.0


def test_one_client_per_module_gets_an_outer_step_onto_its_end_point():
    config = Config(grid=(2,), rounds=1, inner=InnerConfig(steps=2), routing={"assign": "turn"})
    result = run_federation(DIGITS, config)
    assert result.engine.outer_choice == (1.0, 0.0)
    assert [c["path"] for c in result.clients] == ["0", "1"]


def test_experts_branch_from_the_dense_run_and_reload_identically(tmp_path):
    dense = train_dense(DIGITS, SMALL, SMALL.steps_per_round, progress=False)
    run = train_experts(DIGITS, SMALL, "clustered", progress=False, dense=dense)
    assert run.rounds[0]["experts"] == [dense.rounds[0]["dense"]] * 2  # round 1 is the shared phase
    assert len(run.rounds) == SMALL.config.rounds and set(run.final) == {"top1", "top2"}
    run.ensemble.save(tmp_path / "ens")
    again = Ensemble.load(tmp_path / "ens")
    test = DIGITS.eval_data()
    for k in (1, 2):
        assert torch.equal(
            again.predict(test.inputs, k).outputs, run.ensemble.predict(test.inputs, k).outputs
        )
    assert again.score(test, 1)["accuracy"] == run.final["top1"] > 0.6


def test_fedmoe_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "server", "client", "serve", "predict", "simulate", "certs", "health"):
        assert command in out


def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "fedmoe.cli",
        "demo",
        "--rounds",
        "3",
        "--shared-rounds",
        "1",
        "--steps",
        "20",
        "--seeds",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in (
        "dense baseline",
        "expert 0 alone",
        "ensemble top-1",
        "ensemble top-2",
        "full ensemble",
        "random shards",
    ):
        assert row in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]["ensemble top-1"]["clustered"]) == 2  # one value per seed
    assert [r["round"] for r in results["rounds"]["clustered"]] == [1, 2, 3]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Ensemble.load(out / "ensemble").score(DIGITS.eval_data(), 1)["accuracy"] > 0.6


def test_demo_rejects_impossible_settings(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "fedmoe.cli",
        "demo",
        "--rounds",
        "2",
        "--shared-rounds",
        "2",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0 and "shared-rounds" in proc.stderr
    proc = subprocess.run(
        [*cmd[:4], "--spec", "nowhere:spec", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0 and "cannot import 'nowhere'" in " ".join(
        proc.stderr.replace("│", " ").split()
    )


def test_a_user_spec_with_client_data_given_in_process():
    train = DIGITS.data(0, 2).train
    clients = [
        LocalClient(train.subset(range(0, len(train), 2))),
        LocalClient(train.subset(range(1, len(train), 2)), "int8"),
    ]
    result = run_federation(DIGITS, Config(grid=(1,), rounds=1, inner=InnerConfig(steps=3)), clients)
    assert [c["variant"] for c in result.clients] == ["fp32", "int8"]
    assert result.engine.outer_choice == (0.7, 0.9)  # two clients share the one module
