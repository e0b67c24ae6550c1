"""Communication benchmark: bytes each client uploads until the model reaches
a target test accuracy on digits.

Side by side, all run through Flower's simulation engine with the same number of clients and the same
model family (the digits MLP):

- Flower's stock FedAvg (`flwr.serverapp.strategy.FedAvg`, bench/fedavg.py): one dense MLP, every client
  trains it for one local epoch per round and uploads its fp32 weights; once with the clients holding iid
  parts of the data (FedAvg's best case, the reference the ratios refer to) and once with the clients
  holding exactly the data of fedmoe's clients (client i of n: `spec.data(i, n)`, one k-means cluster of
  the digits). Then both again with as many local steps per round as fedmoe's clients take (H);
- fedmoe (`fedmoe.strategies.flower`): MLP experts (one per client cluster by default, `--grid`), the
  clients' paths following their data (federated k-means), routed by the federated centroids (top-1), H
  local steps per round at a constant inner learning rate, the outer step `resolve_outer` picks for the
  workers per expert, outer gradients uploaded at 8 and at 4 bits.

Upload bytes are tensor bytes (payload and per-channel scales), without message framing. Runs of one
local epoch per round stop at `--max-rounds`, runs of H local steps at `--max-rounds-h`; a run that
never reaches the target gives a lower bound on the ratio: the bytes it uploaded without reaching it.

    python bench/communication.py
    python bench/communication.py --seeds 3 --target 0.9 --clients 8 --steps 400 --max-rounds 40
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from fedavg import fedavg_baseline
from rich.console import Console
from rich.table import Table

from fedmoe.config import ClientsConfig, Config, InnerConfig
from fedmoe.data import load_digits_split
from fedmoe.strategies.flower import simulate_federation

BATCH_SIZE = 32


@dataclass
class Run:
    """One benchmark run: its label, data, local steps per round,
    per-round accuracy and upload bytes per client.
    """

    label: str
    data: str
    local_steps: float
    accuracy: list[float]
    upload: list[float]
    seconds: float

    def to_target(self, target: float) -> tuple[int | None, float]:
        """(first round at or above target or None,
        bytes one client uploaded up to it or in the whole run).
        """
        for r, acc in enumerate(self.accuracy):
            if acc >= target:
                return r + 1, sum(self.upload[: r + 1])
        return None, sum(self.upload)


def runs_for_seed(args: argparse.Namespace, seed: int, console: Console) -> list[Run]:
    """The six runs of one seed: FedAvg (1 epoch, H steps) x (iid, fedmoe's clients), fedmoe int8 and int4."""
    epoch_steps = len(load_digits_split()[0]) / args.clients / BATCH_SIZE
    long_epochs = max(1, round(args.steps / epoch_steps))
    runs: list[Run] = []
    for epochs, rounds in ((1, args.max_rounds), (long_epochs, args.max_rounds_h)):
        for data, iid in (("iid", True), ("fedmoe's clients", False)):
            console.print(
                f"seed {seed}: FedAvg, {epochs} local epoch(s), {data}: {args.clients} clients, "
                f"{rounds} rounds ..."
            )
            started = time.perf_counter()
            rows = fedavg_baseline(
                args.clients, rounds, epochs=epochs, batch_size=BATCH_SIZE, iid=iid, seed=seed
            )["rounds"]
            label = f"Flower FedAvg, fp32, {epochs} epoch{'s' * (epochs > 1)}"
            runs.append(
                Run(
                    label,
                    data,
                    rows[0]["local_steps"],
                    [r["accuracy"] for r in rows],
                    [r["upload_bytes_per_client"] for r in rows],
                    time.perf_counter() - started,
                )
            )
    for bits in (8, 4):
        console.print(f"seed {seed}: fedmoe int{bits}: {args.clients} clients, {args.max_rounds_h} rounds")
        started = time.perf_counter()
        config = Config(
            grid=(args.grid,),
            rounds=args.max_rounds_h,
            seed=seed,
            inner=InnerConfig(steps=args.steps, batch_size=BATCH_SIZE, schedule="constant"),
            clients=ClientsConfig(count=args.clients, profiles=(f"int{bits}",)),
        )
        rows = simulate_federation(config)["rounds"]
        runs.append(
            Run(
                f"fedmoe, {args.grid} experts, int{bits}",
                "fedmoe's clients",
                args.steps,
                [r["accuracy"] for r in rows],
                [r["upload_bytes"] / r["updates"] for r in rows],
                time.perf_counter() - started,
            )
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--grid", type=int, default=8, help="fedmoe experts (default: one per client's cluster)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=400,
        help="local steps per round (H) of fedmoe and of the long FedAvg runs",
    )
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--max-rounds", type=int, default=40, help="rounds of the one-epoch FedAvg runs")
    parser.add_argument("--max-rounds-h", type=int, default=5, help="rounds of the runs of H local steps")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds (data split, initial weights, batches); the table shows the worst",
    )
    args = parser.parse_args()
    console = Console(width=170)
    by_seed = [runs_for_seed(args, seed, console) for seed in range(args.seeds)]

    reference = by_seed[0][0]
    table = Table(
        title=(
            f"digits, {args.clients} clients: bytes each client uploads to reach {args.target:.0%} "
            f"test accuracy ({args.seeds} seed{'s' * (args.seeds > 1)}: rounds per seed, the other columns "
            "the worst seed)"
        ),
        caption=(
            f"ratio: {reference.label} on {reference.data} data / this, seed by seed; '>' where this "
            "never reached the target (its bytes in all its rounds); fedmoe: routed ensemble (top-1), "
            "DiLoCo outer steps"
        ),
    )
    for column in (
        "run",
        "client data",
        "local steps / round",
        "bytes / client / round",
        "rounds to target",
        "bytes / client to target",
        "ratio",
        "best accuracy",
        "wall s",
    ):
        table.add_column(column, justify="left" if column in ("run", "client data") else "right")
    references = [runs[0].to_target(args.target) for runs in by_seed]
    for i, run in enumerate(by_seed[0]):
        seeds = [runs[i] for runs in by_seed]
        reached = [r.to_target(args.target) for r in seeds]
        worst = max(range(len(seeds)), key=lambda k: (reached[k][0] is None, reached[k][1]))
        rounds, total = reached[worst]
        if any(ref_rounds is None for ref_rounds, _ in references):
            ratio = "-"
        else:
            ratios = [ref_bytes / b for (_, ref_bytes), (_, b) in zip(references, reached)]
            k = min(range(len(ratios)), key=ratios.__getitem__)
            ratio = f"{ratios[k]:.1f}x" if reached[k][0] is not None else f"<{ratios[k]:.2f}x"
        table.add_row(
            run.label,
            run.data,
            f"{run.local_steps:.0f}",
            f"{sum(run.upload) / len(run.upload):,.0f}",
            ", ".join(
                str(r) if r is not None else f"not in {len(s.accuracy)}" for (r, _), s in zip(reached, seeds)
            ),
            f"{total:,.0f}" if rounds is not None else f">{total:,.0f}",
            ratio,
            f"{min(max(s.accuracy) for s in seeds):.3f}",
            f"{max(s.seconds for s in seeds):.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
