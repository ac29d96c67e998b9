"""The README's run command installs only what running needs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from harness import require_tool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = {"mypy", "ruff", "pytest", "matplotlib", "kubernetes-validate"}


def _size(path: Path) -> int:
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def test_make_run_installs_a_runtime_only_venv(tmp_path: Path) -> None:
    make = require_tool("make")
    venv = tmp_path / "venv"
    # The exact target `make run` depends on, into a venv of the test's own.
    subprocess.run(
        [make, "-s", "-C", str(ROOT), f"VENV={venv}", f"{venv}/bin/.runtime"],
        check=True,
        timeout=600,
    )
    listed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert installed & DEV_ONLY == set()
    version = subprocess.run(
        [venv / "bin" / "mirror", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("mirror, version")
    size_mib = _size(venv) / 2**20
    print(f"runtime venv: {size_mib:.0f} MiB")
    assert size_mib < 150, f"the runtime venv grew to {size_mib:.0f} MiB"
