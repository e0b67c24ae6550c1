"""The repository is ruff-clean under the settings in pyproject.toml ([tool.ruff])."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")  # the ruff installed next to this Python (the dev extra)


@pytest.mark.skipif(not RUFF.exists(), reason=f"ruff is not installed next to {sys.executable}")
def test_ruff_check_finds_nothing():
    proc = subprocess.run(
        [str(RUFF), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"
