"""Flow-matching experts: the closed-form check of velocity mixing, the sampler, sample quality, and a flow
federation trained in process and through the gRPC coordinator with unlike clients, sampled through the
inference service and `fedmoe sample`."""

from __future__ import annotations

import json
import math
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedmoe import Config, Ensemble, LocalClient, experiment, load_spec, run_federation
from fedmoe.cli import app
from fedmoe.clients import run
from fedmoe.data import load_digits_split
from fedmoe.flow import (
    TIME_FEATURES,
    FlowRouter,
    data_examples,
    data_points,
    flow_features,
    gaussian_prior,
    noise_pairs,
    posterior_router,
    sample,
    split_time,
    with_time,
)
from fedmoe.frechet import digit_classifier, digit_quality, frechet_distance, mix_distance
from fedmoe.modular import ModularModel
from fedmoe.plots import image_grid
from fedmoe.router import CentroidRouter, LearnedRouter
from fedmoe.server.coordinator import Coordinator
from fedmoe.server.inference import start_inference
from fedmoe.server.service import start_server
from fedmoe.spec import Spec, flat_features
from fedmoe.v1 import inference_pb2 as pb
from fedmoe.v1 import inference_pb2_grpc as pb_grpc

FLOW = "fedmoe.models.digits_flow:spec"

# -- the closed form: 8 Gaussians on a circle ------------------------------------------------------------
K, SPREAD = 8, 0.1
MEANS = torch.tensor([[math.cos(2 * math.pi * k / K), math.sin(2 * math.pi * k / K)] for k in range(K)])
SHARES = torch.arange(1.0, K + 1) / torch.arange(1.0, K + 1).sum()  # unequal cluster sizes


