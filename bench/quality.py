"""Quality benchmark: dense model vs experts alone vs routed ensembles, on digits, on the Bible byte LM and on
a flow model of digits (Decentralized Diffusion Models).

Each path trains `rounds x steps` inner steps after the shared rounds. The dense model (the size of
one expert) is trained twice: at equal total training FLOPs (n_paths x the steps of one path per
round, the same number of rounds) and at equal steps per expert (the steps of one path per round).
Ratios are against the dense model at equal total FLOPs: for accuracy higher is better, for bits per
byte lower is better. Values are means over seeds.

The flow task (`fedmoe.models.digits_flow:spec`) scores samples by Fréchet distance (FD, lower is better) in
the feature space of the frozen digits classifier that ships with fedmoe, against the 540 held-out digits:
each expert trains from scratch on one cluster (no shared rounds, as in DDM), the router is p(k | x_t, t) of
the clusters as Gaussians (full covariances), made from federated k-means' statistics (no router training),
and the ensemble mixes velocities at every sampling step: all experts, the top-2, the top-1, or one expert
re-sampled from the router per step; or each sample runs one expert drawn from the router by Gumbel-max with
its noise held over the whole path ("held": at t = 1 a draw from the clusters' shares, kept until the
router moves past it).

    python bench/quality.py                                           # both built-in specs
    python bench/quality.py --spec fedmoe.models.digits:spec --seeds 5
    python bench/quality.py --spec examples.tabular:spec --grid 3      # any spec with data and eval_data
    python bench/quality.py --spec fedmoe.models.digits_flow:spec      # the flow task, 3 seeds
    python bench/quality.py --spec fedmoe.models.digits_flow:spec --steps 4 8 20 50 --solver euler heun

With `--steps` or `--solver`, the flow task also samples the clustered experts' ensembles under both routers
(the federation's posterior router and one learned on the pooled noised data) with every (solver, steps)
setting, each contender from the same noise, and prints their FD side by side: all experts mixed, the top-k,
one expert re-sampled per step, with the ratio re-sampled / all mixed (above 1: re-sampling is worse), and
one expert held per sample.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from fedmoe.config import Config, InnerConfig, parse_grid
from fedmoe.experiment import ROUTERS, Comparison, Experiment, compare, generative, sampler_sweep, train_dense
from fedmoe.flow import SOLVERS
from fedmoe.spec import load_spec

DIGITS, BIBLE, FLOW = (
    "fedmoe.models.digits:spec",
    "fedmoe.models.bible:spec",
    "fedmoe.models.digits_flow:spec",
)
SETTINGS = {  # spec -> (experiment, seeds)
    DIGITS: (
        Experiment(
            Config(spec=DIGITS, grid=(4,), rounds=10, inner=InnerConfig(steps=50, lr=3e-3, batch_size=32)), 3
        ),
        3,
    ),
    BIBLE: (
        Experiment(
            Config(spec=BIBLE, grid=(4,), rounds=8, inner=InnerConfig(steps=100, lr=2e-3, batch_size=32)),
            2,
            "centroid",
        ),
        1,
    ),
    FLOW: (
        Experiment(
            Config(
                spec=FLOW,
                grid=(4,),
                rounds=10,
                inner=InnerConfig(steps=400, lr=3e-3, batch_size=64),
            ),
            0,
            "centroid",  # the federation's router: the posterior of the federated clusters' statistics
            samples=1000,
            sample_steps=20,
            solver="euler",
        ),
        3,
    ),
}


def run(
    ref: str,
    seeds: int,
    grid: tuple[int, ...] | None = None,
    router: str | None = None,
    settings: list[tuple[str, int]] | None = None,
) -> list[Table]:
    """Train every contender for one spec and return its table (and, for a generative spec given sampler
    `settings`, the table of `sweep_table`)."""
    spec = load_spec(ref)
    experiment, default_seeds = SETTINGS.get(ref, SETTINGS[DIGITS])
    experiment = replace(
        experiment,
        config=experiment.config.model_copy(update={"spec": ref, "grid": grid or experiment.config.grid}),
        router=router or experiment.router,
    )
    config = experiment.config
    seeds = seeds or default_seeds
    started = time.perf_counter()
    comparison = compare(spec, experiment, seeds)
    per_expert = [
        train_dense(
            spec,
            replace(experiment, config=config.model_copy(update={"seed": config.seed + s})),
            config.inner.steps,
        )
        for s in range(seeds)
    ]
    mean = statistics.fmean
    h, n, r, shared = config.inner.steps, config.n_paths, config.rounds, experiment.shared_rounds
    total = r * h * n
    per_path = shared * h * n + (r - shared) * h
    rows = [
        ("dense, equal total FLOPs", total, total, mean(d.final["dense"] for d in comparison.dense)),
        ("dense, equal steps per expert", r * h, r * h, mean(d.final["dense"] for d in per_expert)),
    ]
    # generative specs: every contender's other sample metrics, mean over seeds (and experts)
    others = {rows[0][0]: [d.quality["dense"] for d in comparison.dense]}
    others[rows[1][0]] = [d.quality["dense"] for d in per_expert]
    for partition, runs in comparison.experts.items():
        rows.append((f"{partition}: mean expert alone", per_path, total, mean(mean(x.experts) for x in runs)))
        others[rows[-1][0]] = [q for x in runs for name, q in x.quality.items() if name.startswith("expert")]
        for k in experiment.top_ks:
            rows.append(
                (f"{partition}: ensemble top-{k}", per_path, total, mean(x.final[f"top{k}"] for x in runs))
            )
            others[rows[-1][0]] = [x.quality.get(f"top{k}") for x in runs]
        if generative(spec):
            for key, name in (
                ("resample", f"{partition}: one expert re-sampled per step"),
                ("held", f"{partition}: one expert drawn per sample, held"),
            ):
                rows.append((name, per_path, total, mean(x.final[key] for x in runs)))
                others[name] = [x.quality[key] for x in runs]
    reference = rows[0][3]
    metric = comparison.metric
    extra = [m for m in (comparison.dense[0].quality.get("dense") or {}) if m != metric]
    title = (
        f"{spec.name}: test {metric.replace('_', ' ')}, {n} paths, {shared} shared + {r - shared} "
        f"branched rounds x {h} steps, {experiment.router} router, mean of {seeds} seed(s), "
        f"{time.perf_counter() - started:.0f} s"
    )
    table = Table(title=title)
    for column in (
        "model",
        "steps per model",
        "total steps",
        metric,
        "ratio to dense at equal FLOPs",
        *extra,
    ):
        table.add_column(column.replace("_", " "), justify="left" if column == "model" else "right")
    for name, steps, total_steps, value in rows:
        cells = [f"{mean(q[m] for q in others[name]):.4f}" for m in extra]
        table.add_row(name, str(steps), str(total_steps), f"{value:.4f}", f"{value / reference:.3f}", *cells)
    if settings and generative(spec):
        return [table, sweep_table(comparison, settings)]
    return [table]


def sweep_table(comparison: Comparison, settings: list[tuple[str, int]]) -> Table:
    """FD of the clustered experts' routed ensembles under each router and sampler setting, mean over seeds:
    all experts mixed, the top-k, one expert re-sampled per step, re-sampled / all mixed (the ratio of the
    means; "worse in" counts the seeds where re-sampling's FD is above all mixed), and one expert held."""
    spec, experiment, runs = comparison.spec, comparison.experiment, comparison.experts["clustered"]
    n, seed = experiment.config.n_paths, experiment.config.seed
    names = [*(f"top{k}" for k in experiment.top_ks), "resample", "held"]
    started = time.perf_counter()
    fds = {
        kind: [
            sampler_sweep(spec, experiment, run.ensembles[kind], settings, seed + s)
            for s, run in enumerate(runs)
        ]
        for kind in ROUTERS
    }
    table = Table(
        title=f"{spec.name}: FD by sampler, clustered experts, {experiment.samples} samples from the same "
        f"noise per seed, mean of {len(runs)} seed(s), {time.perf_counter() - started:.0f} s"
    )
    columns = [
        "router",
        "solver",
        "steps",
        *(f"top-{k}" if k < n else "all mixed" for k in experiment.top_ks),
    ]
    for column in [*columns, "re-sampled", "re-sampled / all", "worse in", "held"]:
        table.add_column(column, justify="left" if column in ("router", "solver") else "right")
    for kind, runs_fds in fds.items():
        label = "posterior (federated)" if kind == "centroid" else "learned (pooled)"
        for setting in settings:
            mean = {name: statistics.fmean(fd[setting][name] for fd in runs_fds) for name in names}
            worse = sum(fd[setting]["resample"] > fd[setting][f"top{n}"] for fd in runs_fds)
            table.add_row(
                label,
                *map(str, setting),
                *(f"{mean[name]:.2f}" for name in names[:-1]),
                f"{mean['resample'] / mean[f'top{n}']:.3f}",
                f"{worse}/{len(runs_fds)}",
                f"{mean['held']:.2f}",
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spec",
        action="append",
        help="spec(s) to run, as import strings (default: digits, bible and the digits flow)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="seeds per spec (default: 3 for digits and the flow, 1 for bible)",
    )
    parser.add_argument(
        "--grid", type=parse_grid, default=None, help="modules per level, e.g. 4 or 2x2 (default: 4)"
    )
    parser.add_argument(
        "--router",
        choices=["learned", "centroid"],
        default=None,
        help="the ensembles' router: learned on the pooled data, or the federation's own (default per spec)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="generative specs: also compare samplers at these numbers of steps (default with --solver: 20)",
    )
    parser.add_argument(
        "--solver",
        nargs="+",
        choices=SOLVERS,
        default=None,
        help="generative specs: and with these ODE solvers (default with --steps: euler)",
    )
    args = parser.parse_args()
    settings = None
    if args.steps or args.solver:
        settings = [(solver, steps) for solver in args.solver or ["euler"] for steps in args.steps or [20]]
    console = Console(width=140)
    for ref in args.spec or list(SETTINGS):
        for table in run(ref, args.seeds, args.grid, args.router, settings):
            console.print(table)


if __name__ == "__main__":
    main()
