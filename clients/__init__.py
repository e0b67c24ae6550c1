"""The client SDK: `run(server, spec, profile, data=...)` joins a federation with your data and trains."""

from fedmoe.clients.runtime import run

__all__ = ["run"]
