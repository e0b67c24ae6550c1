"""The client SDK: `run(server, profile, data=..., model_fn=...)` joins a federation and trains until it is done."""

from fedmoe.clients.runtime import run

__all__ = ["run"]