def cluster_velocity(k: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The optimal velocity E[eps - x_0 | x_t = x, cluster k] of x_0 ~ N(mu_k, s^2 I) (x_0 and eps jointly
    Gaussian given k)."""
    a, t = (1 - t)[:, None].double(), t[:, None].double()
    variance = a**2 * SPREAD**2 + t**2
    mean = MEANS[k].double()
    return (t - a * SPREAD**2) / variance * (x.double() - a * mean) - mean


def log_joint(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(N, K) log pi_k + log N(x; (1 - t) mu_k, ((1 - t)^2 s^2 + t^2) I)."""
    a, t = (1 - t)[:, None].double(), t[:, None].double()
    variance = a**2 * SPREAD**2 + t**2
    d2 = (x.double()[:, None, :] - a[:, :, None] * MEANS.double()[None]).square().sum(-1)
    return SHARES.double().log()[None] - d2 / (2 * variance) - torch.log(2 * math.pi * variance)


def posterior(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact p(k | x_t = x)."""
    return torch.softmax(log_joint(x, t), -1)


def global_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The mixture's optimal velocity from its score alone (no per-cluster velocities): E[eps | x] =
    -t grad log p_t(x) and u = (E[eps | x] - x) / (1 - t)."""
    x = x.double().detach().requires_grad_(True)
    (score,) = torch.autograd.grad(torch.logsumexp(log_joint(x, t), -1).sum(), x)
    t, a = t[:, None].double(), (1 - t)[:, None].double()
    return ((-t * score) - x.detach()) / a


def marginal_points(n: int, t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """x_t of n data points of the mixture at times t."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(SHARES, n, replacement=True, generator=g)
    x0 = (MEANS[k] + SPREAD * torch.randn(n, 2, generator=g)).double()
    return (1 - t)[:, None] * x0 + t[:, None] * torch.randn(n, 2, generator=g).double()


class ClusterFlow(nn.Module):
    """Expert k: the closed-form optimal velocity of cluster k, on flow inputs (x, t)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, t = split_time(inputs)
        return cluster_velocity(self.k, x, t)


class ExactRouter:
    """The exact p(k | x_t, t), from routing features (x, t)."""

    n_experts = K

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        x, t = split_time(features)
        return posterior(x, t).float()


def exact_ensemble() -> Ensemble:
    spec = Spec(
        "gaussians", [lambda: nn.Identity()], mix="values", featurize=flat_features, prior=gaussian_prior(2)
    )
    model = ModularModel([[ClusterFlow(k) for k in range(K)]])
    return Ensemble(spec, model, model.paths(), ExactRouter())


def test_the_posterior_weighted_mix_of_cluster_velocities_is_the_global_velocity() -> None:
    t = torch.linspace(0.02, 0.98, 400, dtype=torch.float64)
    x = marginal_points(len(t), t)
    mixed = sum(posterior(x, t)[:, k : k + 1] * cluster_velocity(k, x, t) for k in range(K))
    exact = global_velocity(x, t)
    error = (mixed - exact).abs().max()
    print(f"closed form: max |mix - global| {error:.2e}, |u| up to {exact.abs().max():.2f}")
    assert (mixed - exact).abs().max() < 1e-6


def test_fedmoes_velocity_mixing_computes_the_global_velocity() -> None:
    ensemble = exact_ensemble()
    t = torch.linspace(0.02, 0.98, 400, dtype=torch.float64)
    x = marginal_points(len(t), t, seed=1)
    exact = global_velocity(x, t)
    mixed = ensemble.predict(with_time(x, t), top_k=None).outputs
    print(f"fedmoe's mixing: max |mix - global| {(mixed.double() - exact).abs().max():.2e} (float32)")
    assert mixed.dtype == torch.float32
    assert (mixed.double() - exact).abs().max() < 1e-6


def test_sampling_the_exact_mixture_lands_on_the_clusters_and_heun_beats_euler() -> None:
    ensemble = exact_ensemble()
    reference = sample(ensemble, 400, steps=200, solver="heun", seed=3)
    euler = sample(ensemble, 400, steps=10, solver="euler", seed=3)
    heun = sample(ensemble, 400, steps=10, solver="heun", seed=3)
    assert (heun - reference).norm(dim=1).mean() < (euler - reference).norm(dim=1).mean()
    nearest = torch.cdist(reference, MEANS).min(1)
    assert nearest.values.median() < 2 * SPREAD  # on a cluster, not between them
    shares = torch.bincount(nearest.indices, minlength=K) / len(reference)
    assert (shares - SHARES).abs().sum() / 2 < 0.1  # in the mixture's proportions
    top1 = sample(ensemble, 400, steps=50, top_k=1, seed=3)
    drawn = sample(ensemble, 400, steps=50, resample=True, seed=3)
    assert top1.shape == drawn.shape == (400, 2) and torch.isfinite(drawn).all()


def test_an_expert_is_drawn_per_example_from_the_router_when_resampling() -> None:
    ensemble = exact_ensemble()
    x, t = marginal_points(2000, torch.full((2000,), 0.3)), torch.full((2000,), 0.3)
    drawn = ensemble.predict(with_time(x, t), draw=torch.Generator().manual_seed(0))
    assert drawn.experts.shape == (2000, 1) and (drawn.weights == 1).all()
    expected = posterior(x, t).mean(0)
    assert (torch.bincount(drawn.experts[:, 0], minlength=K) / 2000 - expected).abs().max() < 0.03


def test_a_gumbel_draw_follows_the_router_and_held_noise_holds_the_expert() -> None:
    ensemble = exact_ensemble()
    t = torch.full((2000,), 0.3)
    inputs = with_time(marginal_points(2000, t), t)
    gumbel = -(-torch.rand(2000, K, generator=torch.Generator().manual_seed(1)).log()).log()
    drawn = ensemble.predict(inputs, gumbel=gumbel)
    assert drawn.experts.shape == (2000, 1) and (drawn.weights == 1).all()
    expected = posterior(*split_time(inputs)).mean(0)
    assert (torch.bincount(drawn.experts[:, 0], minlength=K) / 2000 - expected).abs().max() < 0.03
    assert torch.equal(ensemble.predict(inputs, gumbel=gumbel).experts, drawn.experts)


def test_an_expert_held_per_sample_keeps_the_mixtures_shares_where_top1_gives_them_to_the_largest() -> None:
    ensemble = exact_ensemble()

    def shares_error(samples: torch.Tensor) -> float:
        shares = torch.bincount(torch.cdist(samples, MEANS).argmin(1), minlength=K) / len(samples)
        return float((shares - SHARES).abs().sum() / 2)

    # at t = 1 p(k | x_t) is the shares: top-1 sends every sample to the largest cluster's expert first
    top1 = shares_error(sample(ensemble, 1000, steps=20, top_k=1, seed=3))
    held = shares_error(sample(ensemble, 1000, steps=20, hold=True, seed=3))
    print(f"total variation of the cluster shares: top-1 {top1:.3f}, held {held:.3f}")
    assert held < 0.05 and top1 > 0.25
    with pytest.raises(ValueError, match="not both"):
        sample(ensemble, 4, resample=True, hold=True)


# -- the pieces ------------------------------------------------------------------------------------------
def test_time_travels_with_flat_points_and_images() -> None:
    flat, images = torch.randn(5, 64), torch.randn(5, 1, 8, 8)
    t = torch.rand(5)
    for x in (flat, images):
        inputs = with_time(x, t)
        back, times = split_time(inputs)
        assert torch.equal(back, x) and torch.equal(times, t)
    assert with_time(images, t).shape == (5, 2, 8, 8)


def test_noise_pairs_regress_the_straight_velocity_and_data_examples_sit_at_time_zero() -> None:
    x0 = torch.randn(256, 64)
    examples = data_examples(x0)
    assert torch.equal(data_points(examples), x0) and (split_time(examples.inputs)[1] == 0).all()
    assert torch.equal(examples.targets, -x0)  # the optimal velocity at t = 0: E[eps] - x0
    inputs, targets = noise_pairs(examples.inputs, examples.targets, torch.Generator().manual_seed(0))
    xt, t = split_time(inputs)
    eps = targets + x0
    assert torch.allclose(xt, (1 - t[:, None]) * x0 + t[:, None] * eps, atol=1e-6)
    assert 0 <= t.min() and t.max() <= 1 and abs(eps.std().item() - 1) < 0.05


def test_frechet_distance_and_the_shipped_digit_features() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 3, generator=g), torch.randn(4000, 3, generator=g) * 2 + 1
    assert abs(frechet_distance(a, a)) < 1e-6
    # N(0, I) vs N(1, 4 I) in 3-D: |m|^2 + tr(I + 4I - 2 * 2I) = 3 + 3
    assert abs(frechet_distance(a, b) - 6.0) < 0.4
    assert mix_distance([0, 0, 1, 1], [0, 0, 0, 0], 2) == 0.5
    digits = data_points(load_spec(FLOW).eval_data())
    labels = load_digits_split()[1].targets
    assert (digit_classifier().classes(digits) == labels).float().mean() > 0.95
    noise = digit_quality(torch.randn(540, 64).clamp(-1, 1), digits)
    half = digit_quality(digits[:270], digits[270:])
    assert half["fd"] < 20 and noise["fd"] > 500  # 270 real digits against 270 more: small-sample bias only
    assert half["class_mix_tv"] < 0.1


def test_an_image_grid_tiles_flat_digits() -> None:
    grid = image_grid(torch.zeros(10, 64), columns=4)
    assert grid.shape == (3 * 9 + 1, 4 * 9 + 1) and grid[1, 1] == 0.5 and grid[0, 0] == 1.0
    with pytest.raises(ValueError, match="not square"):
        image_grid(torch.zeros(2, 65))


# -- federations -----------------------------------------------------------------------------------------
def flow_config(router: str = "learned", **changes) -> Config:
    return Config(
        spec=FLOW,
        grid=(2,),
        rounds=2,
        inner={"steps": 10, "batch_size": 32},
        routing={"assign": "data", "router": router},
        **changes,
    )


def test_a_flow_federation_trains_in_process_with_unlike_clients_and_samples(tmp_path) -> None:
    spec = load_spec(FLOW)
    clients = [LocalClient(spec.data(0, 2), "int8"), LocalClient(spec.data(1, 2), "int4-p50")]
    result = run_federation(spec, flow_config(), clients)
    assert [c["variant"] for c in result.clients] == ["int8", "int4-p50"]
    assert [c["path"] for c in result.clients] == ["0", "1"]  # each client holds one cluster
    assert math.isfinite(result.rounds[-1]["velocity_mse"])
    assert isinstance(result.ensemble.router, LearnedRouter)
    assert result.ensemble.router.in_dim == 64 + 7  # the point and its time features
    samples = sample(result.ensemble, 16, steps=5, top_k=1, seed=0)
    assert samples.shape == (16, 64) and torch.isfinite(samples).all()
    result.ensemble.save(tmp_path / "ensemble")
    loaded = Ensemble.load(tmp_path / "ensemble")
    assert torch.equal(sample(loaded, 16, steps=5, top_k=1, seed=0), samples)
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(tmp_path / "ensemble"), "--n", "9", "--resample", "--out", str(out)]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output) == {"samples": [9, 64], "out": str(out)} and out.stat().st_size > 0


