"""Quality benchmark: dense model vs experts alone vs routed ensembles, on digits and on the Bible byte LM.

The experts' budget is `rounds x steps` inner steps each. The dense model is trained twice: at equal
total training FLOPs (n_paths x the steps of one expert, the same model size) and at equal steps per
expert (the steps of one expert). Ratios are against the dense model at equal total FLOPs; for bits per
byte lower is better, for accuracy higher is better.

    python bench/quality.py                 # both tasks
    python bench/quality.py --task digits   # one
"""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from fedmoe.experiment import ExperimentConfig, train_dense, train_experts
from fedmoe.tasks import load_task
from fedmoe.train import InnerConfig

SETTINGS = {
    "digits": ExperimentConfig(grid=(4,), rounds=10, inner=InnerConfig(steps=50, lr=3e-3, batch_size=32)),
    "bible": ExperimentConfig(grid=(4,), rounds=8, inner=InnerConfig(steps=50, lr=2e-3, batch_size=16)),
}


def run(task_name: str, console: Console) -> Table:
    """Train every contender for one task and return its table."""
    task = load_task(task_name)
    config = SETTINGS[task_name]
    steps = config.inner.steps
    started = time.perf_counter()
    rows: list[tuple[str, int, float]] = []
    dense_flops = train_dense(task, config, steps * config.n_paths, progress=True)
    dense_steps = train_dense(task, config, steps, progress=True)
    rows.append(("dense, equal total FLOPs", config.rounds * steps * config.n_paths, dense_flops.final["dense"]))
    rows.append(("dense, equal steps per expert", config.rounds * steps, dense_steps.final["dense"]))
    for partition in ("clustered", "random"):
        experts = train_experts(task, config, partition, progress=True)
        total = config.rounds * steps * config.n_paths
        rows.append((f"{partition}: mean expert alone", config.rounds * steps, sum(experts.experts) / len(experts.experts)))
        for k in config.top_ks:
            rows.append((f"{partition}: ensemble top-{k}", total, experts.final[f"top{k}"]))
    reference = rows[0][2]
    table = Table(title=f"{task_name}: test {task.metric.replace('_', ' ')} ({time.perf_counter() - started:.0f} s)")
    for column in ("model", "training steps", task.metric, "ratio to dense (equal FLOPs)"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, total_steps, value in rows:
        table.add_row(name, str(total_steps), f"{value:.4f}", f"{value / reference:.3f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(SETTINGS), action="append", help="task(s) to run (default: all)")
    args = parser.parse_args()
    console = Console()
    for task_name in args.task or sorted(SETTINGS, reverse=True):
        console.print(run(task_name, console))


if __name__ == "__main__":
    main()
