"""Flow matching (rectified flow) as a fedmoe spec: velocity fields, their training pairs, an ODE sampler.

A flow model's inputs are points with their time: a flat point x of D numbers travels as (x, t), D + 1
numbers; an image (C, H, W) as C + 1 channels, the last one filled with t. Its outputs are velocities,
shaped as the points. The data are the points at t = 0: `data_examples(x)` makes them examples whose target
is the optimal velocity there (-x), so that every runner checks, trains and evaluates them as any examples.

Training (`noise_pairs`, a spec's `prepare`): x_t = (1 - t) x_0 + t eps at t ~ U(0, 1), eps ~ N(0, I),
regressing the velocity eps - x_0. The routed ensemble of experts, each trained on one cluster of the data,
mixes their velocities with the router's p(k | x_t, t): exact for the per-cluster optimal flows, because the
marginal velocity is the posterior-weighted mix of the per-cluster ones. `sample` integrates that mixture
from noise (t = 1) to data (t = 0) with Euler or Heun steps, mixing all experts, the top-k or the top-1 at
every step, or drawing one expert per sample and step from the router (its expected velocity is the full
mixture's, but the drawn velocity jumps between unlike flows), or drawing one expert per sample by Gumbel-max
with noise held over the whole path (`hold`): at t = 1, where p(k | x_t, t) is the clusters' shares, that is
the ancestral draw of a cluster, and the sample keeps its expert until the router moves past the draw.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.ensemble import Ensemble
from fedmoe.spec import Batch, Examples

SOLVERS = ("euler", "heun")
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (points x, times t of shape (N,)) -> v


def with_time(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A flow model's inputs: points `x` (N, D) or (N, C, H, W) with their times `t` (a number, or (N,))."""
    t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
    if x.dim() == 2:
        return torch.cat([x, t[:, None]], 1)
    return torch.cat([x, t.view(-1, 1, *[1] * (x.dim() - 2)).expand(len(x), 1, *x.shape[2:])], 1)


