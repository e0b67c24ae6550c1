"""The `fedmoe` command."""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from fedmoe.config import Config

HELP = (
    "fedmoe: train experts and paths on unlike machines, ensemble them with a router.\n\n"
    "Data never leaves a client. What does: per-cluster counts, sums and sums of squares of its routing "
    "features (federated k-means), its count of examples per cluster, its compressed outer gradients "
    "(and the learned router's change), its loss and its evaluation metrics."
)
app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def root() -> None:
    """fedmoe: train experts and paths on unlike machines, ensemble them with a router (see HELP)."""


SpecOption = Annotated[
    str | None,
    typer.Option(
        help=(
            "The spec, as an import string 'package.module:attr' (default: the config's, else "
            "fedmoe.models.digits:spec)."
        )
    ),
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="A TOML config file (see fedmoe.config).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config key, e.g. --set inner.steps=20 (repeatable; applied last)."
    ),
]
GridOption = Annotated[
    str | None,
    typer.Option(help="Modules per level: 4 = four independent experts, 2x2 = a DiPaCo grid of four paths."),
]
RoundsOption = Annotated[int | None, typer.Option(min=1, help="Outer rounds.")]
StepsOption = Annotated[int | None, typer.Option(min=1, help="Inner steps per round per client (H).")]
LrOption = Annotated[float | None, typer.Option(help="Inner learning rate.")]
BatchOption = Annotated[int | None, typer.Option(min=1, help="Inner batch size.")]
OuterLrOption = Annotated[
    float | None,
    typer.Option(help="Outer SGD learning rate (default: 1.0 with one worker per module, else 0.7)."),
]
OuterMomentumOption = Annotated[
    float | None,
    typer.Option(help="Outer Nesterov momentum (default: 0 with one worker per module, else 0.9)."),
]
SeedOption = Annotated[
    int | None, typer.Option(help="Seed of the grid's initialisation and the clients' sampling.")
]


def make_config(config_file: Path | None, sets: list[str] | None, **shortcuts: object) -> Config:
    """The run's config: the TOML file, then the shortcut options given (dotted keys, None = not given),
    then --set.
    """
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
    return (
        f"spec {config.spec}, grid {'x'.join(map(str, config.grid))}, {config.rounds} rounds x "
        f"{config.inner.steps} steps (lr {config.inner.lr:g}, {config.inner.schedule}), "
        f"outer lr {lr} momentum {momentum}, aggregation {config.aggregation.rule}"
    )


