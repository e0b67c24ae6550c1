"""The Flower runner trains the flow spec as any other: the same weights as the in-process runner."""

from __future__ import annotations

import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
):
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from fedmoe import Config, Ensemble, run_federation  # noqa: E402
from fedmoe.flow import sample  # noqa: E402
from fedmoe.router import LearnedRouter  # noqa: E402
from fedmoe.strategies.flower import simulate_federation  # noqa: E402

CONFIG = Config(
    spec="fedmoe.models.digits_flow:spec",
    grid=(2,),
    rounds=2,
    inner={"steps": 10, "batch_size": 32},
    routing={"assign": "data", "router": "learned"},
)


def test_flower_trains_the_flow_experts_and_router_as_the_in_process_runner(tmp_path) -> None:
    simulate_federation(CONFIG, out=tmp_path / "ensemble")
    flower = Ensemble.load(tmp_path / "ensemble")
    local = run_federation(CONFIG.spec, CONFIG).ensemble
    ours, theirs = flower.model.module_states(), local.model.module_states()
    difference = max((ours[k][n] - theirs[k][n]).abs().max().item() for k in ours for n in ours[k])
    print(f"flow experts: max weight difference Flower vs in-process {difference:.2e}")
    assert difference < 1e-4
    assert isinstance(flower.router, LearnedRouter)
    routers = flower.router.tensors(), local.router.tensors()
    assert max((routers[0][n] - routers[1][n]).abs().max().item() for n in routers[0]) < 1e-4
    samples = sample(flower, 8, steps=4, seed=0)
    assert samples.shape == (8, 64) and torch.isfinite(samples).all()
