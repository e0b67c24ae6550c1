"""The `fedmoe` command."""

from __future__ import annotations

import json
import logging
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Annotated

import click
import typer

from fedmoe.config import Config
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="fedmoe: train experts and paths on unlike machines, ensemble them with a router.", no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def root() -> None:
    """fedmoe: train experts and paths on unlike machines, ensemble them with a router."""


SpecOption = Annotated[str | None, typer.Option(help="The spec, as an import string 'package.module:attr' (default: the config's, else fedmoe.models.digits:spec).")]
ConfigOption = Annotated[Path | None, typer.Option("--config", help="A TOML config file (see fedmoe.config).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set inner.steps=20 (repeatable; applied last).")]
GridOption = Annotated[str | None, typer.Option(help="Modules per level: 4 = four independent experts, 2x2 = a DiPaCo grid of four paths.")]
RoundsOption = Annotated[int | None, typer.Option(min=1, help="Outer rounds.")]
StepsOption = Annotated[int | None, typer.Option(min=1, help="Inner steps per round per client (H).")]
LrOption = Annotated[float | None, typer.Option(help="Inner learning rate.")]
BatchOption = Annotated[int | None, typer.Option(min=1, help="Inner batch size.")]
OuterLrOption = Annotated[float | None, typer.Option(help="Outer SGD learning rate (default: 1.0 with one worker per module, else 0.7).")]
OuterMomentumOption = Annotated[float | None, typer.Option(help="Outer Nesterov momentum (default: 0 with one worker per module, else 0.9).")]
SeedOption = Annotated[int | None, typer.Option(help="Seed of the grid's initialisation and the clients' sampling.")]


def make_config(config_file: Path | None, sets: list[str] | None, **shortcuts: object) -> Config:
    """The run's config: the TOML file, then the shortcut options given (dotted keys, None = not given), then --set."""
    from fedmoe.config import parse_overrides

    try:
        overrides = {key.replace("__", "."): value for key, value in shortcuts.items() if value is not None}
        return Config.load(config_file, {**overrides, **parse_overrides(sets)})
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e)) from None


def describe(config: Config) -> str:
    """One line naming the run's main settings."""
    outer = config.outer
    lr = "auto" if outer.lr is None else f"{outer.lr:g}"
    momentum = "auto" if outer.momentum is None else f"{outer.momentum:g}"
    return (f"spec {config.spec}, grid {'x'.join(map(str, config.grid))}, {config.rounds} rounds x {config.inner.steps} steps "
            f"(lr {config.inner.lr:g}, {config.inner.schedule}), outer lr {lr} momentum {momentum}, "
            f"aggregation {config.aggregation.rule}")


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
    from fedmoe.assignment import parse_profiles
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


LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def setup_logging(verbose: bool) -> None:
    """Log fedmoe's progress to stderr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def check_tls(address: str, certs: Path | None, insecure: bool) -> None:
    """Plain text only on loopback, or when asked for explicitly."""
    host = address.rsplit(":", 1)[0]
    if certs is None and not insecure and host not in LOOPBACK:
        raise typer.BadParameter(f"{address} is reachable from other hosts: give --certs DIR (made by `fedmoe certs`) or --insecure")


def wait_for_signal(server, until=None, poll_s: float = 0.5) -> None:
    """Serve until SIGINT/SIGTERM, or until `until()` is true."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(poll_s):
        if until is not None and until():
            break
    server.stop(grace=2).wait()


