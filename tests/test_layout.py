"""The rules of direction: the core imports no runner, only the Flower driver imports flwr,
no runner imports the demo.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = [p for p in (ROOT / "fedmoe").rglob("*.py") if p.name != "cli.py" and "v1" not in p.parts]
RUNNERS = [
    *(ROOT / "server").glob("*.py"),
    *(ROOT / "clients").glob("*.py"),
    *(ROOT / "strategies").glob("*.py"),
]


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_no_runner():
    for path in CORE:
        bad = {
            n
            for n in imported(path)
            if n.startswith(("fedmoe.server", "fedmoe.clients", "fedmoe.strategies"))
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_flower_driver_imports_flwr():
    everything = [*CORE, ROOT / "fedmoe" / "cli.py", *RUNNERS]
    users = {
        p.relative_to(ROOT).as_posix()
        for p in everything
        if any(n.split(".")[0] == "flwr" for n in imported(p))
    }
    assert users == {"strategies/flower.py"}


def test_no_runner_imports_the_demo():
    for path in RUNNERS:
        assert "fedmoe.experiment" not in imported(path), f"{path.relative_to(ROOT)} imports the demo"
    # plots: the demo's
    assert not [
        p for p in CORE if p.name not in ("experiment.py", "plots.py") and "fedmoe.experiment" in imported(p)
    ]