def test_a_flow_federation_over_grpc_with_an_int8_and_an_int4_half_width_client_samples_through_serve(
    tmp_path,
) -> None:
    spec = load_spec(FLOW)
    # the default router: the posterior of the federated clusters' statistics
    coordinator = Coordinator(flow_config("centroid", policy={"min_clients": 2}), tmp_path / "state")
    server, port = start_server(coordinator, "127.0.0.1:0")
    summaries: dict[int, dict] = {}
    errors: list[BaseException] = []

    def client(i: int, profile: str) -> None:
        try:
            summaries[i] = run(
                f"127.0.0.1:{port}", spec, profile, partition=i, partitions=2, poll_s=0.02, timeout_s=120
            )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=a, daemon=True) for a in ((0, "int8"), (1, "int4-p50"))]
    try:
        for i, t in enumerate(threads):
            t.start()
            deadline = time.monotonic() + 60
            while len(coordinator.members) <= i and not errors:  # client 0 joins first
                assert time.monotonic() < deadline, "a client did not join"
                time.sleep(0.01)
        for t in threads:
            t.join(120)
    finally:
        server.stop(0).wait()
    assert not errors, errors
    assert coordinator.finished
    assert {summaries[i]["variant"] for i in (0, 1)} == {"int8", "int4-p50"}
    assert all(summaries[i]["rounds"] == [0, 1] for i in (0, 1))
    assert math.isfinite(coordinator.metrics[-1]["velocity_mse"])

    ensemble = Ensemble.load(tmp_path / "state" / "ensemble")  # as `fedmoe serve --checkpoint` loads it
    assert isinstance(ensemble.router, FlowRouter)
    inference, inference_port = start_inference(ensemble, "127.0.0.1:0", top_k=1)
    address = f"127.0.0.1:{inference_port}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            reply = stub.Sample(pb.SampleRequest(n=8, steps=4, seed=1), timeout=60)
            full = stub.Sample(pb.SampleRequest(n=8, steps=4, seed=1, full=True, solver="heun"), timeout=60)
            held = stub.Sample(pb.SampleRequest(n=8, steps=4, seed=1, hold=True), timeout=60)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Sample(pb.SampleRequest(n=0), timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as both:
                stub.Sample(pb.SampleRequest(n=8, steps=4, resample=True, hold=True), timeout=60)
            assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not both" in both.value.details()
        assert list(reply.shape) == [8, 64] and np.isfinite(reply.samples).all()
        expected = sample(ensemble, 8, steps=4, top_k=1, seed=1)
        assert torch.allclose(torch.tensor(list(reply.samples)).view(8, 64), expected)
        assert list(full.shape) == [8, 64]
        # one expert per sample, held along its path: not the samples that mix every expert
        assert list(held.shape) == [8, 64]
        held_samples = torch.tensor(list(held.samples)).view(8, 64)
        assert torch.allclose(held_samples, sample(ensemble, 8, steps=4, seed=1, hold=True))
        assert not torch.allclose(held_samples, sample(ensemble, 8, steps=4, seed=1), atol=1e-3)
        out = tmp_path / "grid.png"
        args = ["sample", "--server", address, "--n", "16", "--steps", "4", "--hold", "--out", str(out)]
        cli = CliRunner().invoke(app, args)
        assert cli.exit_code == 0, cli.output
        assert json.loads(cli.output) == {"samples": [16, 64], "out": str(out)}
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        cli = CliRunner().invoke(app, [*args, "--resample"])  # --hold reaches the service, which refuses both
        assert cli.exit_code != 0 and "INVALID_ARGUMENT" in cli.output, cli.output
    finally:
        inference.stop(0).wait()


def test_the_demo_compares_flow_contenders_by_frechet_distance_and_draws_each(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(experiment, "ROUTER_DRAWN_STEPS", 300)  # a reduced budget, as --steps is
    args = ["demo", "--spec", FLOW, "--grid", "2", "--rounds", "2", "--steps", "10", "--shared-rounds", "0"]
    args += ["--seeds", "1", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test fd" in result.output and "one expert re-sampled per step" in result.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    drawn = {"one expert re-sampled per step", "one expert drawn per sample, held"}
    assert {"dense baseline", "ensemble top-1", "ensemble top-2", *drawn} <= set(rows)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert "dense.png" in grids and "clustered-top1.png" in grids and "random-resample.png" in grids
    assert "clustered-held.png" in grids
    assert "clustered-expert-0.png" in grids


def test_the_example_2d_flow_spec_holds_one_gaussian_per_client() -> None:
    spec = load_spec("examples.flow_2d:spec")
    parts = [data_points(spec.data(i, 8).train) for i in range(8)]
    assert sum(len(p) for p in parts) == 4000
    centres = torch.stack([p.mean(0) for p in parts])
    assert torch.cdist(centres, MEANS).min(1).values.max() < 0.05  # each client holds one of the 8 Gaussians
    real = spec.sample_metrics(data_points(spec.eval_data()), spec.eval_data())
    assert real["fd"] < 1e-9 and real["mode_mix_tv"] == 0


def test_the_posterior_router_of_gaussian_cluster_statistics_is_the_exact_posterior() -> None:
    time_columns = torch.zeros(K, TIME_FEATURES)  # statistics of the time features, dropped at t = 0
    means = torch.cat([MEANS, time_columns], 1).numpy()
    variances = torch.cat([torch.full((K, 2), SPREAD**2), time_columns], 1)
    router = posterior_router((1000 * SHARES).numpy(), means, torch.diag_embed(variances).numpy())
    t = torch.rand(2000, generator=torch.Generator().manual_seed(3)) * 0.98 + 0.01
    x = marginal_points(2000, t, seed=4).float()
    routed = router.probs(flow_features(with_time(x, t)))
    assert (routed.double() - posterior(x, t)).abs().max() < 1e-4


def test_with_full_covariances_the_posterior_router_is_exact_for_correlated_clusters() -> None:
    generator = torch.Generator().manual_seed(5)
    means = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    factors = torch.randn(3, 4, 4, generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) * 0.3 + 0.05 * torch.eye(4, dtype=torch.float64)
    counts = torch.tensor([500.0, 300.0, 200.0], dtype=torch.float64)
    time_columns = torch.zeros(3, TIME_FEATURES, dtype=torch.float64)
    full = torch.zeros(3, 4 + TIME_FEATURES, 4 + TIME_FEATURES, dtype=torch.float64)
    full[:, :4, :4] = covariances
    router = posterior_router(counts.numpy(), torch.cat([means, time_columns], 1).numpy(), full.numpy())
    t = torch.rand(500, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    x = torch.randn(500, 4, generator=generator, dtype=torch.float64)
    # the exact posterior of x_t = (1 - t) x_0 + t eps, x_0 from the Gaussian mixture
    scale = (1 - t)[:, None, None, None] ** 2 * covariances + t[:, None, None, None] ** 2 * torch.eye(4)
    likelihood = torch.distributions.MultivariateNormal((1 - t)[:, None, None] * means, scale)
    log_joint = likelihood.log_prob(x[:, None, :]) + (counts / counts.sum()).log()
    exact = log_joint.softmax(-1)
    routed = router.probs(flow_features(with_time(x.float(), t.float())))
    assert (routed.double() - exact).abs().max() < 1e-4
    diagonal = posterior_router(
        counts.numpy(),
        torch.cat([means, time_columns], 1).numpy(),
        torch.diag_embed(full.diagonal(0, 1, 2)).numpy(),
    )
    assert (
        diagonal.probs(flow_features(with_time(x.float(), t.float()))).double() - exact
    ).abs().max() > 0.05


def test_a_federation_samples_well_with_the_router_of_its_cluster_statistics(tmp_path) -> None:
    spec = load_spec(FLOW)
    config = Config(spec=FLOW, grid=(4,), rounds=3, inner={"steps": 100, "batch_size": 64})
    result = run_federation(spec, config)
    assert isinstance(result.ensemble.router, FlowRouter)  # from federated k-means alone: nothing trained
    test = spec.eval_data()
    posterior_fd = spec.sample_metrics(sample(result.ensemble, 500, steps=20, seed=1), test)["fd"]
    engine = result.engine
    trained = [engine.paths.index(p) for p in result.ensemble.paths]
    centroids = CentroidRouter(engine.kmeans.centroids[trained], engine.kmeans.temperature)
    by_centroids = Ensemble(spec, engine.model, result.ensemble.paths, centroids, config.grid)
    centroid_fd = spec.sample_metrics(sample(by_centroids, 500, steps=20, seed=1), test)["fd"]
    print(f"FD with the posterior router {posterior_fd:.1f}, with the centroid router {centroid_fd:.1f}")
    assert posterior_fd < 0.6 * centroid_fd
    result.ensemble.save(tmp_path / "ensemble")  # and it is saved and loaded as any router
    loaded = Ensemble.load(tmp_path / "ensemble")
    assert torch.equal(sample(loaded, 8, steps=4, seed=0), sample(result.ensemble, 8, steps=4, seed=0))
