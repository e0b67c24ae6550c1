"""Simulation scale benchmark: fedmoe through Flower's simulation engine
(Ray backend) with 100 and 1,000 virtual clients.

A tiny setting (digits MLP, 4 experts, clients holding random parts of the digits: the spec `simulation:spec`
below, mixed client profiles, 2 rounds of 2 inner steps) so that the engine's cost shows: wall time of the
whole run (Ray start included) and the peak memory of the whole process tree (driver, Ray's services and
actors), per client count, with the ratios between the largest and the smallest count. Each count runs in a
fresh process; Ray's workers import this file's spec by name (Ray puts the script's folder on their path).

    python bench/simulation.py
    python bench/simulation.py --clients 100 1000 --rounds 2 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Self

from rich.console import Console
from rich.table import Table

from fedmoe.assignment import MIXES
from fedmoe.config import ClientsConfig, Config, InnerConfig
from fedmoe.data import client_parts, load_digits_split
from fedmoe.models import digits
from fedmoe.spec import ClientData, Examples
from fedmoe.strategies.flower import simulate_federation

try:
    import psutil
except ImportError:  # not installed on its own: Ray ships a copy, importable once ray is imported
    try:
        import ray  # noqa: F401, I001 - first: it puts the psutil it ships on the path
        import psutil
    except ImportError:
        psutil = None


@lru_cache(maxsize=1)
def _train() -> Examples:
    return load_digits_split()[0]


def random_part(partition: int, partitions: int) -> ClientData:
    """Client `partition` of `partitions`: an iid part of the training digits;
    cheap for any number of clients.
    """
    train = _train()
    mine, _ = client_parts(train.inputs.numpy(), None, partitions, how="iid")[partition]
    return ClientData(train.subset(mine))


spec = replace(digits.spec, name="digits-random", data=random_part)


class TreeMemory:
    """Peak resident memory of this process and all its descendants,
    sampled every `interval` seconds (psutil).
    """

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(clients: int, rounds: int, steps: int) -> dict:
    """One simulation in this process: wall time and peak memory of the process tree."""
    config = Config(
        spec="simulation:spec",
        grid=(4,),
        rounds=rounds,
        inner=InnerConfig(steps=steps, batch_size=8),
        clients=ClientsConfig(count=clients, profiles=MIXES["mixed"]),
    )
    started = time.perf_counter()
    if psutil is not None:
        with TreeMemory() as memory:
            results = simulate_federation(config)
        peak, method = memory.peak, "psutil: RSS of the process tree, sampled every 0.2 s"
    else:
        results = simulate_federation(config)
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        peak, method = (
            1024 * (own.ru_maxrss + children.ru_maxrss),
            "getrusage: max RSS of this process + of its largest reaped child",
        )
    return {
        "clients": clients,
        "seconds": time.perf_counter() - started,
        "server_seconds": results["seconds"],
        "peak_bytes": peak,
        "method": method,
        "top1": results["rounds"][-1]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    # internal: run the first count here, write JSON to this file
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        args.one.write_text(json.dumps(run_one(args.clients[0], args.rounds, args.steps)))
        return
    console = Console(width=150)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            out = Path(tmp) / f"{n}.json"
            console.print(f"simulating {n} clients ...")
            command = [
                sys.executable,
                __file__,
                "--clients",
                str(n),
                "--rounds",
                str(args.rounds),
                "--steps",
                str(args.steps),
                "--one",
                str(out),
            ]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append(json.loads(out.read_text()))
    table = Table(
        title=(
            f"Flower simulation (Ray): digits, 4 experts, mixed profiles, {args.rounds} rounds x "
            f"{args.steps} steps"
        ),
        caption=f"peak memory: {rows[0]['method']}",
    )
    for column in ("virtual clients", "wall s", "server app s", "peak MB", "MB / client", "top-1"):
        table.add_column(column, justify="right")
    for r in rows:
        mb = r["peak_bytes"] / 2**20
        table.add_row(
            f"{r['clients']:,}",
            f"{r['seconds']:.1f}",
            f"{r['server_seconds']:.1f}",
            f"{mb:,.0f}",
            f"{mb / r['clients']:.2f}",
            f"{r['top1']:.3f}",
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        table.add_row(
            f"{last['clients']:,} / {first['clients']:,}",
            f"{last['seconds'] / first['seconds']:.2f}x",
            f"{last['server_seconds'] / first['server_seconds']:.2f}x",
            f"{last['peak_bytes'] / first['peak_bytes']:.2f}x",
            "",
            "",
            style="bold",
        )
    console.print(table)


if __name__ == "__main__":
    main()
