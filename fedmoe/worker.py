"""One worker's round, shared by every runner: receive the path as this client holds it, train, compress.

A client's `Variant` says what it holds of its path: a bit-width (weights delivered quantized,
trained with fake-quantization and a straight-through estimator, outer gradient taken from the
quantized end weights and sent quantized with error feedback) and a density (a pruned sub-model;
only held coordinates are trained and sent).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from fedmoe.clustering import members, nearest
from fedmoe.compress.prune import (
    SCHEMES,
    WIDTH_SCHEMES,
    Masks,
    check_density,
    held_shape,
    held_values,
    reheld,
    scatter_held,
    sliced_shape,
    submodel_masks,
    width_slices,
)
from fedmoe.compress.quant import (
    BITS,
    ErrorFeedback,
    QTensor,
    dequantize,
    fake_quantize,
    quantize,
    wire_bytes,
)
from fedmoe.config import InnerConfig
from fedmoe.modular import ModularModel, Path
from fedmoe.outer import ModuleStates, Update
from fedmoe.router import LearnedRouter
from fedmoe.spec import Batch, BatchSampler, Examples, Spec
from fedmoe.train import Compute, train_local


@dataclass(frozen=True)
class Variant:
    """What a client holds of its path: bit-width (32, 16, 8, 4), density in (0, 1], sub-model scheme."""

    bits: int = 32
    density: float = 1.0
    scheme: str = "rolling"

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        check_density(self.density)
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; known: {', '.join(SCHEMES)}")

    @property
    def name(self) -> str:
        """Short label, e.g. "int4-p50" (4 bits, half the width) or "fp32"."""
        bits = "fp32" if self.bits == 32 else "fp16" if self.bits == 16 else f"int{self.bits}"
        return bits if self.density == 1.0 else f"{bits}-p{round(100 * self.density)}"

    @property
    def sliced(self) -> bool:
        """Whether a client of this variant trains a smaller model: a width sub-model (d of the hidden units),
        as opposed to the whole path (dense) or the whole path under an unstructured (magnitude) mask."""
        return self.density < 1.0 and self.scheme in WIDTH_SCHEMES


class Restrict(nn.Module):
    """Parametrization: the weight a client computes with is fake_quantize(weight * mask, bits)."""

    def __init__(self, mask: torch.Tensor | None, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        held = weight if self.mask is None else weight * self.mask
        return fake_quantize(held, self.bits) if weight.dim() >= 2 else held


def variant_bytes(model: nn.Module, variant: Variant, masks: Masks) -> dict[str, int]:
    """Exact bytes a client of this variant stores for its weights and uploads per round.

    Weights are stored at the variant's bit-width (quantized per channel) and only where held; an
    unstructured mask costs one bit per coordinate on the device. Masks never travel.
    """
    weights = upload = 0
    for name, p in model.named_parameters():
        mask = masks.get(name)
        size = wire_bytes(held_shape(mask, p.shape), variant.bits)
        upload += size
        weights += size
        if mask is not None and len(held_shape(mask, p.shape)) == 1 and p.dim() > 1:
            weights += math.ceil(p.numel() / 8)
    return {"weights": weights, "upload": upload}


@dataclass(frozen=True)
class Upload:
    """A worker's outer gradient in wire form: the held coordinates of each path parameter, quantized.

    The receiver recomputes the masks from (path, variant, round, seed) and its own copy of the
    weights the round started from; see `decode`.
    """

    path: Path
    variant: Variant
    round: int
    seed: int
    weight: float
    tensors: dict[str, QTensor]
    loss: float
    evaluation: dict[str, float] = field(
        default_factory=dict
    )  # its path on its held-out examples, and "examples"

    @property
    def nbytes(self) -> int:
        """Payload and scale bytes of all tensors."""
        return sum(q.nbytes for q in self.tensors.values())


def upload_state(upload: Upload) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An upload as tensors (each tensor's payload and scale bytes, as uint8) and JSON, for a checkpoint;
    `load_upload` is its inverse."""
    tensors = {}
    for name, q in upload.tensors.items():
        tensors[f"{name}/payload"] = _byte_tensor(q.payload)
        tensors[f"{name}/scales"] = _byte_tensor(q.scales)
    return tensors, upload_meta(upload)


