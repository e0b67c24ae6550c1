"""docker-compose.yml is validated here, since no Docker engine runs the tests."""

import re
from pathlib import Path

import click
import pytest
import typer
import yaml

from fedmoe.cli import app

ROOT = Path(__file__).resolve().parents[1]
GROUP = typer.main.get_command(app)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def parse(args: list[str]) -> click.Context:
    """Parse a fedmoe command line the way the CLI would, without running it."""
    command = GROUP.get_command(click.Context(GROUP), args[0])
    assert command is not None, f"'fedmoe {args[0]}' is not a fedmoe command"
    return command.make_context(args[0], list(args[1:]))  # raises on an option the command does not take


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_every_service_and_health_check_runs_a_real_fedmoe_command():
    for name, service in compose()["services"].items():
        assert isinstance(service["command"], list), f"{name}: give the command as a list"
        parse(service["command"])
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[:2] == ["CMD", "fedmoe"]
            parse(test[2:])


def test_the_topology_is_a_coordinator_four_unlike_clients_and_a_router_over_tls():
    services = compose()["services"]
    commands = {name: s["command"] for name, s in services.items()}
    assert [c[0] for c in commands.values()].count("server") == 1
    profiles = sorted(option(c, "--profile") for c in commands.values() if c[0] == "client")
    assert profiles == ["fp32", "fp32-p25", "int4-p50", "int8"]
    assert [c[0] for c in commands.values()].count("serve") == 1
    for name, args in commands.items():
        if args[0] in ("server", "serve", "client"):
            assert option(args, "--certs") == "/certs", f"{name} must speak TLS"
    certs = commands["certs"]
    assert {"coordinator", "router"} <= {
        certs[i + 1] for i, a in enumerate(certs) if a == "--host"
    } and "--if-missing" in certs


def test_each_client_holds_its_own_part_of_the_coordinators_spec_data():
    commands = [s["command"] for s in compose()["services"].values()]
    server = next(c for c in commands if c[0] == "server")
    clients = [c for c in commands if c[0] == "client"]
    assert sorted(int(option(c, "--partition")) for c in clients) == list(range(len(clients)))
    assert {option(c, "--partitions") for c in clients} == {str(len(clients))}
    # the same spec (None: the default) everywhere
    assert {option(c, "--spec") for c in clients} == {option(server, "--spec")}
    assert all(parse(c).params["partitions"] == len(clients) for c in clients)


def test_ports_volumes_and_dependencies_are_consistent():
    spec = compose()
    services, declared = spec["services"], set(spec["volumes"])
    for name, service in services.items():
        args = service["command"]
        for mapping in service.get("ports", []):
            container_port = str(mapping).split(":")[-1]
            assert option(args, "--address").endswith(f":{container_port}"), (
                f"{name}: publishes {mapping} but listens elsewhere"
            )
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared, f"{name}: volume {volume} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services
        server = option(args, "--server")
        if server:
            host, port = server.split(":")
            target = services[host]["command"]
            assert option(target, "--address").endswith(f":{port}"), (
                f"{name} talks to {server}, which does not listen there"
            )
    state_mounts = {
        name: v for name, s in services.items() for v in s.get("volumes", []) if v.startswith("state:")
    }
    assert state_mounts["coordinator"] == "state:/state" and state_mounts["router"] == "state:/state:ro"
    assert option(services["router"]["command"], "--checkpoint").startswith("/state/")
    assert 'ENTRYPOINT ["fedmoe"]' in (ROOT / "Dockerfile").read_text()


def test_the_readme_describes_the_same_services():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## docker compose") :]
    for name in compose()["services"]:
        assert re.search(rf"`{re.escape(name)}`", section), (
            f"README's docker compose section does not mention {name}"
        )


def test_a_bad_option_is_caught():
    with pytest.raises(click.UsageError):
        parse(["demo", "--no-such-option"])
