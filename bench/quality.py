"""Quality benchmark: dense model vs experts alone vs routed ensembles, on digits and on the Bible byte LM.

Each path trains `rounds x steps` inner steps after the shared rounds. The dense model (the size of
one expert) is trained twice: at equal total training FLOPs (n_paths x the steps of one path per
round, the same number of rounds) and at equal steps per expert (the steps of one path per round).
Ratios are against the dense model at equal total FLOPs: for accuracy higher is better, for bits per
byte lower is better. Values are means over seeds.

    python bench/quality.py                         # both tasks
    python bench/quality.py --task digits --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from fedmoe.experiment import ExperimentConfig, compare, train_dense
from fedmoe.tasks import load_task
from fedmoe.train import InnerConfig

SETTINGS = {
    "digits": (ExperimentConfig(grid=(4,), rounds=10, shared_rounds=3, inner=InnerConfig(steps=50, lr=3e-3, batch_size=32)), 3),
    "bible": (
        ExperimentConfig(
            grid=(4,), rounds=8, shared_rounds=2, inner=InnerConfig(steps=100, lr=2e-3, batch_size=32),
            clustering="balanced-kmeans", router="centroid",
        ),
        1,
    ),
}


def run(task_name: str, seeds: int) -> Table:
    """Train every contender for one task and return its table."""
    task = load_task(task_name)
    config, default_seeds = SETTINGS[task_name]
    seeds = seeds or default_seeds
    started = time.perf_counter()
    comparison = compare(task, config, seeds)
    per_expert = [train_dense(task, replace(config, seed=config.seed + s), config.inner.steps).final["dense"] for s in range(seeds)]
    mean = statistics.fmean
    h, n, r, shared = config.inner.steps, config.n_paths, config.rounds, config.shared_rounds
    total = r * h * n
    per_path = shared * h * n + (r - shared) * h
    rows = [
        ("dense, equal total FLOPs", total, total, mean(d.final["dense"] for d in comparison.dense)),
        ("dense, equal steps per expert", r * h, r * h, mean(per_expert)),
    ]
    for partition, runs in comparison.experts.items():
        rows.append((f"{partition}: mean expert alone", per_path, total, mean(mean(x.experts) for x in runs)))
        for k in config.top_ks:
            rows.append((f"{partition}: ensemble top-{k}", per_path, total, mean(x.final[f"top{k}"] for x in runs)))
    reference = rows[0][3]
    title = (f"{task_name}: test {task.metric.replace('_', ' ')}, {n} paths, {shared} shared + {r - shared} branched rounds x {h} steps, "
             f"mean of {seeds} seed(s), {time.perf_counter() - started:.0f} s")
    table = Table(title=title)
    for column in ("model", "steps per model", "total steps", task.metric, "ratio to dense at equal FLOPs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, steps, total_steps, value in rows:
        table.add_row(name, str(steps), str(total_steps), f"{value:.4f}", f"{value / reference:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(SETTINGS), action="append", help="task(s) to run (default: all)")
    parser.add_argument("--seeds", type=int, default=0, help="seeds per task (default: 3 for digits, 1 for bible)")
    args = parser.parse_args()
    console = Console(width=140)
    for task_name in args.task or ["digits", "bible"]:
        console.print(run(task_name, args.seeds))


if __name__ == "__main__":
    main()
