"""The inference service: a trained ensemble answers Predict over gRPC."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import torch
from torch import nn

from fedmoe.data import encode_bytes, text_features
from fedmoe.ensemble import Ensemble
from fedmoe.server.service import listen
from fedmoe.v1 import inference_pb2 as pb
from fedmoe.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger("fedmoe.serve")


def example(ensemble: Ensemble, request: pb.PredictRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, routing features) of one request: a classifier's feature vector, or a text for a byte LM."""
    if ensemble.spec.family == "byte-lm":
        if not request.text:
            raise ValueError("this ensemble is a byte language model: send `text`")
        context = ensemble.spec.config.get("context", 64)
        tokens = encode_bytes(request.text)[-context:]
        return tokens.unsqueeze(0), torch.as_tensor(text_features([request.text]))
    inputs = torch.tensor([list(request.inputs)], dtype=torch.float32)
    expected = next(m for m in ensemble.experts[0].modules() if isinstance(m, nn.Linear)).in_features
    if inputs.shape[1] != expected:
        raise ValueError(f"expected {expected} input values, got {inputs.shape[1]}")
    return inputs, inputs


class InferenceService(pb_grpc.InferenceServicer):
    """Predict: route one example to the top-k experts and mix their output distributions."""

    def __init__(self, ensemble: Ensemble, top_k: int = 1):
        self.ensemble, self.top_k = ensemble, top_k

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictReply:
        try:
            inputs, features = example(self.ensemble, request)
            prediction = self.ensemble.predict(inputs, features, top_k=request.top_k or self.top_k)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        probs = prediction.probs[0]
        if probs.dim() == 2:  # a language model: the distribution over the next byte
            probs = probs[-1]
        experts = prediction.experts[0].tolist()
        return pb.PredictReply(probs=probs.tolist(), experts=experts, weights=prediction.weights[0].tolist(),
                               paths=[str(self.ensemble.paths[e]) for e in experts])


def start_inference(ensemble: Ensemble, address: str, top_k: int = 1, certs: str | None = None) -> tuple[grpc.Server, int]:
    """Serve Predict (and health checking) on `address`; returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_InferenceServicer_to_server(InferenceService(ensemble, top_k), server)
    port = listen(server, address, certs, "fedmoe.v1.Inference")
    log.info("inference on %s (port %d): %d experts, top-%d", address, port, len(ensemble.experts), top_k)
    return server, port