@app.command()
def server(
    address: Annotated[str, typer.Option(help="host:port to listen on.")] = "127.0.0.1:7000",
    state: Annotated[Path, typer.Option(help="State directory: checkpoints, pending updates, the final ensemble.")] = Path("runs/coordinator"),
    task: Annotated[str, typer.Option(click_type=click.Choice(["digits", "bible"]))] = "digits",
    grid: Annotated[str, typer.Option(help="Modules per level, e.g. 4 or 2x2.")] = "4",
    rounds: Annotated[int, typer.Option(min=1)] = 10,
    steps: Annotated[int, typer.Option(min=1, help="Inner steps per round per client.")] = 50,
    lr: float = 3e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    scheme: Annotated[str, typer.Option(click_type=click.Choice(["rolling", "static", "random"]))] = "rolling",
    min_clients: Annotated[int, typer.Option(min=1, help="Clients to wait for before the first round.")] = 1,
    quorum: Annotated[float, typer.Option(help="Fraction of the members whose updates close a round.")] = 1.0,
    deadline: Annotated[float, typer.Option(help="Seconds after which a round closes with the updates it has.")] = 300.0,
    late: Annotated[str, typer.Option(click_type=click.Choice(["drop", "stale"]), help="Updates for a closed round: drop, or count with weight 1/(1 + staleness).")] = "drop",
    aggregation: Annotated[str, typer.Option(click_type=click.Choice(["mean", "median", "trimmed-mean"]), help="How updates are combined per coordinate.")] = "mean",
    trim: Annotated[float, typer.Option(help="Fraction trimmed at each end by trimmed-mean.")] = 0.2,
    clip_norm: Annotated[float | None, typer.Option(help="Scale down updates whose norm is above this.")] = None,
    certs: Annotated[Path | None, typer.Option(help="TLS: a directory made by `fedmoe certs`.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plain text on a non-loopback address.")] = False,
    exit_when_done: Annotated[bool, typer.Option(help="Stop once the last round closed and the clients were told.")] = False,
    seed: int = 0,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = True,
) -> None:
    """Run the coordinator: clients join, pull their path, train it and push outer gradients."""
    from fedmoe.server.coordinator import Coordinator, CoordinatorConfig
    from fedmoe.server.service import start_server
    from fedmoe.train import InnerConfig

    setup_logging(verbose)
    check_tls(address, certs, insecure)
    config = CoordinatorConfig(task, parse_grid(grid), rounds, InnerConfig(steps, lr, batch_size=batch_size), outer_lr, outer_momentum,
                               scheme=scheme, min_clients=min_clients, quorum=quorum, deadline_s=deadline, late=late,
                               aggregation=aggregation, trim=trim, clip_norm=clip_norm, seed=seed)
    coordinator = Coordinator(config, state)
    grpc_server, port = start_server(coordinator, address, str(certs) if certs else None)
    console.print(f"coordinator on port {port}, state in {state}", style="bold")
    if exit_when_done:
        finished_at: list[float] = []

        def done() -> bool:  # stop once every client heard DONE, or 30 s after the last round
            if coordinator.finished and not finished_at:
                finished_at.append(time.monotonic())
            return coordinator.dismissed or bool(finished_at) and time.monotonic() - finished_at[0] > 30

        wait_for_signal(grpc_server, done)
    else:
        wait_for_signal(grpc_server)


