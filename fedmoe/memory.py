"""What one client round really costs: peak memory and time, measured in a fresh process, beside the estimate
the assignment trusts (`fedmoe.assignment.training_bytes`).

    from fedmoe.memory import measure_round
    measure_round("fedmoe.models.digits:wide", Variant(4, 0.5))   # {"estimate": ..., "peak": ..., ...}

`fedmoe memory --spec REF --profile int4-p50` prints the same. The round runs as a networked client runs it:
its job holds the path's weights as the variant receives them, its model is built from its path alone (a width
sub-model: sliced), and it trains `steps` steps on the spec's own data (partition 0 of 1). Peak memory is the
process's resident high-water mark over the round (Linux: /proc/self/status VmHWM, reset before the round),
less what it held before, plus the bytes of the job it holds; large allocations are made with mmap, so that
memory freed is memory returned.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from fedmoe.worker import Variant

MMAP_THRESHOLD = 65536  # bytes: allocations above it are mapped and unmapped, so RSS follows what is live


def measure_round(
    spec: str, variant: Variant, steps: int = 5, batch_size: int = 32, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Run two client rounds of `variant` on one path of `spec` (an import string) in a fresh process; return
    {"estimate", "peak"} in bytes (the assignment's estimate and the measured peak over both rounds) and
    "step_s" (seconds per inner step of the second round)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": "0"}
    request = json.dumps({"spec": spec, "variant": asdict(variant), "steps": steps, "batch_size": batch_size})
    done = subprocess.run(
        [sys.executable, "-m", "fedmoe.memory", request],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring a {variant.name} round of {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _resident(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _round(request: dict[str, Any]) -> dict[str, Any]:
    """The measurement itself (in the fresh process `measure_round` starts)."""
    from fedmoe.assignment import training_bytes
    from fedmoe.config import InnerConfig
    from fedmoe.modular import Path
    from fedmoe.spec import ClientData, load_spec
    from fedmoe.worker import Job, Worker, make_job

    spec, variant = load_spec(request["spec"]), Variant(**request["variant"])
    inner = InnerConfig(steps=request["steps"], batch_size=request["batch_size"], schedule="constant")
    levels = spec.default_levels
    path = Path((0,) * levels)
    if spec.data is None:
        raise ValueError(f"spec {request['spec']!r} has no data loader to train on")
    data = spec.data(0, 1)
    train = data.train if isinstance(data, ClientData) else data
    grid = spec.build((1,) * levels)
    estimate = training_bytes(grid.compose(path), variant)
    jobs = [make_job(grid, path, variant, r, 0, inner) for r in range(2)]
    jobs = [Job(j.path, j.variant, j.round, j.seed, j.inner, j.tensors) for j in jobs]  # no masks, as sent
    warm = Worker(spec, spec.build_path(Path((0,) * levels)), train.batches(2, 0), 1.0)
    warm.train_round(make_job(grid, path, Variant(), 0, 0, InnerConfig(steps=1, batch_size=2)))
    del grid, warm
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size
    before = _resident("VmRSS")
    worker = Worker(
        spec,
        spec.build_path(path, shapes_only=variant.sliced),
        train.batches(inner.batch_size, 0),
        len(train),
        variant,
    )
    worker.train_round(jobs[0])
    started = time.perf_counter()
    worker.train_round(jobs[1])
    seconds = time.perf_counter() - started
    held = sum(q.nbytes for q in jobs[0].tensors.values())  # the job it holds, made before the baseline
    return {"estimate": estimate, "peak": _resident("VmHWM") - before + held, "step_s": seconds / inner.steps}


if __name__ == "__main__":
    print(json.dumps(_round(json.loads(sys.argv[1]))))
