"""Where and in what precision clients train: the device setting (auto: cuda, else mps, else cpu), autocast
to bf16 (and fp16 on CUDA), and updates that stay fp32 whatever the client computed in. The CUDA checks run
wherever a GPU is present and are skipped elsewhere."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedmoe import Config, load_spec, run_federation
from fedmoe.clients import run
from fedmoe.config import InnerConfig
from fedmoe.engine import Engine
from fedmoe.train import Compute
from fedmoe.worker import LocalExamples, Variant, make_job

SPEC = load_spec("fedmoe.models.digits:spec")
DATA = SPEC.data(0, 2).train.subset(range(200))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_the_device_setting_resolves_here_and_names_the_fix_for_what_this_machine_lacks() -> None:
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert Compute.of().device.type == expected and Compute.of().autocast is None
    assert Compute.of("cpu", "bf16") == Compute(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown device"):
        Compute.of("tpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Compute.of("cpu", "fp8")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Compute.of("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available on this machine"):
            Compute.of("cuda")
        with pytest.raises(ValueError, match="not available on this machine"):  # before joining anything
            run("127.0.0.1:9", SPEC, data=(DATA.inputs, DATA.targets), device="cuda")


def one_round(compute: Compute):
    """One fp32 worker's upload of round 0 of a 2-path digits grid, trained with `compute`; and the worker."""
    variant = Variant()
    engine = Engine(SPEC, Config(grid=(2,), routing={"assign": "turn"}))
    path = engine.paths[0]
    job = make_job(engine.model, path, variant, 0, 7, InnerConfig(steps=20, batch_size=32, lr=3e-3))
    worker = LocalExamples(SPEC, DATA).worker(
        copy.deepcopy(engine.model.compose(path)), variant, 7, 32, compute=compute
    )
    return worker.train_round(job), worker


def test_a_bf16_client_on_the_cpu_trains_in_bf16_and_sends_an_fp32_update() -> None:
    fp32, _ = one_round(Compute())
    bf16, worker = one_round(Compute(torch.device("cpu"), torch.bfloat16))
    assert math.isfinite(bf16.loss) and abs(bf16.loss - fp32.loss) < 0.1 * fp32.loss
    assert all(q.bits == 32 for q in bf16.tensors.values())  # the update is fp32 whatever it computed in
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in worker.path_model.parameters())
    assert any(bf16.tensors[n].payload != fp32.tensors[n].payload for n in fp32.tensors)  # it did run in bf16
    assert fp32.tensors.keys() == bf16.tensors.keys()


def test_virtual_clients_take_the_device_and_precision_of_the_config() -> None:
    config = Config(grid=(2,), rounds=1, inner={"steps": 5}, clients={"device": "cpu", "precision": "bf16"})
    result = run_federation(SPEC, config)
    assert math.isfinite(result.rounds[-1]["loss"])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_federation(SPEC, config.with_overrides({"clients.precision": "fp16"}))


@CUDA
def test_a_cuda_client_trains_on_the_gpu_and_its_update_matches_the_cpus() -> None:
    cpu, _ = one_round(Compute())
    gpu, worker = one_round(Compute.of("cuda"))
    assert all(p.device.type == "cpu" for p in worker.path_model.parameters())  # back after the round
    assert abs(gpu.loss - cpu.loss) < 1e-3 * max(1.0, cpu.loss)
    for precision in ("bf16", "fp16"):
        upload, _ = one_round(Compute.of("cuda", precision))
        assert math.isfinite(upload.loss) and abs(upload.loss - cpu.loss) < 0.1 * cpu.loss
    assert next(iter(worker.optimizer_state["state"].values()))["exp_avg"].device.type == "cuda"
