"""Heterogeneity benchmark: the same federation with different client mixes, on digits and the Bible byte LM.

Every path is trained by four clients (one per profile of the mix), so all rows train for the same
number of steps; the paths branch from the same shared rounds. For each mix: the routed ensemble's
metric (top-1), bytes each client uploads per round, and the bytes its weights take on the device,
as means over clients and as ratios to the all-fp32 mix. The mixed federation is run with each
sub-model scheme: rolling (FedRolex), static (HeteroFL) and random.

First, what one client round of each variant costs on the wide digits MLP (8.5M parameters): peak memory and
time per inner step, each measured in a fresh process (`fedmoe.memory.measure_round`, the variants taking
turns, median of `--repeats`), as ratios to fp32 dense. A width sub-model trains sliced layers, so both
shrink with its width.

    python bench/heterogeneity.py
    python bench/heterogeneity.py --spec fedmoe.models.digits:spec --seeds 5
    python bench/heterogeneity.py --costs-only
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from fedmoe.assignment import MIXES
from fedmoe.config import Config, InnerConfig
from fedmoe.experiment import Experiment, train_dense, train_experts
from fedmoe.memory import measure_round
from fedmoe.spec import load_spec
from fedmoe.worker import Variant

ROWS = [  # (label, profiles, scheme)
    ("all fp32", ("fp32",) * 4, "rolling"),
    ("mixed, rolling (FedRolex)", MIXES["mixed"], "rolling"),
    ("mixed, static (HeteroFL)", MIXES["mixed"], "static"),
    ("mixed, random", MIXES["mixed"], "random"),
    ("all int8", ("int8",) * 4, "rolling"),
    ("all int4", ("int4",) * 4, "rolling"),
    ("all int4 + 50% width, rolling", ("int4-p50",) * 4, "rolling"),
]
DIGITS, BIBLE = "fedmoe.models.digits:spec", "fedmoe.models.bible:spec"
SETTINGS = {  # spec -> (experiment, seeds)
    DIGITS: (
        Experiment(Config(grid=(4,), rounds=10, inner=InnerConfig(steps=50, lr=3e-3, batch_size=32)), 3),
        3,
    ),
    BIBLE: (
        Experiment(
            Config(grid=(2,), rounds=4, inner=InnerConfig(steps=30, lr=2e-3, batch_size=16)), 1, "centroid"
        ),
        1,
    ),
}


COST_SPEC = "fedmoe.models.digits:wide"
COST_VARIANTS = [
    Variant(32),
    Variant(16),
    Variant(8),
    Variant(4),
    Variant(32, 0.5),
    Variant(4, 0.5),
    Variant(32, 0.25),
    Variant(4, 0.25),
]


def variant_costs(repeats: int) -> Table:
    """Peak memory and step time of one client round per variant, as ratios to fp32 dense."""
    runs: dict[str, list[dict]] = {v.name: [] for v in COST_VARIANTS}
    for _ in range(repeats):
        for variant in COST_VARIANTS:  # in turns, so that the machine's noise falls on every variant alike
            runs[variant.name].append(measure_round(COST_SPEC, variant, steps=10))
    median = statistics.median
    summary = {
        name: (median(r["peak"] for r in rs), median(r["step_s"] for r in rs), rs[0]["estimate"])
        for name, rs in runs.items()
    }
    peak0, step0, _ = summary["fp32"]
    table = Table(title=f"one client round on {COST_SPEC} (batch 32, 10 steps), median of {repeats}")
    for column in ("variant", "peak MiB", "ratio", "estimate MiB", "ms / step", "ratio"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, (peak, step, estimate) in summary.items():
        table.add_row(
            name,
            f"{peak / 2**20:,.1f}",
            f"{peak / peak0:.3f}",
            f"{estimate / 2**20:,.1f}",
            f"{1000 * step:.1f}",
            f"{step / step0:.3f}",
        )
    return table


def with_clients(experiment: Experiment, profiles: tuple[str, ...], scheme: str, seed: int) -> Experiment:
    """The experiment with these client profiles, sub-model scheme and seed."""
    config = experiment.config
    update = {
        "seed": config.seed + seed,
        "clients": config.clients.model_copy(update={"profiles": profiles}),
        "compression": config.compression.model_copy(update={"scheme": scheme}),
    }
    return replace(experiment, config=config.model_copy(update=update))


def run(ref: str, seeds: int) -> Table:
    """Train every mix for one spec and return its table."""
    spec = load_spec(ref)
    base, default_seeds = SETTINGS[ref]
    seeds = seeds or default_seeds
    started = time.perf_counter()
    results: dict[str, list] = {label: [] for label, _, _ in ROWS}
    for seed in range(seeds):
        seeded = with_clients(base, ROWS[0][1], "rolling", seed)
        dense = train_dense(spec, seeded, seeded.steps_per_round, progress=True)
        for label, profiles, scheme in ROWS:
            results[label].append(
                train_experts(spec, with_clients(base, profiles, scheme, seed), "clustered", True, dense)
            )
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
    accuracy = spec.metric == "accuracy"
    table = Table(
        title=(
            f"{spec.name}: {base.config.n_paths} paths x 4 clients, ensemble top-1, mean of {seeds} seed(s), "
            f"{time.perf_counter() - started:.0f} s"
        )
    )
    for column in (
        "client mix",
        spec.metric,
        "vs all fp32",
        "upload B/client/round",
        "ratio",
        "weights B/client",
        "ratio",
    ):
        table.add_column(column, justify="left" if column == "client mix" else "right")
    for label, (metric, upload, weights) in summary.items():
        delta = f"{100 * (metric - metric0):+.2f} pt" if accuracy else f"{metric / metric0:.3f}x"
        value = f"{100 * metric:.2f}%" if accuracy else f"{metric:.4f}"
        table.add_row(
            label,
            value,
            delta,
            f"{upload:,.0f}",
            f"{upload / upload0:.3f}",
            f"{weights:,.0f}",
            f"{weights / weights0:.3f}",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spec", choices=sorted(SETTINGS), action="append", help="spec(s) to run (default: both)"
    )
    parser.add_argument(
        "--seeds", type=int, default=0, help="seeds per spec (default: 3 for digits, 1 for bible)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="measurements per variant (median)")
    parser.add_argument("--costs-only", action="store_true", help="print only the per-variant costs")
    args = parser.parse_args()
    console = Console(width=160)
    console.print(variant_costs(args.repeats))
    if args.costs_only:
        return
    for ref in args.spec or list(SETTINGS):
        console.print(run(ref, args.seeds))


if __name__ == "__main__":
    main()
