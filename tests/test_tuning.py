from __future__ import annotations

import subprocess
import sys


def test_tune_malloc_applies_on_glibc_and_respects_operator_env() -> None:
    code = "from mirror.tuning import tune_malloc; print(tune_malloc())"
    clean = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert clean.stdout.strip() == "True"
    preset = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"},
        check=True,
    )
    assert preset.stdout.strip() == "False"