def upload_meta(upload: Upload) -> dict[str, Any]:
    """An upload's fields and its tensors' bits and shapes, as JSON (their bytes are stored beside it);
    `stored_upload` is its inverse."""
    return {
        "path": str(upload.path),
        "variant": asdict(upload.variant),
        "round": upload.round,
        "seed": upload.seed,
        "weight": upload.weight,
        "loss": upload.loss,
        "evaluation": upload.evaluation,
        "qtensors": {name: {"bits": q.bits, "shape": list(q.shape)} for name, q in upload.tensors.items()},
    }


def load_upload(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Upload:
    """The upload that `upload_state` stored."""
    qtensors = {
        name: QTensor(
            q["bits"],
            tuple(q["shape"]),
            tensors[f"{name}/payload"].numpy().tobytes(),
            tensors[f"{name}/scales"].numpy().tobytes(),
        )
        for name, q in meta["qtensors"].items()
    }
    return stored_upload(meta, qtensors)


def stored_upload(meta: dict[str, Any], qtensors: dict[str, QTensor]) -> Upload:
    """The upload that `upload_meta` described, with its tensors."""
    return Upload(
        Path.parse(meta["path"]),
        Variant(**meta["variant"]),
        meta["round"],
        meta["seed"],
        meta["weight"],
        qtensors,
        meta["loss"],
        meta["evaluation"],
    )


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def signed_fields(worker_id: str, update_id: str, upload: Upload) -> list[object]:
    """The header fields an update's signature covers, besides its tensors (see
    fedmoe.security.update_digest): the worker (a client's id when it has one path), the update, its
    assignment and weight, and its evaluation items sorted by name.
    """
    v = upload.variant
    return [
        worker_id,
        update_id,
        upload.round,
        upload.path,
        v.bits,
        v.density,
        v.scheme,
        upload.seed,
        upload.weight,
        *(f"{name}={float(value)!r}" for name, value in sorted(upload.evaluation.items())),
    ]


def round_masks(path_model: nn.Module, variant: Variant, round: int, seed: int) -> Masks:
    """The masks of a client's sub-model for a round, as both the client and the receiver compute them."""
    return submodel_masks(path_model, variant.density, variant.scheme, round, seed)


@dataclass(frozen=True)
class Layout:
    """How a path's parameters travel for one sub-model in one round: per parameter, its full shape, its
    mask (absent: held whole) and the shape of the coordinates held (`held_values`)."""

    shapes: dict[str, torch.Size]
    masks: Masks
    held: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, path_model: nn.Module, variant: Variant, round: int, seed: int) -> Layout:
        """The layout of `variant`'s sub-model of `path_model` in `round` (see `round_masks`)."""
        masks = round_masks(path_model, variant, round, seed)
        shapes = {name: p.shape for name, p in path_model.named_parameters()}
        return cls(shapes, masks, {name: held_shape(masks.get(name), s) for name, s in shapes.items()})


def decode(model: ModularModel, upload: Upload, layout: Layout | None = None) -> Update:
    """Turn an upload back into full-shaped outer gradients and masks per grid module (the receiver's side).

    `model` must hold the weights the round started from (magnitude masks depend on them); `layout`, the
    upload's (`Layout.of` its path, variant, round and seed), when the caller keeps it.
    Raises ValueError when a tensor is missing, unexpected or of the wrong size.
    """
    if layout is None:
        layout = Layout.of(model.compose(upload.path), upload.variant, upload.round, upload.seed)
    if upload.tensors.keys() != layout.shapes.keys():
        wrong = sorted(set(upload.tensors) ^ set(layout.shapes))
        raise ValueError(f"upload for path {upload.path} has tensors {wrong} wrong")
    masks, deltas = layout.masks, {}
    for name, q in upload.tensors.items():
        expected = layout.held[name]
        if q.shape != expected or q.bits != upload.variant.bits:
            raise ValueError(
                f"{name}: got {q.bits}-bit {q.shape}, expected {upload.variant.bits}-bit {expected}"
            )
        deltas[name] = scatter_held(dequantize(q), masks.get(name), layout.shapes[name])
    return group_by_module(upload.path, deltas, masks, upload.weight)


def group_by_module(path: Path, deltas: dict[str, torch.Tensor], masks: Masks, weight: float) -> Update:
    """Regroup a path model's tensors ("level.name") by grid module key ("level.index")."""
    keys = path.module_keys()
    grouped: ModuleStates = {}
    grouped_masks: ModuleStates = {}
    for name, t in deltas.items():
        level, rest = name.split(".", 1)
        grouped.setdefault(keys[int(level)], {})[rest] = t
        if name in masks:
            grouped_masks.setdefault(keys[int(level)], {})[rest] = masks[name]
    return Update(grouped, weight, grouped_masks or None)


