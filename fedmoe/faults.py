"""Crash points for fault-injection tests of the coordinator.

`FEDMOE_CRASH_AT="name:n"` makes the process end at once (os._exit, as a SIGKILL would: nothing is flushed or
cleaned up) the n-th time `crash_point(name)` runs. Unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os

CRASH_ENV = "FEDMOE_CRASH_AT"
CRASH_STATUS = 137  # the status of a process killed by SIGKILL
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """End the process here when $FEDMOE_CRASH_AT names this point and its count is reached."""
    target = os.environ.get(CRASH_ENV)
    if not target:
        return
    point, _, count = target.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os._exit(CRASH_STATUS)
