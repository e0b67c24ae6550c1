"""The in-process runner and the `fedmoe demo` command, on a reduced budget."""

import json
import subprocess
import sys

import numpy as np
import torch

from fedmoe.ensemble import Ensemble
from fedmoe.experiment import ExperimentConfig, evaluate_ensemble, train_dense, train_experts
from fedmoe.federation import Assignment, cosine_schedule, train_federation
from fedmoe.outer import OuterOptimizer
from fedmoe.tasks import load_task, score
from fedmoe.train import InnerConfig

SMALL = ExperimentConfig(grid=(2,), rounds=3, shared_rounds=1, inner=InnerConfig(steps=20))


def test_dipaco_grid_trains_shared_modules_from_every_path():
    task = load_task("digits")
    model = task.model_spec((2, 2)).build()
    before = model.module_states()
    paths = model.paths()
    shards = np.array_split(np.arange(task.n_units), len(paths))
    history = train_federation(model, [Assignment(p, s) for p, s in zip(paths, shards)], task, 3, InnerConfig(steps=15), OuterOptimizer(model))
    after = model.module_states()
    assert all(not torch.equal(before[k]["0.0.weight"], after[k]["0.0.weight"]) for k in ("0.0", "0.1"))
    assert np.mean([s.loss for s in history[-1]]) < np.mean([s.loss for s in history[0]])  # the inner loss falls over the rounds
    accuracy = score(torch.softmax(model.compose(paths[0])(task.test.inputs), -1), task.test.targets)["accuracy"]
    assert accuracy > 0.5


def test_cosine_schedule_spans_the_whole_run():
    scale = cosine_schedule(10)
    assert scale(0) == 1.0 and abs(scale(9) - 0.1) < 1e-9
    assert cosine_schedule(10, offset=3)(0) == scale(3)


def test_experts_branch_from_the_dense_run_and_reload_identically(tmp_path):
    task = load_task("digits")
    dense = train_dense(task, SMALL, SMALL.inner.steps * SMALL.n_paths, progress=False)
    run = train_experts(task, SMALL, "clustered", progress=False, dense=dense)
    assert run.rounds[0]["experts"] == [dense.rounds[0]["dense"]] * 2  # round 1 is the shared phase
    assert len(run.rounds) == SMALL.rounds and set(run.final) == {"top1", "top2"}
    run.ensemble.save(tmp_path / "ens")
    again = Ensemble.load(tmp_path / "ens")
    features = torch.as_tensor(task.test.features)
    for k in (1, 2):
        assert torch.equal(again.predict(task.test.inputs, features, k).probs, run.ensemble.predict(task.test.inputs, features, k).probs)
    assert evaluate_ensemble(again, task, 1) == run.final["top1"] > 0.6


def test_fedmoe_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "fedmoe.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out


def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fedmoe.cli", "demo", "--rounds", "3", "--shared-rounds", "1", "--steps", "20", "--seeds", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("dense baseline", "expert 0 alone", "ensemble top-1", "ensemble top-2", "full ensemble", "random shards"):
        assert row in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]["ensemble top-1"]["clustered"]) == 2  # one value per seed
    assert [r["round"] for r in results["rounds"]["clustered"]] == [1, 2, 3]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    task = load_task("digits")
    assert evaluate_ensemble(Ensemble.load(out / "ensemble"), task, 1) > 0.6


def test_demo_rejects_impossible_settings(tmp_path):
    cmd = [sys.executable, "-m", "fedmoe.cli", "demo", "--rounds", "2", "--shared-rounds", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "shared-rounds" in proc.stderr
