"""The docker-compose topology as real processes, each in its own network namespace, so that traffic
crosses real (virtual) network interfaces: needs root and `ip netns`; skipped with the reason otherwise."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = [sys.executable, "-m", "fedmoe.cli"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """Network namespaces on one bridge, one per host name, each with an address of a private test subnet."""

    def __init__(self, names):
        tag = os.getpid() % 10000
        self.subnet = f"10.231.{os.getpid() % 250}"
        self.bridge = f"fmbr{tag}"
        self.namespaces = {name: f"fm{tag}-{i}" for i, name in enumerate(names)}
        self.addresses = {name: f"{self.subnet}.{i + 2}" for i, name in enumerate(names)}

    def __enter__(self):
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")
        for name, ns in self.namespaces.items():
            outside, inside = f"{ns}a", f"{ns}b"
            ip("netns", "add", ns)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", outside, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)

    def run(self, name, args, **kwargs):
        """Start `fedmoe args` on host `name`."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[name], *PYTHON, *args], **kwargs)

    def logged(self, name, args, log):
        """Start `fedmoe args` on host `name`, its output going to the file `log`."""
        with open(log, "w") as out:
            return self.run(name, args, stdout=out, stderr=subprocess.STDOUT)


def client_options(command: list[str]) -> list[str]:
    """The options of a compose client that say what it is and which data it holds (the test gives server,
    certs and state).
    """
    return [
        arg
        for name in ("--spec", "--profile", "--partition", "--partitions")
        if name in command
        for arg in (name, command[command.index(name) + 1])
    ]


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"fmprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def test_compose_topology_across_network_namespaces(tmp_path):
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    clients = {
        name: client_options(s["command"]) for name, s in services.items() if s["command"][0] == "client"
    }
    with Hosts(["coordinator", *clients, "router", "user"]) as hosts:
        coordinator, router = hosts.addresses["coordinator"], hosts.addresses["router"]
        certs, state = tmp_path / "certs", tmp_path / "state"
        subprocess.run(
            PYTHON + ["certs", "--out", str(certs), "--host", coordinator, "--host", router],
            check=True,
            capture_output=True,
        )
        procs = [
            hosts.logged(
                "coordinator",
                [
                    "server",
                    "--address",
                    f"{coordinator}:7000",
                    "--state",
                    str(state),
                    "--certs",
                    str(certs),
                    "--grid",
                    "4",
                    "--rounds",
                    "3",
                    "--steps",
                    "10",
                    "--min-clients",
                    str(len(clients)),
                ],
                tmp_path / "coordinator.log",
            )
        ]
        try:
            procs.append(
                hosts.logged(
                    "router",
                    [
                        "serve",
                        "--checkpoint",
                        str(state / "ensemble"),
                        "--address",
                        f"{router}:7100",
                        "--certs",
                        str(certs),
                        "--wait",
                        "240",
                    ],
                    tmp_path / "router.log",
                )
            )
            workers = [
                hosts.logged(
                    name,
                    [
                        "client",
                        "--server",
                        f"{coordinator}:7000",
                        "--certs",
                        str(certs),
                        *options,
                        "--timeout",
                        "240",
                    ],
                    tmp_path / f"{name}.log",
                )
                for name, options in clients.items()
            ]
            procs += workers
            for name, proc in zip(clients, workers):
                assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
            health = hosts.run(
                "user",
                ["health", "--server", f"{router}:7100", "--certs", str(certs)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(60):  # the router starts serving once it has loaded the checkpoint
                if health.wait(timeout=30) == 0:
                    break
                health = hosts.run(
                    "user",
                    ["health", "--server", f"{router}:7100", "--certs", str(certs)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            ask = hosts.run(
                "user",
                ["predict", "--server", f"{router}:7100", "--certs", str(certs), "--digit", "3"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            out, err = ask.communicate(timeout=60)
            assert ask.returncode == 0, err
            answer = json.loads(out)
            assert (
                0 <= answer["prediction"] < 10
                and len(answer["experts"]) == 1
                and abs(sum(answer["outputs"]) - 1) < 1e-3
            )
            status = json.loads((state / "ensemble" / "manifest.json").read_text())
            # every round closes with all the clients' workers (one per cluster a client holds enough of)
            updates = {m["updates"] for m in status["metrics"]}
            assert len(status["metrics"]) == 3 and len(updates) == 1 and updates.pop() >= len(clients)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
