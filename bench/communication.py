"""Communication benchmark: bytes each client uploads until the model reaches a target test accuracy on digits.

Side by side, both run through Flower's simulation engine with the same number of clients on the same
data and model family (the digits MLP):

- Flower's stock FedAvg (`flwr.serverapp.strategy.FedAvg`): one dense MLP, every client trains it for
  one local epoch per round on an iid part of the data and uploads its fp32 weights (the peer baseline
  the ratios refer to); once more with as many local steps per round as fedmoe's clients take;
- fedmoe: one MLP expert per clustered shard, routed by federated centroids (top-1), two clients per
  expert training H local steps per round, DiLoCo outer steps (lr 0.7, Nesterov momentum 0.9), outer
  gradients uploaded at 8 and at 4 bits.

Upload bytes are tensor bytes (payload and per-channel scales), without message framing. Each run
stops at `--max-rounds`; a run that never reaches the target says so.

    python bench/communication.py
    python bench/communication.py --target 0.9 --max-rounds 30 --clients 8 --steps 20
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from fedmoe.strategies.flower import FlowerConfig, cached_task, fedavg_baseline, simulate_federation
from fedmoe.train import InnerConfig

BATCH_SIZE = 32


def to_target(accuracy: list[float], upload_per_client: list[float], target: float) -> tuple[int | None, float | None]:
    """(first round at or above target, bytes one client uploaded up to it), or (None, None)."""
    for r, acc in enumerate(accuracy):
        if acc >= target:
            return r + 1, sum(upload_per_client[: r + 1])
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--grid", type=int, default=4, help="fedmoe experts (the clients are shared out among them)")
    parser.add_argument("--steps", type=int, default=20, help="fedmoe inner steps per round (H)")
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=150)
    epoch_steps = -(-cached_task("digits").n_units // args.clients // BATCH_SIZE)

    runs = []  # (label, local steps per round, accuracy per round, upload bytes per client per round, seconds)
    for epochs in sorted({1, max(1, round(args.steps / epoch_steps))}):
        started = time.perf_counter()
        console.print(f"FedAvg, {epochs} local epoch(s): {args.clients} clients, {args.max_rounds} rounds ...")
        fedavg = fedavg_baseline(args.clients, args.max_rounds, epochs=epochs, batch_size=BATCH_SIZE, seed=args.seed)
        runs.append((f"Flower FedAvg, dense, fp32, {epochs} epoch{'s' * (epochs > 1)}", str(epochs * epoch_steps), [r["accuracy"] for r in fedavg["rounds"]],
                     [r["upload_bytes_per_client"] for r in fedavg["rounds"]], time.perf_counter() - started))
    for bits in (8, 4):
        started = time.perf_counter()
        console.print(f"fedmoe int{bits}: {args.clients} clients, {args.max_rounds} rounds ...")
        config = FlowerConfig(grid=(args.grid,), clients=args.clients, profiles=(f"int{bits}",), rounds=args.max_rounds,
                              inner=InnerConfig(steps=args.steps, batch_size=BATCH_SIZE), seed=args.seed)
        result = simulate_federation(config)
        runs.append((f"fedmoe, {args.grid} experts, int{bits}", str(args.steps), [r["top1"] for r in result["rounds"]],
                     [r["upload_bytes"] / r["clients"] for r in result["rounds"]], time.perf_counter() - started))

    table = Table(title=f"digits, {args.clients} clients: bytes each client uploads to reach {args.target:.0%} test accuracy (at most {args.max_rounds} rounds)",
                  caption="fedmoe: routed ensemble (top-1) of one MLP expert per clustered shard, DiLoCo outer steps; ratio: FedAvg 1 epoch / this")
    for column in ("run", "local steps / round", "bytes / client / round", "rounds to target", "bytes / client to target", "ratio", "best accuracy", "wall s"):
        table.add_column(column, justify="left" if column == "run" else "right")
    _, baseline = to_target(runs[0][2], runs[0][3], args.target)
    for label, steps, accuracy, upload, seconds in runs:
        rounds, total = to_target(accuracy, upload, args.target)
        ratio = f"{baseline / total:.1f}x" if baseline is not None and total is not None else "-"
        table.add_row(
            label, steps, f"{sum(upload) / len(upload):,.0f}", "not reached" if rounds is None else str(rounds),
            "not reached" if total is None else f"{total:,.0f}", ratio, f"{max(accuracy):.3f}", f"{seconds:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
