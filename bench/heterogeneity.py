"""Heterogeneity benchmark: the same federation with different client mixes, on digits and the Bible byte LM.

Every path is trained by four clients (one per profile of the mix), so all rows train for the same
number of steps; the paths branch from the same shared rounds. For each mix: the routed ensemble's
metric (top-1), bytes each client uploads per round, and the bytes its weights take on the device,
as means over clients and as ratios to the all-fp32 mix. The mixed federation is run with each
sub-model scheme: rolling (FedRolex), static (HeteroFL) and random.

    python bench/heterogeneity.py
    python bench/heterogeneity.py --task digits --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from fedmoe.experiment import ExperimentConfig, train_dense, train_experts
from fedmoe.assignment import MIXES
from fedmoe.tasks import load_task
from fedmoe.train import InnerConfig

ROWS = [  # (label, profiles, scheme)
    ("all fp32", ("fp32",) * 4, "rolling"),
    ("mixed, rolling (FedRolex)", MIXES["mixed"], "rolling"),
    ("mixed, static (HeteroFL)", MIXES["mixed"], "static"),
    ("mixed, random", MIXES["mixed"], "random"),
    ("all int8", ("int8",) * 4, "rolling"),
    ("all int4", ("int4",) * 4, "rolling"),
    ("all int4 + 50% width, rolling", ("int4-p50",) * 4, "rolling"),
]
SETTINGS = {
    "digits": (ExperimentConfig(grid=(4,), rounds=10, shared_rounds=3, inner=InnerConfig(steps=50, lr=3e-3, batch_size=32)), 3),
    "bible": (
        ExperimentConfig(grid=(2,), rounds=4, shared_rounds=1, inner=InnerConfig(steps=30, lr=2e-3, batch_size=16),
                         clustering="balanced-kmeans", router="centroid"),
        1,
    ),
}


def run(task_name: str, seeds: int) -> Table:
    """Train every mix for one task and return its table."""
    task = load_task(task_name)
    base, default_seeds = SETTINGS[task_name]
    seeds = seeds or default_seeds
    started = time.perf_counter()
    results: dict[str, list] = {label: [] for label, _, _ in ROWS}
    for seed in range(seeds):
        seeded = replace(base, seed=base.seed + seed, profiles=ROWS[0][1])
        dense = train_dense(task, seeded, seeded.steps_per_round, progress=True)
        for label, profiles, scheme in ROWS:
            results[label].append(train_experts(task, replace(seeded, profiles=profiles, scheme=scheme), "clustered", True, dense))
    mean = statistics.fmean
    summary = {
        label: (
            mean(r.final["top1"] for r in runs),
            mean(c["upload_bytes_per_round"] for r in runs for c in r.clients),
            mean(c["weight_bytes"] for r in runs for c in r.clients),
        )
        for label, runs in results.items()
    }
    metric0, upload0, weights0 = summary["all fp32"]
    accuracy = task.metric == "accuracy"
    table = Table(title=f"{task_name}: {base.n_paths} paths x 4 clients, ensemble top-1, mean of {seeds} seed(s), {time.perf_counter() - started:.0f} s")
    for column in ("client mix", task.metric, "vs all fp32", "upload B/client/round", "ratio", "weights B/client", "ratio"):
        table.add_column(column, justify="left" if column == "client mix" else "right")
    for label, (metric, upload, weights) in summary.items():
        delta = f"{100 * (metric - metric0):+.2f} pt" if accuracy else f"{metric / metric0:.3f}x"
        value = f"{100 * metric:.2f}%" if accuracy else f"{metric:.4f}"
        table.add_row(label, value, delta, f"{upload:,.0f}", f"{upload / upload0:.3f}", f"{weights:,.0f}", f"{weights / weights0:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(SETTINGS), action="append", help="task(s) to run (default: all)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per task (default: 3 for digits, 1 for bible)")
    args = parser.parse_args()
    console = Console(width=160)
    for task_name in args.task or ["digits", "bible"]:
        console.print(run(task_name, args.seeds))


if __name__ == "__main__":
    main()