@app.command()
def demo(
    spec: SpecOption = None,
    config_file: ConfigOption = None,
    sets: SetOption = None,
    grid: GridOption = None,
    rounds: RoundsOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    batch_size: BatchOption = None,
    outer_lr: OuterLrOption = None,
    outer_momentum: OuterMomentumOption = None,
    seed: SeedOption = None,
    shared_rounds: Annotated[
        int, typer.Option(min=0, help="Rounds of one shared model on all data before the paths branch.")
    ] = 3,
    router: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(["learned", "centroid"]),
            help="learned (MLP on shard labels) or centroid (the federation's own router: c-BTM centroids, "
            "or a spec's cluster_router, as a flow spec's posterior).",
        ),
    ] = "learned",
    profiles: Annotated[
        str,
        typer.Option(
            help=(
                "Clients per path: a mix (fp32, mixed, int4-p50) or profile names joined by commas; empty = "
                "one full-precision client per path."
            )
        ),
    ] = "",
    scheme: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(["rolling", "static", "random", "magnitude"]),
            help="Sub-models of pruned clients: rolling (FedRolex), static (HeteroFL), random, magnitude.",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option(min=1, help="Repeat with this many seeds; the table shows mean and spread.")
    ] = 3,
    out: Annotated[
        Path, typer.Option(help="Directory for results.json, the plot and the ensemble checkpoint.")
    ] = Path("runs/demo"),
) -> None:
    """Train experts on clustered and on random shards in-process, route, and compare with a dense model.

    For a generative spec (a flow model) the table shows the Fréchet distance of samples (lower is better) of
    the dense model, each expert alone, the routed mixtures (top-k and full) and one expert re-sampled from
    the router per step, and a PNG grid of samples per contender is written.
    """
    from fedmoe.assignment import parse_profiles
    from fedmoe.experiment import Experiment, compare, generative
    from fedmoe.plots import plot_rounds, save_grid
    from fedmoe.spec import load_spec

    try:
        mix = parse_profiles(profiles)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--profiles") from None
    config = make_config(
        config_file,
        sets,
        spec=spec,
        grid=grid,
        rounds=rounds,
        inner__steps=steps,
        inner__lr=lr,
        inner__batch_size=batch_size,
        outer__lr=outer_lr,
        outer__momentum=outer_momentum,
        seed=seed,
        compression__scheme=scheme,
        clients__profiles=mix or None,
    )
    if shared_rounds >= config.rounds:
        raise typer.BadParameter(
            f"--shared-rounds ({shared_rounds}) must be smaller than --rounds ({config.rounds})"
        )
    experiment = Experiment(config, shared_rounds, router)
    started = time.perf_counter()
    try:
        with console.status(f"loading {config.spec}"):
            problem = load_spec(config.spec)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--spec") from None
    console.print(f"[bold]{problem.name}[/]: {describe(experiment.config)}")
    console.print(
        f"{config.n_paths} paths: {shared_rounds} shared rounds, then {config.rounds - shared_rounds} "
        f"rounds; {len(experiment.profiles)} client(s) per path ({', '.join(experiment.profiles)}); "
        f"dense baseline: {config.rounds} rounds x {experiment.steps_per_round} steps; {seeds} seed(s)"
    )
    comparison = compare(problem, experiment, seeds)
    out.mkdir(parents=True, exist_ok=True)
    first = {p: runs[0] for p, runs in comparison.experts.items()}
    first["clustered"].ensemble.save(out / "ensemble")
    plot = plot_rounds(
        comparison.dense[0], list(first.values()), problem.metric, out / f"{problem.metric}.png"
    )
    rows = comparison.rows()
    written = [str(plot)]
    if generative(problem):
        (out / "samples").mkdir(exist_ok=True)
        contenders = {"dense": comparison.dense[0].samples["dense"]}
        contenders |= {f"{p}-{name}": x for p, r in first.items() for name, x in r.samples.items()}
        for name, samples in contenders.items():
            save_grid(samples[:64], out / "samples" / f"{name.replace(' ', '-')}.png")
        written.append(f"{len(contenders)} sample grids in {out / 'samples'}")
    seconds = time.perf_counter() - started
    results = {
        "spec": config.spec,
        "metric": comparison.metric,
        "seconds": seconds,
        "config": config.model_dump(mode="json"),
        "shared_rounds": shared_rounds,
        "router": router,
        "rows": rows,
        "clients": {p: r.clients for p, r in first.items()},
        "rounds": {"dense": comparison.dense[0].rounds, **{p: r.rounds for p, r in first.items()}},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    console.print(results_table(problem.name, comparison.metric, rows, seeds))
    if mix:
        console.print(clients_table(first["clustered"].clients))
    console.print(
        f"wrote {out / 'results.json'}, {', '.join(written)} and {out / 'ensemble'} in {seconds:.0f} s"
    )


def results_table(task: str, metric: str, rows: dict[str, dict[str, list[float]]], seeds: int) -> Table:
    """One row per model, one column per partition; each cell the mean over seeds (and the spread)."""
    percent = metric == "accuracy"

    def cell(values: list[float], as_percent: bool) -> str:
        scale = 100 if as_percent else 1
        mean, spread = (
            scale * statistics.fmean(values),
            scale * (statistics.stdev(values) if len(values) > 1 else 0.0),
        )
        text = f"{mean:.1f}%" if as_percent else f"{mean:.3f}"
        return text + (f" ± {spread:.1f}" if as_percent else f" ± {spread:.3f}") * (len(values) > 1)

    table = Table(
        title=(
            f"{task}: test {metric.replace('_', ' ')} at equal total training steps "
            f"(mean ± sd over {seeds} seeds)"
        )
    )
    table.add_column("model")
    partitions = list(next(iter(rows.values())))
    for p in partitions:
        table.add_column(f"{p} shards", justify="right")
    for name, values in rows.items():
        as_percent = percent or name.startswith("router")
        table.add_row(
            name,
            *(cell(values[p], as_percent) for p in partitions),
            style="bold" if name in ("ensemble top-1", "dense baseline") else None,
        )
    return table


def clients_table(clients: list[dict]) -> Table:
    """Bytes each kind of client stores and uploads, as a ratio to a full-precision dense client."""
    table = Table(title="clients (clustered run): bytes per client, ratio to fp32 dense")
    for column in ("variant", "weights on device", "upload per round", "upload ratio"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    by_variant = {c["variant"]: c for c in clients}
    reference = by_variant.get("fp32")
    for name, c in by_variant.items():
        ratio = (
            f"{c['upload_bytes_per_round'] / reference['upload_bytes_per_round']:.3f}" if reference else "-"
        )
        table.add_row(name, f"{c['weight_bytes']:,}", f"{c['upload_bytes_per_round']:,.0f}", ratio)
    return table


LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def setup_logging(verbose: bool) -> None:
    """Log fedmoe's progress to stderr."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def check_tls(address: str, certs: str | Path | None, insecure: bool) -> None:
    """Plain text only on loopback, or when asked for explicitly."""
    host = address.rsplit(":", 1)[0]
    if certs is None and not insecure and host not in LOOPBACK:
        raise typer.BadParameter(
            f"{address} is reachable from other hosts: "
            "give --certs DIR (made by `fedmoe certs`) or --insecure"
        )


def wait_for_signal(server, until=None, poll_s: float = 0.5) -> None:
    """Serve until SIGINT/SIGTERM, or until `until()` is true."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(poll_s):
        if until is not None and until():
            break
    server.stop(grace=2).wait()


def fail(message: str) -> None:
    """Print `message` as an error on stderr and exit with status 1."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def server(
    spec: SpecOption = None,
    config_file: ConfigOption = None,
    sets: SetOption = None,
    grid: GridOption = None,
    rounds: RoundsOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    batch_size: BatchOption = None,
    outer_lr: OuterLrOption = None,
    outer_momentum: OuterMomentumOption = None,
    seed: SeedOption = None,
    address: Annotated[
        str | None, typer.Option(help="host:port to listen on (transport.address; default 127.0.0.1:7000).")
    ] = None,
    state: Annotated[
        Path, typer.Option(help="State directory: checkpoints, pending updates, the final ensemble.")
    ] = Path("runs/coordinator"),
    min_clients: Annotated[
        int | None,
        typer.Option(min=1, help="Clients to wait for before the first round (policy.min_clients)."),
    ] = None,
    quorum: Annotated[
        float | None,
        typer.Option(help="Fraction of the members whose updates close a round (policy.quorum)."),
    ] = None,
    deadline: Annotated[
        float | None,
        typer.Option(help="Seconds after which a round closes with the updates it has (policy.deadline_s)."),
    ] = None,
    late: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(["drop", "stale"]),
            help="Updates for a closed round: drop, or count with weight 1/(1 + staleness).",
        ),
    ] = None,
    aggregation: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(["mean", "median", "trimmed-mean"]),
            help="How updates are combined per coordinate.",
        ),
    ] = None,
    trim: Annotated[float | None, typer.Option(help="Fraction trimmed at each end by trimmed-mean.")] = None,
    clip_norm: Annotated[
        float | None, typer.Option(help="Scale down updates whose norm is above this.")
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(["data", "turn"]),
            help=(
                "How clients get paths (routing.assign): by their data (federated k-means over the first "
                "--min-clients clients, then a histogram per client), or in turn by join order."
            ),
        ),
    ] = None,
    certs: Annotated[
        Path | None, typer.Option(help="TLS: a directory made by `fedmoe certs` (transport.certs).")
    ] = None,
    mutual_tls: Annotated[
        bool | None,
        typer.Option(
            "--mutual-tls/--no-mutual-tls",
            help="Require a client certificate of the --certs CA, which enrols it (transport.mutual_tls).",
        ),
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plain text on a non-loopback address.")] = False,
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop once the last round closed and the clients were told.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = True,
) -> None:
    """Run the coordinator: clients join, get their paths (by their data, or in turn), pull them, train
    them and push outer gradients. It never loads training data.
    """
    from fedmoe.security import ENROLMENT_ENV, ENROLMENT_FILE
    from fedmoe.server.coordinator import Coordinator
    from fedmoe.server.service import start_server

    config = make_config(
        config_file,
        sets,
        spec=spec,
        grid=grid,
        rounds=rounds,
        inner__steps=steps,
        inner__lr=lr,
        inner__batch_size=batch_size,
        outer__lr=outer_lr,
        outer__momentum=outer_momentum,
        seed=seed,
        transport__address=address,
        transport__certs=str(certs) if certs else None,
        transport__mutual_tls=mutual_tls,
        policy__min_clients=min_clients,
        policy__quorum=quorum,
        policy__deadline_s=deadline,
        policy__late=late,
        aggregation__rule=aggregation,
        aggregation__trim=trim,
        aggregation__clip_norm=clip_norm,
        routing__assign=routing,
    )
    setup_logging(verbose)
    transport = config.transport
    check_tls(transport.address, transport.certs, insecure)
    try:
        coordinator = Coordinator(config, state)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    console.print(describe(config))
    try:
        grpc_server, port = start_server(coordinator)
    except (OSError, ValueError) as e:
        fail(str(e))
    console.print(f"coordinator on port {port}, state in {state}", style="bold")
    given = [Path(transport.certs) / ENROLMENT_FILE] if transport.certs else []
    kept = next((f for f in given if f.exists()), state / ENROLMENT_FILE)
    where = f"${ENROLMENT_ENV}" if os.environ.get(ENROLMENT_ENV) else str(kept)
    console.print(f"clients enrol with the token in {where} (fedmoe client --enrol, or --certs holding it)")
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
    spec: Annotated[
        str | None,
        typer.Option(
            help="The spec, 'package.module:attr' (default: the coordinator's; it must be importable here)."
        ),
    ] = None,
    profile: Annotated[
        str, typer.Option(help="Device profile: fp32, fp16, int8, int4, int4-p50, fp32-p25, laptop.")
    ] = "fp32",
    partition: Annotated[
        int,
        typer.Option(
            min=0, help="The part of the spec's data this client holds: spec.data(partition, partitions)."
        ),
    ] = 0,
    partitions: Annotated[int, typer.Option(min=1, help="How many parts the spec's data is cut into.")] = 1,
    name: Annotated[str, typer.Option(help="A label for the coordinator's logs and status.")] = "",
    certs: Annotated[
        Path | None, typer.Option(help="TLS: the directory with ca.pem from `fedmoe certs`.")
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            help="Keep this client's identity and signing key here, and its workers' state beside it: "
            "restarted with it, the client rejoins as itself and continues where it stopped."
        ),
    ] = None,
    enrol: Annotated[
        str | None,
        typer.Option(
            envvar="FEDMOE_ENROLMENT_TOKEN",
            help="The operator's enrolment token (default: the enrolment.token of --certs).",
        ),
    ] = None,
    cert_name: Annotated[
        str | None,
        typer.Option(help="Mutual TLS: present the client certificate client-NAME.pem of --certs."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where to train: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N, mps.")
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(["fp32", "bf16", "fp16"]),
            help="Training precision under autocast (fp16: CUDA only); updates stay fp32.",
        ),
    ] = "fp32",
    retry: Annotated[
        float, typer.Option(min=0, help="Seconds to keep retrying an unreachable coordinator.")
    ] = 120.0,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds in all (default: no limit).")
    ] = None,
    leave: Annotated[
        bool,
        typer.Option(
            "--leave",
            help="Leave the federation as the client of --state-file (its tokens are revoked), and delete "
            "that state.",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = True,
) -> None:
    """Join a federation with this machine's part of the spec's data and train its path(s) until the
    coordinator says done (or, with --leave, leave it).
    """
    import grpc

    from fedmoe.clients import run
    from fedmoe.clients.runtime import leave as leave_federation

    setup_logging(verbose)
    if leave and state_file is None:
        fail("--leave needs --state-file: the identity of the client that leaves")
    try:
        if leave:
            client_id = leave_federation(
                server, state_file, certs=str(certs) if certs else None, cert_name=cert_name, retry_s=retry
            )
            console.print_json(json.dumps({"client_id": client_id, "left": True}))
            return
        summary = run(
            server,
            spec,
            profile,
            certs=str(certs) if certs else None,
            name=name,
            state_file=str(state_file) if state_file else None,
            enrolment=enrol,
            cert_name=cert_name,
            device=device,
            precision=precision,
            partition=partition,
            partitions=partitions,
            retry_s=retry,
            timeout_s=timeout,
        )
    except (ValueError, TypeError, ConnectionError, TimeoutError) as e:
        fail(str(e))
    except grpc.RpcError as e:
        fail(f"the coordinator at {server} refused: {e.code().name}: {e.details()}")
    console.print_json(json.dumps(summary))


@app.command()
def serve(
    checkpoint: Annotated[
        Path, typer.Option(help="An ensemble checkpoint directory (of any spec importable here).")
    ] = Path("runs/coordinator/ensemble"),
    address: Annotated[str, typer.Option(help="host:port to listen on.")] = "127.0.0.1:7100",
    top_k: Annotated[
        int, typer.Option(min=1, help="Experts mixed per prediction unless a request says otherwise.")
    ] = 1,
    certs: Annotated[Path | None, typer.Option(help="TLS: a directory made by `fedmoe certs`.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plain text on a non-loopback address.")] = False,
    wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for the checkpoint to appear (a coordinator still training)."),
    ] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet")] = True,
) -> None:
    """Answer Predict requests with a trained router + ensemble:
    `inputs` as a (1, N) float tensor, or `text` through the spec.
    """
    from fedmoe.ensemble import Ensemble
    from fedmoe.server.inference import start_inference

    setup_logging(verbose)
    check_tls(address, certs, insecure)
    deadline = time.monotonic() + wait
    while not (checkpoint / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(1.0)
    try:
        ensemble = Ensemble.load(checkpoint)
    except (ValueError, OSError) as e:
        fail(f"cannot load an ensemble from {checkpoint}: {e}")
    try:
        grpc_server, port = start_inference(ensemble, address, top_k, str(certs) if certs else None)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--top-k") from None
    except OSError as e:
        fail(str(e))
    console.print(f"inference on port {port}", style="bold")
    wait_for_signal(grpc_server)


@app.command()
def predict(
    server: Annotated[
        str, typer.Option(help="An inference service (`fedmoe serve`), host:port.")
    ] = "127.0.0.1:7100",
    inputs: Annotated[
        str, typer.Option(help="Comma-separated input values: one example, sent as a (1, N) float tensor.")
    ] = "",
    digit: Annotated[
        int | None, typer.Option(min=0, help="Send this test example of the bundled digits instead.")
    ] = None,
    text: Annotated[
        str, typer.Option(help="A prompt, for a spec with encode_text (e.g. a language model).")
    ] = "",
    top_k: Annotated[int, typer.Option(min=0, help="0: the server's default.")] = 0,
    certs: Annotated[Path | None, typer.Option(help="TLS: the directory with ca.pem.")] = None,
) -> None:
    """Ask an inference service for one prediction; prints the mixed outputs, the largest one's index,
    experts and weights as JSON.
    """
    import grpc

    from fedmoe.clients.runtime import connect
    from fedmoe.v1 import inference_pb2, inference_pb2_grpc

    try:
        values = [float(v) for v in inputs.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"give numbers separated by commas, got {inputs!r}", param_hint="--inputs"
        ) from None
    if digit is not None:
        from fedmoe.data import load_digits_split

        test = load_digits_split()[1]
        if digit >= len(test):
            raise typer.BadParameter(f"the digits test split has {len(test)} examples", param_hint="--digit")
        values = test.inputs[digit].tolist()
    with connect(server, str(certs) if certs else None) as channel:
        try:
            reply = inference_pb2_grpc.InferenceStub(channel).Predict(
                inference_pb2.PredictRequest(inputs=values, text=text, top_k=top_k), timeout=30
            )
        except grpc.RpcError as e:
            fail(f"{server}: {e.code().name}: {e.details()}")
    outputs = list(reply.outputs)
    typer.echo(
        json.dumps(
            {
                "prediction": max(range(len(outputs)), key=outputs.__getitem__),
                "outputs": outputs,
                "experts": list(reply.experts),
                "paths": list(reply.paths),
                "weights": list(reply.weights),
            },
            indent=2,
        )
    )


@app.command()
def sample(
    server: Annotated[
        str, typer.Option(help="An inference service (`fedmoe serve`) of a generative spec, host:port.")
    ] = "127.0.0.1:7100",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Sample from this ensemble checkpoint here instead of a server.")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples to draw.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="ODE steps from noise to data.")] = 20,
    solver: Annotated[str, typer.Option(click_type=click.Choice(["euler", "heun"]))] = "euler",
    top_k: Annotated[
        int, typer.Option(min=0, help="Experts mixed at every step; 0: the server's default.")
    ] = 0,
    full: Annotated[bool, typer.Option(help="Mix every expert's velocity at every step.")] = False,
    resample: Annotated[
        bool, typer.Option(help="Draw one expert per sample and step from the router instead of mixing.")
    ] = False,
    hold: Annotated[
        bool,
        typer.Option(
            help="Draw one expert per sample from the router (Gumbel-max) and hold its noise along the path "
            "instead of mixing; not with --resample."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the noise (and the draws).")] = 0,
    out: Annotated[Path, typer.Option(help="The PNG grid of samples to write.")] = Path("samples.png"),
    certs: Annotated[Path | None, typer.Option(help="TLS: the directory with ca.pem.")] = None,
) -> None:
    """Draw samples of a generative ensemble (a flow model) through `fedmoe serve`, or from a checkpoint, and
    write them as a PNG grid; prints their shape and the file as JSON.
    """
    import torch

    from fedmoe.plots import save_grid
    from fedmoe.v1 import inference_pb2

    request = inference_pb2.SampleRequest(
        n=n, steps=steps, solver=solver, top_k=top_k, full=full, resample=resample, hold=hold, seed=seed
    )
    if checkpoint is not None:
        from fedmoe.ensemble import Ensemble
        from fedmoe.server.inference import draw

        try:
            ensemble = Ensemble.load(checkpoint)
            reply = draw(ensemble, request, top_k or 1)
        except (ValueError, OSError) as e:
            fail(f"cannot sample from {checkpoint}: {e}")
    else:
        import grpc

        from fedmoe.clients.runtime import connect
        from fedmoe.v1 import inference_pb2_grpc

        with connect(server, str(certs) if certs else None) as channel:
            try:
                reply = inference_pb2_grpc.InferenceStub(channel).Sample(request, timeout=120)
            except grpc.RpcError as e:
                fail(f"{server}: {e.code().name}: {e.details()}")
    samples = torch.tensor(list(reply.samples)).view(*reply.shape)
    try:
        save_grid(samples, out)
    except ValueError as e:
        fail(f"cannot draw the samples as images: {e}")
    typer.echo(json.dumps({"samples": list(reply.shape), "out": str(out)}))


@app.command()
def certs(
    out: Annotated[
        Path,
        typer.Option(help="Directory for ca.pem, server.pem/.key, client certificates and enrolment.token."),
    ] = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(help="Host names / IPs the server certificate is valid for (repeatable)."),
    ] = None,
    client_name: Annotated[
        list[str] | None, typer.Option("--client", help="Client certificate names (repeatable).")
    ] = None,
    overwrite: bool = False,
    if_missing: Annotated[
        bool, typer.Option(help="Do nothing when the directory already holds a CA (for one-shot services).")
    ] = False,
) -> None:
    """Make a CA, a server certificate and client certificates for TLS (with the cryptography package), and
    an enrolment token (enrolment.token) for clients to join with."""
    from fedmoe.security import CA_KEY, make_certs

    if if_missing and (out / CA_KEY).exists():
        console.print(f"{out} already holds a CA; nothing to do")
        return
    directory = make_certs(
        out,
        tuple(host or ("localhost", "127.0.0.1", "::1")),
        tuple(client_name or ("client",)),
        overwrite=overwrite,
    )
    console.print(f"wrote TLS material to {directory}")


@app.command()
def simulate(
    spec: SpecOption = None,
    config_file: ConfigOption = None,
    sets: SetOption = None,
    grid: GridOption = None,
    rounds: RoundsOption = None,
    steps: StepsOption = None,
    lr: LrOption = None,
    batch_size: BatchOption = None,
    outer_lr: OuterLrOption = None,
    outer_momentum: OuterMomentumOption = None,
    seed: SeedOption = None,
    clients: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=(
                "Virtual clients (Flower SuperNodes), client i holding spec.data(i, n) (clients.count; "
                "default: one per path)."
            ),
        ),
    ] = None,
    profiles: Annotated[
        str | None,
        typer.Option(
            help=(
                "Device profiles the clients cycle through (clients.profiles): a mix (fp32, mixed, int4-p50) "
                "or profile names joined by commas."
            )
        ),
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(
            click_type=click.Choice(["data", "turn"]),
            help=(
                "How clients get paths (routing.assign): by their data (federated k-means over the virtual "
                "clients, then a histogram each: a path per cluster it holds enough of), or in turn."
            ),
        ),
    ] = None,
    cpus_per_client: Annotated[
        float, typer.Option(min=0, help="CPUs Ray reserves for each virtual client.")
    ] = 1.0,
    gpus_per_client: Annotated[
        float, typer.Option(min=0, help="GPUs (or fractions) Ray reserves for each virtual client.")
    ] = 0.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help=(
                "An existing Ray cluster: head:6379 from one of its machines, ray://head:10001 from outside "
                "(default: $RAY_ADDRESS, else a local Ray)."
            )
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the ensemble checkpoint and results.json.")
    ] = Path("runs/simulate"),
    verbose: Annotated[bool, typer.Option(help="Flower's debug logs.")] = False,
) -> None:
    """Train the spec's grid with virtual Flower clients on Ray, routed by federated centroids."""
    from fedmoe.assignment import parse_profiles
    from fedmoe.strategies.flower import simulate_federation

    try:
        mix = parse_profiles(profiles) if profiles is not None else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--profiles") from None
    config = make_config(
        config_file,
        sets,
        spec=spec,
        grid=grid,
        rounds=rounds,
        inner__steps=steps,
        inner__lr=lr,
        inner__batch_size=batch_size,
        outer__lr=outer_lr,
        outer__momentum=outer_momentum,
        seed=seed,
        clients__count=clients,
        clients__profiles=mix,
        routing__assign=routing,
    )
    console.print(describe(config))
    try:
        results = simulate_federation(config, cpus_per_client, gpus_per_client, ray_address, out, verbose)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    metric = results["metric"]
    variants = sorted({c["variant"] for c in results["clients"]})
    grid_text = "x".join(map(str, config.grid))
    nodes = len({c["client"].split(".")[0] for c in results["clients"]})
    table = Table(
        title=(
            f"{nodes} virtual clients, {len(results['clients'])} workers ({', '.join(variants)}), "
            f"grid {grid_text}, routing {config.routing.assign}"
        )
    )
    name, own = metric.replace("_", " "), f"client_{metric}"
    columns = ("round", "updates", "mean inner loss", "upload bytes", f"ensemble top-1 {name}")
    for column in (*columns, f"clients' own {name}", "min-max"):
        table.add_column(column, justify="right", no_wrap=column == "min-max")
    for r in results["rounds"]:
        score = f"{r[metric]:.4f}" if metric in r else "-"
        mine = f"{r[own]:.4f}" if own in r else "-"
        spread = f"{r[own + '_min']:.3f}-{r[own + '_max']:.3f}" if own in r else "-"
        row = (str(r["round"]), str(r["updates"]), f"{r['loss']:.4f}", f"{r['upload_bytes']:,}", score)
        table.add_row(*row, mine, spread)
    console.print(table)
    console.print(f"{results['seconds']:.0f} s" + (f"; wrote {out}" if out else ""))


@app.command()
def memory(
    spec: SpecOption = None,
    profile: Annotated[
        list[str] | None, typer.Option(help="Device profiles to measure (repeatable; default: every one).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per inner step.")] = 32,
    steps: Annotated[int, typer.Option(help="Inner steps per measured round.")] = 5,
) -> None:
    """Measure what a client round costs on one path of the spec, for the variant each profile is assigned:
    peak memory and time per step (each in a fresh process) beside the memory the assignment estimates."""
    from fedmoe.assignment import PROFILES, assign_variant, parse_profiles
    from fedmoe.config import DEFAULT_SPEC
    from fedmoe.memory import measure_round
    from fedmoe.modular import Path as GridPath
    from fedmoe.spec import load_spec

    ref = spec or DEFAULT_SPEC
    try:
        names = parse_profiles(",".join(profile or PROFILES))
        loaded = load_spec(ref)
    except ValueError as e:
        fail(str(e))
    path_model = loaded.build_path(GridPath((0,) * loaded.default_levels))
    table = Table(title=f"one client round of {ref}, batch {batch_size}")
    for column in ("profile", "variant", "estimate MiB", "measured peak MiB", "ratio", "ms / step"):
        table.add_column(column, justify="left" if column in ("profile", "variant") else "right")
    for name in names:
        try:
            variant = assign_variant(PROFILES[name], path_model)
        except ValueError as e:
            table.add_row(name, str(e), "", "", "", "")
            continue
        m = measure_round(ref, variant, steps, batch_size)
        table.add_row(
            name,
            variant.name,
            f"{m['estimate'] / 2**20:,.1f}",
            f"{m['peak'] / 2**20:,.1f}",
            f"{m['peak'] / m['estimate']:.2f}",
            f"{1000 * m['step_s']:.1f}",
        )
    console.print(table)


@app.command()
def health(
    server: Annotated[
        str, typer.Option(help="A coordinator or inference service, host:port.")
    ] = "127.0.0.1:7000",
    certs: Annotated[Path | None, typer.Option(help="TLS: the directory with ca.pem.")] = None,
    timeout: float = 5.0,
) -> None:
    """Exit 0 when the service answers SERVING to a gRPC health check (for container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fedmoe.clients.runtime import connect

    with connect(server, str(certs) if certs else None) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                .status
            )
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