def split_time(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The points and times (N,) of a flow model's inputs (inverse of `with_time`)."""
    if inputs.dim() == 2:
        return inputs[:, :-1], inputs[:, -1]
    return inputs[:, :-1], inputs[:, -1].flatten(1)[:, 0]


def data_examples(x: torch.Tensor) -> Examples:
    """Data points as a flow model's examples: inputs (x, t = 0), target -x (the optimal velocity there)."""
    x = x.float()
    return Examples(with_time(x, 0.0), -x)


def data_points(examples: Examples) -> torch.Tensor:
    """The data points of examples made by `data_examples`."""
    return split_time(examples.inputs)[0]


def noise_pairs(inputs: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> Batch:
    """Rectified-flow training pairs of a batch of data examples (a flow spec's `prepare`): each point x_0
    noised to x_t = (1 - t) x_0 + t eps at t ~ U(0, 1), eps ~ N(0, I); the target is the velocity eps - x_0.
    """
    x0 = split_time(inputs)[0]
    t = torch.rand(len(x0), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    tb = t.view(-1, *[1] * (x0.dim() - 1))
    return with_time((1 - tb) * x0 + tb * eps, t), eps - x0


def velocity_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error of predicted velocities."""
    return F.mse_loss(outputs.float(), targets.float())


def velocity_metrics(mixed: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The mean squared error of (mixed) velocities on noised held-out points."""
    return {"velocity_mse": F.mse_loss(mixed.float(), targets.float()).item()}


def time_features(t: torch.Tensor, frequencies: int = 3) -> torch.Tensor:
    """(N, 1 + 2 * frequencies) features of times in [0, 1]: t, and sin / cos of pi t, 2 pi t, 4 pi t, ..."""
    scaled = t[:, None] * (math.pi * 2.0 ** torch.arange(frequencies))
    return torch.cat([t[:, None], scaled.sin(), scaled.cos()], 1)


def flow_features(inputs: torch.Tensor) -> torch.Tensor:
    """A flow spec's routing features: the point, flattened, and features of its time. The data (t = 0)
    cluster on their points alone (the time features are constant there); the router reads both."""
    x, t = split_time(inputs.float())
    return torch.cat([x.flatten(1), time_features(t)], 1)


TIME_FEATURES = 7  # what `time_features` (3 frequencies) adds to a point's routing features
VARIANCE_FLOOR = 1e-4  # of a cluster's per-feature variance (a pixel that never changes has none)


class FlowRouter:
    """p(k | x_t, t) of a flow whose data clusters are Gaussians N(mu_k, Sigma_k) weighted w_k: x_t =
    (1 - t) x_0 + t eps is then N((1 - t) mu_k, (1 - t)^2 Sigma_k + t^2 I) in cluster k, and the router is
    that mixture's posterior, computed in each cluster's eigenbasis (Sigma_k = U_k diag(variances_k) U_k^T;
    no `bases`: diagonal covariances). Exact for Gaussian clusters, it reads routing features (x, time
    features of t) of flat points, and is made from the federated k-means statistics alone
    (`posterior_router`)."""

    def __init__(
        self,
        log_weights: torch.Tensor,
        means: torch.Tensor,
        variances: torch.Tensor,
        bases: torch.Tensor | None = None,
    ):
        self.log_weights = torch.as_tensor(log_weights, dtype=torch.float32)
        self.means = torch.as_tensor(means, dtype=torch.float32)
        self.variances = torch.as_tensor(variances, dtype=torch.float32).clamp_min(VARIANCE_FLOOR)
        self.bases = None if bases is None else torch.as_tensor(bases, dtype=torch.float32)
        self.n_experts, self.dim = self.means.shape

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Routing distribution for each row of (x, time features) routing features."""
        features = torch.as_tensor(features, dtype=torch.float32)
        x, t = features[:, None, : self.dim], features[:, self.dim, None, None]  # t: the first time feature
        offset = x - (1 - t) * self.means  # (N, k, dim)
        if self.bases is not None:
            offset = torch.einsum("nkd,kde->nke", offset, self.bases)
        variance = (1 - t) ** 2 * self.variances + t**2
        log_joint = -0.5 * (offset**2 / variance + variance.log()).sum(-1)
        return F.softmax(log_joint + self.log_weights, dim=-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Weights to checkpoint."""
        tensors = {"log_weights": self.log_weights, "means": self.means, "variances": self.variances}
        return tensors if self.bases is None else {**tensors, "bases": self.bases}

    def config(self) -> dict[str, Any]:
        """Settings to checkpoint."""
        return {"kind": "flow"}


def posterior_router(counts: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> FlowRouter:
    """A flow spec's `cluster_router`: the Gaussian posterior of the federated clusters (their example
    counts, and the means and covariance matrices of their points' routing features; the time features are
    dropped). Full covariances (from the clusters' second moments) make it exact for correlated clusters."""
    counts = np.asarray(counts, dtype=np.float64)
    points = np.asarray(means).shape[1] - TIME_FEATURES
    covariances = np.asarray(covariances, dtype=np.float64)[:, :points, :points]
    variances, bases = np.linalg.eigh(covariances)
    return FlowRouter(
        torch.as_tensor(np.log(counts / counts.sum())),
        torch.as_tensor(np.asarray(means)[:, :points]),
        torch.as_tensor(variances),
        torch.as_tensor(bases),
    )


def gaussian_prior(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    """A spec's `prior`: n points of standard normal noise of `shape`, where sampling starts (t = 1)."""

    def prior(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *shape), generator=generator)

    return prior


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] at geometrically spaced frequencies (1 to 1000), (N, dim)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(0, 3, dim // 2), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None].float() * self.frequencies
        return torch.cat([angles.sin(), angles.cos()], 1)


class VelocityMLP(nn.Module):
    """A velocity field of flat points: an MLP of (x, embedding of t), `depth` hidden layers of `hidden`."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 32):
        super().__init__()
        self.time = TimeEmbedding(time_dim)
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x, t = split_time(inputs)
        return self.net(torch.cat([x, self.time(t)], 1))


class VelocityConvNet(nn.Module):
    """A small velocity field of images (C, H, W): 3x3 convolutions over the image and its time channel."""

    def __init__(self, channels: int = 1, hidden: int = 32, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(hidden, channels, 3, padding=1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


def integrate(
    velocity: Velocity, noise: torch.Tensor, steps: int = 20, solver: str = "euler"
) -> torch.Tensor:
    """Solve dx/dt = velocity(x, t) from t = 1 (`noise`) to t = 0 (data) in `steps` equal steps, by Euler
    (one velocity per step) or Heun (two: the mean of the slopes at both ends)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"sampling takes at least one step, got {steps}")
    times = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for t, s in itertools.pairwise(times):
        v = velocity(x, t.expand(len(x)))
        end = x + (s - t) * v
        if solver == "heun":
            end = x + (s - t) * 0.5 * (v + velocity(end, s.expand(len(x))))
        x = end
    return x


@torch.no_grad()
def sample(
    ensemble: Ensemble,
    n: int,
    steps: int = 20,
    solver: str = "euler",
    top_k: int | None = None,
    resample: bool = False,
    seed: int = 0,
    hold: bool = False,
) -> torch.Tensor:
    """`n` samples of a routed ensemble of flow experts: at every step the router's p(k | x_t, t) mixes the
    velocities of all experts (`top_k` None), of the top-k (renormalised), or picks one expert per sample:
    drawn from it afresh (`resample`), or by Gumbel-max with each sample's Gumbel noise drawn once and held
    over the path (`hold`). Reproducible from `seed`."""
    prior = ensemble.spec.prior
    if prior is None:
        raise ValueError(
            f"spec {ensemble.spec.ref or ensemble.spec.name!r} is not generative: it has no prior"
        )
    if resample and hold:
        raise ValueError("an expert is either re-sampled at every step or held: not both")
    generator = torch.Generator().manual_seed(seed)
    draw = generator if resample else None
    noise = prior(n, generator)
    uniform = torch.rand((n, len(ensemble.paths)), generator=generator) if hold else None
    gumbel = None if uniform is None else -(-uniform.clamp(1e-12, 1 - 1e-7).log()).log()

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ensemble.predict(with_time(x, t), top_k, draw=draw, gumbel=gumbel).outputs

    return integrate(velocity, noise, steps, solver)


@torch.no_grad()
def sample_model(
    model: nn.Module,
    prior: Callable[[int, torch.Generator], torch.Tensor],
    n: int,
    steps: int = 20,
    solver: str = "euler",
    seed: int = 0,
) -> torch.Tensor:
    """`n` samples of one velocity model (a path, or a monolith), from `prior`, reproducible from `seed`."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    return integrate(lambda x, t: model(with_time(x, t)).float(), prior(n, generator), steps, solver)
