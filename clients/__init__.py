"""The client SDK: `run(server, spec, profile, data=...)` joins a federation with your data and trains;
`leave(server, state_file)` leaves it."""

from fedmoe.clients.runtime import leave, run

__all__ = ["leave", "run"]
