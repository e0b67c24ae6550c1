"""The `fedmoe` command."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="fedmoe: train experts and paths on unlike machines, ensemble them with a router.", no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def root() -> None:
    """fedmoe: train experts and paths on unlike machines, ensemble them with a router."""


def parse_grid(text: str) -> tuple[int, ...]:
    """"4" -> (4,) independent experts; "2x2" -> (2, 2) a two-level DiPaCo grid."""
    try:
        grid = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"grid must look like 4 or 2x2, got {text!r}") from None
    if not grid or min(grid) < 1:
        raise typer.BadParameter(f"every level needs at least one module, got {text!r}")
    return grid


@app.command()
def demo(
    task: Annotated[str, typer.Option(click_type=click.Choice(["digits", "bible"]), help="digits (MLP classifier) or bible (byte-level transformer LM).")] = "digits",
    grid: Annotated[str, typer.Option(help="Modules per level: 4 = four independent experts, 2x2 = DiPaCo grid of four paths.")] = "4",
    rounds: Annotated[int, typer.Option(min=1, help="Outer rounds in all.")] = 10,
    shared_rounds: Annotated[int, typer.Option(min=0, help="Rounds of one shared model on all data before the paths branch.")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Inner steps per round per path (H).")] = 50,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(help="Inner AdamW learning rate (cosine-decayed over the rounds).")] = 3e-3,
    outer_lr: Annotated[float, typer.Option(help="Outer SGD learning rate.")] = 1.0,
    outer_momentum: Annotated[float, typer.Option(help="Outer Nesterov momentum (DiLoCo: 0.9 with lr 0.7).")] = 0.0,
    clustering: Annotated[str, typer.Option(click_type=click.Choice(["kmeans", "balanced-kmeans"]), help="How clustered shards are made.")] = "kmeans",
    router: Annotated[str, typer.Option(click_type=click.Choice(["learned", "centroid"]), help="learned (MLP on shard labels) or centroid (c-BTM).")] = "learned",
    profiles: Annotated[str, typer.Option(help="Clients per path: a mix (fp32, mixed, int4-p50) or profile names joined by commas; empty = one full-precision client per path.")] = "",
    scheme: Annotated[str, typer.Option(click_type=click.Choice(["rolling", "static", "random", "magnitude"]), help="Sub-models of pruned clients: rolling (FedRolex), static (HeteroFL), random, magnitude.")] = "rolling",
    seeds: Annotated[int, typer.Option(min=1, help="Repeat with this many seeds; the table shows mean and spread.")] = 3,
    out: Annotated[Path, typer.Option(help="Directory for results.json, the plot and the ensemble checkpoint.")] = Path("runs/demo"),
) -> None:
    """Train experts on clustered and on random shards in-process, route, and compare with a dense model."""
    from dataclasses import asdict

    from fedmoe.experiment import ExperimentConfig, compare
    from fedmoe.plots import plot_rounds
    from fedmoe.strategies.assignment import parse_profiles
    from fedmoe.tasks import load_task
    from fedmoe.train import InnerConfig

    try:
        mix = parse_profiles(profiles)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--profiles") from None
    config = ExperimentConfig(
        parse_grid(grid), rounds, shared_rounds, InnerConfig(steps, lr, batch_size=batch_size),
        outer_lr, outer_momentum, clustering, router, profiles=mix, scheme=scheme,
    )
    if shared_rounds >= rounds:
        raise typer.BadParameter(f"--shared-rounds ({shared_rounds}) must be smaller than --rounds ({rounds})")
    started = time.perf_counter()
    with console.status(f"loading {task}"):
        data = load_task(task)
    console.print(
        f"[bold]{task}[/]: {data.n_units} training units; {config.n_paths} paths on grid {grid}: {shared_rounds} shared rounds, "
        f"then {rounds - shared_rounds} rounds x {steps} steps per client; {config.workers_per_path} client(s) per path"
        f"{' (' + ', '.join(mix) + ')' if mix else ''}; dense baseline: {rounds} rounds x {config.steps_per_round} steps; {seeds} seed(s)"
    )
    comparison = compare(data, config, seeds)
    out.mkdir(parents=True, exist_ok=True)
    first = {p: runs[0] for p, runs in comparison.experts.items()}
    first["clustered"].ensemble.save(out / "ensemble", extra={"task": task})
    plot = plot_rounds(comparison.dense[0], list(first.values()), data.metric, out / f"{data.metric}.png")
    rows = comparison.rows()
    seconds = time.perf_counter() - started
    results = {"task": task, "metric": data.metric, "seconds": seconds, "config": asdict(config), "rows": rows,
               "clients": {p: r.clients for p, r in first.items()},
               "rounds": {"dense": comparison.dense[0].rounds, **{p: r.rounds for p, r in first.items()}}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(results_table(task, data.metric, rows, seeds))
    if mix:
        console.print(clients_table(first["clustered"].clients))
    console.print(f"wrote {out / 'results.json'}, {plot} and {out / 'ensemble'} in {seconds:.0f} s")


def results_table(task: str, metric: str, rows: dict[str, dict[str, list[float]]], seeds: int) -> Table:
    """One row per model, one column per partition; each cell the mean over seeds (and the spread)."""
    percent = metric == "accuracy"

    def cell(values: list[float], as_percent: bool) -> str:
        scale = 100 if as_percent else 1
        mean, spread = scale * statistics.fmean(values), scale * (statistics.stdev(values) if len(values) > 1 else 0.0)
        text = f"{mean:.1f}%" if as_percent else f"{mean:.3f}"
        return text + (f" ± {spread:.1f}" if as_percent else f" ± {spread:.3f}") * (len(values) > 1)

    table = Table(title=f"{task}: test {metric.replace('_', ' ')} at equal total training steps (mean ± sd over {seeds} seeds)")
    table.add_column("model")
    partitions = list(next(iter(rows.values())))
    for p in partitions:
        table.add_column(f"{p} shards", justify="right")
    for name, values in rows.items():
        as_percent = percent or name.startswith("router")
        table.add_row(name, *(cell(values[p], as_percent) for p in partitions), style="bold" if name in ("ensemble top-1", "dense baseline") else None)
    return table


def clients_table(clients: list[dict]) -> Table:
    """Bytes each kind of client stores and uploads, as a ratio to a full-precision dense client."""
    table = Table(title="clients (clustered run): bytes per client, ratio to fp32 dense")
    for column in ("variant", "weights on device", "upload per round", "upload ratio"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    by_variant = {c["variant"]: c for c in clients}
    reference = by_variant.get("fp32")
    for name, c in by_variant.items():
        ratio = f"{c['upload_bytes_per_round'] / reference['upload_bytes_per_round']:.3f}" if reference else "-"
        table.add_row(name, f"{c['weight_bytes']:,}", f"{c['upload_bytes_per_round']:,.0f}", ratio)
    return table


def main() -> None:
    """Entry point of the `fedmoe` console script."""
    app()


if __name__ == "__main__":
    main()