def deliver(path_model: nn.Module, variant: Variant, masks: Masks) -> dict[str, QTensor]:
    """The path's weights as a client of `variant` receives them: held coordinates only, at its bit-width."""
    return {
        name: quantize(held_values(p.detach(), masks.get(name)), variant.bits)
        for name, p in path_model.named_parameters()
    }


@dataclass(frozen=True, eq=False)
class Job:
    """What a client receives for a round: its path and variant, the round, its seed, this round's inner
    settings, the path's weights as it holds them, and the masks of its sub-model (`round_masks`). A worker
    reads the masks only for a magnitude sub-model, trained as the whole path under them (in-process only); a
    width sub-model is sliced from the held tensors themselves, so a networked client's job carries none."""

    path: Path
    variant: Variant
    round: int
    seed: int
    inner: InnerConfig
    tensors: dict[str, QTensor]
    masks: Masks = field(default_factory=dict)


ROUTER = "router/"  # the prefix of the learned router's tensors in jobs and uploads
ROUTER_STEPS = 20  # local steps a client trains the learned router each round
ROUTER_BATCH = 128  # examples per step


@dataclass(frozen=True, eq=False)
class RouterData:
    """What a client trains the learned router on: its training examples, their routing features and their
    clusters."""

    examples: Examples
    features: np.ndarray
    labels: np.ndarray

    def pairs(self, spec: Spec, draws: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, cluster) pairs of a round: the cached features, or, for a spec that prepares its
        examples (a flow model noising them), `draws` examples drawn from `seed` and prepared afresh."""
        if spec.prepare is None:
            return self.features, self.labels
        generator = torch.Generator().manual_seed(seed)
        index = torch.randint(len(self.examples), (draws,), generator=generator)
        prepared = spec.prepared(self.examples.subset(index), seed)
        return spec.features(prepared), self.labels[index.numpy()]


def make_job(
    model: ModularModel, path: Path, variant: Variant, round: int, seed: int, inner: InnerConfig
) -> Job:
    """The job of a client of `variant` on `path` of the grid `model`
    (holding the weights the round starts from).
    """
    path_model = model.compose(path)
    masks = round_masks(path_model, variant, round, seed)
    return Job(path, variant, round, seed, inner, deliver(path_model, variant, masks), masks)


@dataclass
class Worker:
    """A client training its path on its data with its variant;
    keeps optimiser state and error feedback across rounds.

    `path_model` is the client's own copy of its path (built once from the spec); each round loads the
    delivered weights into `model`, which is `path_model` itself, or for a width sub-model (`Variant.sliced`)
    a copy sliced from it (Linear layers with d of the hidden units: weights, gradients, optimiser state and
    activations are those of the sub-model; `path_model` keeps only its shapes, on the meta device). With
    `test` examples (its held-out data of its path's cluster), every upload carries the spec's metrics of the
    trained path on them: federated evaluation.
    """

    spec: Spec
    path_model: nn.Module
    batches: Iterator[Batch]
    weight: float
    variant: Variant = field(default_factory=Variant)
    optimizer_state: dict[str, Any] | None = None
    feedback: ErrorFeedback | None = None
    test: Examples | None = None
    router_data: RouterData | None = None  # its client's examples and their clusters
    compute: Compute = field(default_factory=Compute)  # where and in what precision it trains
    held_round: int | None = None  # the round whose sub-model units the optimiser state and residuals follow
    model: nn.Module = field(
        init=False
    )  # what it trains: `path_model`, or the width sub-model sliced from it

    def __post_init__(self) -> None:
        self.weight = float(self.weight)
        if self.feedback is None:
            self.feedback = ErrorFeedback(self.variant.bits)
        self.model = self.path_model
        if self.variant.sliced:
            v = self.variant
            kept = width_slices(shapes_only(self.path_model), v.density, v.scheme)
            zeros = {
                n: torch.zeros(sliced_shape(p.shape, kept.get(n)))
                for n, p in self.path_model.named_parameters()
            }
            self.model = sliced_model(self.path_model, zeros)

    def train_round(self, job: Job) -> Upload:
        """Load the job's weights, train `job.inner.steps` steps on `compute.device`, return the compressed
        outer gradient (the model is back on the CPU afterwards)."""
        model, device = self.model, self.compute.device
        weights = {n: q for n, q in job.tensors.items() if not n.startswith(ROUTER)}
        masks = {} if self.variant.sliced else job.masks
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(scatter_held(dequantize(weights[name]), masks.get(name), p.shape))
        model.to(device)
        names = {id(p): n for n, p in model.named_parameters()}
        restrictions = self.restrictions(model, masks)
        for module, name, mask in restrictions:
            held = None if mask is None else mask.to(device)
            parametrize.register_parametrization(module, name, Restrict(held, self.variant.bits))
        if self.variant.sliced:
            self.follow_units(job, [names[id(p)] for p in model.parameters()])
        batches = self.spec.training_batches(self.batches, job.seed * 1_000_003 + job.round)
        loss, self.optimizer_state = train_local(
            model, batches, job.inner, self.optimizer_state, self.spec.loss, self.spec.optimizer, self.compute
        )
        # keep the weights as the client computed with them: masked, fake-quantized
        for module, name, _ in restrictions:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        model.to("cpu")
        tensors = {}
        for name, p in model.named_parameters():
            mask = masks.get(name)
            delta = scatter_held(dequantize(weights[name]), mask, p.shape) - p.detach()
            tensors[name] = self.feedback.compress(name, delta if mask is None else delta * mask, mask)
        router = {n[len(ROUTER) :]: q for n, q in job.tensors.items() if n.startswith(ROUTER)}
        if router:
            tensors.update(self.train_router(router, job))
        evaluation = {}
        if self.test is not None and len(self.test):
            evaluation = {**self.spec.evaluate(model, self.test), "examples": float(len(self.test))}
        return Upload(job.path, self.variant, job.round, job.seed, self.weight, tensors, loss, evaluation)

    def follow_units(self, job: Job, order: list[str]) -> None:
        """Move a width sub-model's optimiser state and error-feedback residuals from the units it held in
        `held_round` to this round's (rolling and random sub-models change units every round): a unit held
        in both keeps its state, a new one starts from zero. `order`: the parameter names in the optimiser's
        order."""
        v, shapes = self.variant, {n: p.shape for n, p in self.path_model.named_parameters()}
        if self.held_round is not None and self.held_round != job.round:
            old = width_slices(self.path_model, v.density, v.scheme, self.held_round, job.seed)
            new = width_slices(self.path_model, v.density, v.scheme, job.round, job.seed)

            def move(name: str, t: torch.Tensor) -> torch.Tensor:
                every = (None,) * len(shapes[name])
                return reheld(t, old.get(name, every), new.get(name, every), shapes[name])

            if self.optimizer_state is not None:
                for index, entries in self.optimizer_state["state"].items():
                    name = order[int(index)]
                    for key, value in entries.items():
                        if isinstance(value, torch.Tensor) and value.dim() == len(shapes[name]):
                            entries[key] = move(name, value)
            self.feedback.restore({n: move(n, r) for n, r in self.feedback.residuals.items()})
        self.held_round = job.round

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What this worker carries from round to round, as tensors and JSON for a checkpoint: its optimiser's
        state, its error-feedback residuals and, drawing from a `BatchSampler`, the position of its batch
        stream. `load_state` restores it."""
        tensors: dict[str, torch.Tensor] = {}
        optimizer = None
        if self.optimizer_state is not None:
            values: dict[str, dict[str, Any]] = {}
            for index, entries in self.optimizer_state["state"].items():
                values[str(index)] = {}
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optimizer/{index}/{key}"] = value
                    else:
                        values[str(index)][key] = value
            optimizer = {"state": values, "param_groups": self.optimizer_state["param_groups"]}
        for name, residual in self.feedback.residuals.items():
            tensors[f"feedback/{name}"] = residual
        if isinstance(self.batches, BatchSampler):
            tensors["batches"] = self.batches.generator.get_state()
        return tensors, {"optimizer": optimizer, "held_round": self.held_round}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Continue from a state that `state` returned (of a worker on the same path, variant and data)."""
        if "batches" in tensors and not isinstance(self.batches, BatchSampler):
            raise ValueError("the saved worker drew batches from its examples; this one draws from a stream")
        optimizer, optimizer_state, residuals = meta["optimizer"], None, {}
        if optimizer is not None:
            state = {int(index): dict(entries) for index, entries in optimizer["state"].items()}
            optimizer_state = {"state": state, "param_groups": optimizer["param_groups"]}
        for name, t in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "optimizer":
                index, _, key = rest.partition("/")
                optimizer_state["state"][int(index)][key] = t
            elif kind == "feedback":
                residuals[rest] = t
        self.optimizer_state, self.held_round = optimizer_state, meta.get("held_round")
        self.feedback.restore(residuals)
        if "batches" in tensors:
            self.batches.generator.set_state(tensors["batches"])

    def train_router(self, weights: dict[str, QTensor], job: Job) -> dict[str, QTensor]:
        """Train the delivered learned router `ROUTER_STEPS` steps on the client's features and cluster
        labels (prepared afresh each round for a spec that prepares its examples); return its change
        (start - end), at 32 bits, under the "router/" names."""
        if self.router_data is None:
            raise ValueError(
                "this worker was sent the router to train but holds no routing data (router_data)"
            )
        start = {n: dequantize(q) for n, q in weights.items()}
        hidden, width = start["net.0.weight"].shape
        router = LearnedRouter(width, start["net.2.weight"].shape[0], hidden)
        router.load_state_dict(start)
        seed = job.seed * 1_000_003 + job.round
        features, labels = self.router_data.pairs(self.spec, ROUTER_STEPS * ROUTER_BATCH, seed)
        router.fit(features, labels, steps=ROUTER_STEPS, batch_size=ROUTER_BATCH, seed=seed)
        end = router.tensors()
        return {ROUTER + n: quantize(start[n] - end[n], 32) for n in start}

    def restrictions(
        self, model: nn.Module, masks: Masks
    ) -> list[tuple[nn.Module, str, torch.Tensor | None]]:
        """(module, parameter name, mask) for every parameter trained under a mask or fake-quantization."""
        out = []
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                mask = masks.get(full)
                if mask is not None or (self.variant.bits < 32 and p.dim() >= 2):
                    out.append((module, name, mask))
        return out


def shapes_only(model: nn.Module) -> nn.Module:
    """Move `model`'s parameters (not its buffers) to the meta device, in place: the shapes a width sub-model
    is sliced from, without their memory."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(p.detach().to("meta"), p.requires_grad))
    return model


def sliced_model(template: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `template` whose parameters are `values` (by name, held shapes: a width sub-model's sliced
    weights), its Linear layers' sizes following them. `template`'s parameters are never read."""
    memo = {id(p): nn.Parameter(values[n], p.requires_grad) for n, p in template.named_parameters()}
    model = copy.deepcopy(template, memo)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    return model


class LocalExamples:
    """A client's own examples as its workers train and evaluate on them; their routing features are
    computed once (they answer federated k-means, make the histogram and split the examples by cluster)."""

    def __init__(self, spec: Spec, train: Examples, test: Examples | None = None):
        self.spec, self.train = spec, train
        self.test = test if test is not None and len(test) else None

    @cached_property
    def features(self) -> np.ndarray:
        """The routing features of the training examples."""
        return self.spec.features(self.train)

    @cached_property
    def test_features(self) -> np.ndarray | None:
        """The routing features of the held-out examples (None without any)."""
        return None if self.test is None else self.spec.features(self.test)

    def worker(
        self,
        path_model: nn.Module,
        variant: Variant,
        seed: int,
        batch_size: int,
        cluster: int | None = None,
        routing: tuple[np.ndarray, np.ndarray | None] | None = None,
        trains_router: bool = False,
        compute: Compute | None = None,
    ) -> Worker:
        """A worker on these examples: all of them (`cluster` None), or those of `cluster` under the converged
        `routing` (centroids, prices), held-out examples likewise. `trains_router`: it also trains the learned
        router on all the training features, labelled with their clusters. Batches are seeded by `seed`."""
        train, test = self.train, self.test
        if (cluster is not None or trains_router) and routing is None:
            raise ValueError(
                "a worker of a cluster, or of the learned router, needs the converged clustering"
            )
        if cluster is not None:
            train = train.subset(members(self.features, *routing, cluster))
            if test is not None:
                test = test.subset(members(self.test_features, *routing, cluster))
        router_data = None
        if trains_router:
            router_data = RouterData(self.train, self.features, nearest(self.features, *routing))
        batches = train.batches(batch_size, seed)
        compute = compute or Compute()
        return Worker(
            self.spec,
            path_model,
            batches,
            len(train),
            variant,
            test=test,
            router_data=router_data,
            compute=compute,
        )
