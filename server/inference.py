"""The inference service: a trained ensemble of any spec answers Predict over gRPC, and a generative one
(a flow model) Sample."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import torch

from fedmoe.ensemble import Ensemble
from fedmoe.flow import SOLVERS, sample
from fedmoe.server.service import listen, server_options
from fedmoe.v1 import inference_pb2 as pb
from fedmoe.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("fedmoe.serve")
MAX_SAMPLES = 4096  # per Sample request
MAX_STEPS = 1000
DEFAULT_STEPS = 20


def example(ensemble: Ensemble, request: pb.PredictRequest) -> torch.Tensor:
    """One request as model inputs: `text` through the spec's `encode_text`, or `inputs` as (1, N) float32."""
    spec = ensemble.spec
    if request.text:
        if spec.encode_text is None:
            raise ValueError(
                f"spec {spec.ref or spec.name!r} has no encode_text: send `inputs` (numbers), "
                "or give the spec an encode_text to take text"
            )
        return spec.encode_text(request.text)
    if not request.inputs:
        raise ValueError("send `inputs` (one example's numbers) or `text`")
    return torch.tensor([list(request.inputs)], dtype=torch.float32)


def predict(ensemble: Ensemble, inputs: torch.Tensor, top_k: int) -> pb.PredictReply:
    """The ensemble's answer for one example: mixed outputs (a sequence's last position), experts, weights.

    Raises ValueError when the model does not accept the inputs.
    """
    try:
        prediction = ensemble.predict(inputs, top_k)
    except RuntimeError as e:
        raise ValueError(f"the model does not accept inputs of shape {tuple(inputs.shape)}: {e}") from None
    outputs = prediction.outputs[0]
    if outputs.dim() >= 2:  # a sequence: its last position (for a language model: the next token)
        outputs = outputs[-1]
    experts = prediction.experts[0].tolist()
    paths = [str(ensemble.paths[e]) for e in experts]
    weights = prediction.weights[0].tolist()
    return pb.PredictReply(outputs=outputs.flatten().tolist(), experts=experts, weights=weights, paths=paths)


def draw(ensemble: Ensemble, request: pb.SampleRequest, top_k: int) -> pb.SampleReply:
    """Samples of a generative ensemble as a request asks (see inference.proto's SampleRequest).

    Raises ValueError for a spec without a prior, a request out of bounds, or one asking for both `resample`
    and `hold`.
    """
    spec = ensemble.spec
    if spec.prior is None:
        raise ValueError(f"spec {spec.ref or spec.name!r} is not generative (it has no prior): use Predict")
    if not 1 <= request.n <= MAX_SAMPLES:
        raise ValueError(f"n must be in 1..{MAX_SAMPLES}, got {request.n}")
    if request.steps > MAX_STEPS:
        raise ValueError(f"steps must be at most {MAX_STEPS}, got {request.steps}")
    solver = request.solver or "euler"
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
    if request.resample and request.hold:
        raise ValueError(
            "ask for `resample` (an expert drawn per sample at every step) or `hold` (one drawn per sample "
            "and held along its path), not both"
        )
    k = None if request.full else (request.top_k or top_k)
    if k is not None and not 1 <= k <= len(ensemble.experts):
        raise ValueError(f"top_k must be in 1..{len(ensemble.experts)}, got {k}")
    samples = sample(
        ensemble,
        request.n,
        request.steps or DEFAULT_STEPS,
        solver,
        k,
        resample=request.resample,
        seed=request.seed,
        hold=request.hold,
    )
    return pb.SampleReply(samples=samples.flatten().tolist(), shape=list(samples.shape))


class InferenceService(pb_grpc.InferenceServicer):
    """Predict: route one example to the top-k experts and mix their outputs as the spec says. Sample: draw
    from a generative ensemble, mixing the experts' velocities by the router at every step (or following one
    expert per sample that the router draws)."""

    def __init__(self, ensemble: Ensemble, top_k: int = 1):
        self.ensemble, self.top_k = ensemble, top_k

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictReply:
        try:
            return predict(self.ensemble, example(self.ensemble, request), request.top_k or self.top_k)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> pb.SampleReply:
        try:
            return draw(self.ensemble, request, self.top_k)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def start_inference(
    ensemble: Ensemble, address: str, top_k: int = 1, certs: str | None = None
) -> tuple[grpc.Server, int]:
    """Serve Predict and Sample (and health checking) on `address`; returns the server and its port.

    Raises ValueError for a top-k the ensemble cannot mix, OSError when the port is in use.
    """
    if not 1 <= top_k <= len(ensemble.experts):
        raise ValueError(f"top-k must be in 1..{len(ensemble.experts)} (the ensemble's experts), got {top_k}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=server_options())
    pb_grpc.add_InferenceServicer_to_server(InferenceService(ensemble, top_k), server)
    port = listen(server, address, certs, "fedmoe.v1.Inference")
    log.info("inference on %s (port %d): %d experts, top-%d", address, port, len(ensemble.experts), top_k)
    return server, port
