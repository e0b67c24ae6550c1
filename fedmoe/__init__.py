"""fedmoe: train experts and paths on unlike machines, ensemble them with a router.

The public API: a `Spec` (the problem), a `Config` (the run), and three runners of the same round engine:
`run_federation` in-process, `fedmoe server` + `fedmoe.clients.run` over gRPC, `fedmoe simulate` on Flower.
"""

from fedmoe.config import Config
from fedmoe.ensemble import Ensemble
from fedmoe.federation import FederationResult, LocalClient, run_federation
from fedmoe.spec import ClientData, Examples, Spec, load_spec

__all__ = [
    "ClientData",
    "Config",
    "Ensemble",
    "Examples",
    "FederationResult",
    "LocalClient",
    "Spec",
    "load_spec",
    "run_federation",
]
