"""docker-compose.yml is validated here, since no Docker engine runs the tests."""

from pathlib import Path

import click
import pytest
import typer
import yaml

from fedmoe.cli import app

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_runs_a_real_fedmoe_command_the_cli_accepts():
    group = typer.main.get_command(app)
    services = compose()["services"]
    assert services
    for name, service in services.items():
        args = service["command"]
        assert isinstance(args, list), f"{name}: give the command as a list"
        command = group.get_command(click.Context(group), args[0])
        assert command is not None, f"{name}: 'fedmoe {args[0]}' is not a fedmoe command"
        command.make_context(args[0], list(args[1:]))  # raises on an option the command does not take


def test_volumes_are_declared_and_the_image_enters_fedmoe():
    spec = compose()
    declared = set(spec.get("volumes", {}))
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("/", ".")) or source in declared, f"{name}: volume {source} is not declared"
    assert 'ENTRYPOINT ["fedmoe"]' in (ROOT / "Dockerfile").read_text()


def test_a_bad_option_is_caught():
    group = typer.main.get_command(app)
    with pytest.raises(click.UsageError):
        group.get_command(click.Context(group), "demo").make_context("demo", ["--no-such-option"])