@app.command()
def client(
    server: Annotated[str, typer.Option(help="The coordinator, host:port.")] = "127.0.0.1:7000",
    profile: Annotated[str, typer.Option(help="Device profile: fp32, fp16, int8, int4, int4-p50, fp32-p25, laptop.")] = "fp32",
    name: str = "",
    certs: Annotated[Path | None, typer.Option(help="TLS: the directory with ca.pem from `fedmoe certs`.")] = None,
    state_file: Annotated[Path | None, typer.Option(help="Keep this client's identity here, to rejoin after a restart.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = True,
) -> None:
    """Join a federation with the built-in data and train until the coordinator says done."""
    from fedmoe.clients import run
    from fedmoe.assignment import PROFILES

    setup_logging(verbose)
    if profile not in PROFILES:
        raise typer.BadParameter(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}", param_hint="--profile")
    summary = run(server, profile, certs=str(certs) if certs else None, name=name, state_file=str(state_file) if state_file else None, timeout_s=timeout)
    console.print_json(json.dumps(summary))


@app.command()
def serve(
    checkpoint: Annotated[Path, typer.Option(help="An ensemble checkpoint directory.")] = Path("runs/coordinator/ensemble"),
    address: str = "127.0.0.1:7100",
    top_k: Annotated[int, typer.Option(min=1)] = 1,
    certs: Annotated[Path | None, typer.Option(help="TLS: a directory made by `fedmoe certs`.")] = None,
    insecure: bool = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the checkpoint to appear (a coordinator still training).")] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = True,
) -> None:
    """Answer Predict requests with a trained router + ensemble."""
    from fedmoe.ensemble import Ensemble
    from fedmoe.server.inference import start_inference

    setup_logging(verbose)
    check_tls(address, certs, insecure)
    deadline = time.monotonic() + wait
    while not (checkpoint / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(1.0)
    grpc_server, port = start_inference(Ensemble.load(checkpoint), address, top_k, str(certs) if certs else None)
    console.print(f"inference on port {port}", style="bold")
    wait_for_signal(grpc_server)


@app.command()
def predict(
    server: str = "127.0.0.1:7100",
    inputs: Annotated[str, typer.Option(help="Comma-separated input values (a classifier's features).")] = "",
    digit: Annotated[int | None, typer.Option(help="Send this test example of the bundled digits instead.")] = None,
    text: Annotated[str, typer.Option(help="A prompt, for a byte language model.")] = "",
    top_k: Annotated[int, typer.Option(min=0, help="0: the server's default.")] = 0,
    certs: Annotated[Path | None, typer.Option(help="TLS: the directory with ca.pem.")] = None,
) -> None:
    """Ask an inference service for one prediction; prints the answer as JSON."""
    from fedmoe.clients.runtime import connect
    from fedmoe.v1 import inference_pb2, inference_pb2_grpc

    values = [float(v) for v in inputs.split(",") if v.strip()]
    if digit is not None:
        from fedmoe.data import load_digits_split

        values = load_digits_split()[1].inputs[digit].tolist()
    with connect(server, str(certs) if certs else None) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).Predict(inference_pb2.PredictRequest(inputs=values, text=text, top_k=top_k), timeout=30)
    probs = list(reply.probs)
    console.print_json(json.dumps({"prediction": max(range(len(probs)), key=probs.__getitem__), "probs": [round(p, 5) for p in probs],
                                   "experts": list(reply.experts), "paths": list(reply.paths), "weights": list(reply.weights)}))


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory for ca.pem, server.pem/.key and client certificates.")] = Path("certs"),
    host: Annotated[list[str] | None, typer.Option(help="Host names / IPs the server certificate is valid for (repeatable).")] = None,
    client_name: Annotated[list[str] | None, typer.Option("--client", help="Client certificate names (repeatable).")] = None,
    overwrite: bool = False,
    if_missing: Annotated[bool, typer.Option(help="Do nothing when the directory already holds a CA (for one-shot services).")] = False,
) -> None:
    """Make a CA, a server certificate and client certificates for TLS (with the cryptography package)."""
    from fedmoe.security import CA_KEY, make_certs

    if if_missing and (out / CA_KEY).exists():
        console.print(f"{out} already holds a CA; nothing to do")
        return
    directory = make_certs(out, tuple(host or ("localhost", "127.0.0.1", "::1")), tuple(client_name or ("client",)), overwrite=overwrite)
    console.print(f"wrote TLS material to {directory}")


@app.command()
def simulate(
    clients: Annotated[int, typer.Option(min=1, help="Virtual clients (Flower SuperNodes); the paths share them out in turn, at least one each.")] = 8,
    profiles: Annotated[str, typer.Option(help="Device profiles the clients of each path cycle through: a mix (fp32, mixed, int4-p50) or profile names joined by commas.")] = "mixed",
    rounds: Annotated[int, typer.Option(min=1, help="Outer rounds.")] = 3,
    task: Annotated[str, typer.Option(click_type=click.Choice(["digits", "bible"]))] = "digits",
    grid: Annotated[str, typer.Option(help="Modules per level: 4 = four independent experts, 2x2 = DiPaCo grid of four paths.")] = "4",
    steps: Annotated[int, typer.Option(min=1, help="Inner steps per round per client (H).")] = 20,
    lr: Annotated[float, typer.Option(help="Inner AdamW learning rate.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    outer_lr: Annotated[float, typer.Option(help="Outer SGD learning rate.")] = 0.7,
    outer_momentum: Annotated[float, typer.Option(help="Outer Nesterov momentum.")] = 0.9,
    partition: Annotated[str, typer.Option(click_type=click.Choice(["clustered", "random"]), help="Shards by clustering the features, or at random.")] = "clustered",
    clustering: Annotated[str, typer.Option(click_type=click.Choice(["kmeans", "balanced-kmeans"]))] = "kmeans",
    scheme: Annotated[str, typer.Option(click_type=click.Choice(["rolling", "static", "random"]), help="Sub-models of pruned clients.")] = "rolling",
    lr_schedule: Annotated[str, typer.Option(click_type=click.Choice(["constant", "cosine"]), help="Inner learning rate over the rounds.")] = "constant",
    seed: int = 0,
    cpus_per_client: Annotated[float, typer.Option(min=0, help="CPUs Ray reserves for each virtual client.")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(min=0, help="GPUs (or fractions) Ray reserves for each virtual client.")] = 0.0,
    ray_address: Annotated[str | None, typer.Option(help="An existing Ray cluster: head:6379 from one of its machines, ray://head:10001 from outside (default: $RAY_ADDRESS, else a local Ray).")] = None,
    out: Annotated[Path | None, typer.Option(help="Directory for the ensemble checkpoint and results.json.")] = Path("runs/simulate"),
    verbose: Annotated[bool, typer.Option(help="Flower's debug logs.")] = False,
) -> None:
    """Train experts/paths with virtual Flower clients (simulation engine, Ray backend), ensembled by federated centroids."""
    from fedmoe.assignment import parse_profiles
    from fedmoe.strategies.flower import simulate as run_simulation

    try:
        mix = parse_profiles(profiles)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--profiles") from None
    if not mix:
        raise typer.BadParameter("name at least one profile", param_hint="--profiles")
    try:
        results = run_simulation(
            clients, mix, rounds, parse_grid(grid), steps, task=task, lr=lr, batch_size=batch_size, outer_lr=outer_lr,
            outer_momentum=outer_momentum, partition=partition, clustering=clustering, scheme=scheme, lr_schedule=lr_schedule,
            seed=seed, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client, ray_address=ray_address, out=out,
            verbose=verbose,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    table = Table(title=f"{task}: {clients} virtual clients ({', '.join(mix)}) on grid {grid}, {rounds} rounds x {steps} steps")
    for column in ("round", "clients", "mean inner loss", "upload bytes", f"ensemble top-1 {results['metric'].replace('_', ' ')}"):
        table.add_column(column, justify="right")
    for r in results["rounds"]:
        table.add_row(str(r["round"]), str(r["clients"]), f"{r['loss']:.4f}", f"{r['upload_bytes']:,}", f"{r['top1']:.4f}")
    console.print(table)
    console.print(f"{results['seconds']:.0f} s" + (f"; wrote {out}" if out else ""))


@app.command()
def health(
    server: Annotated[str, typer.Option(help="A coordinator or inference service, host:port.")] = "127.0.0.1:7000",
    certs: Annotated[Path | None, typer.Option(help="TLS: the directory with ca.pem.")] = None,
    timeout: float = 5.0,
) -> None:
    """Exit 0 when the service answers SERVING to a gRPC health check (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedmoe.clients.runtime import connect

    with connect(server, str(certs) if certs else None) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as e:
            console.print(f"{server}: not serving ({e.code().name})")
            raise typer.Exit(1) from None
    console.print(f"{server}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


def main() -> None:
    """Entry point of the `fedmoe` console script."""
    app()


if __name__ == "__main__":
    main()
