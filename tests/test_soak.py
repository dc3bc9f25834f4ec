"""A short run of the soak (bench/soak.py), so the script keeps working.

The real soak is a minute (``python bench/soak.py``, figures in the README);
here a few seconds of the same mix prove every request is answered, nothing
leaks and SIGTERM exits 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
#: every request answered, nothing leaked, SIGTERM exits 0: those are checked here,
#: not how fast a loaded test machine answers (ten times the soak's bounds)
LOADED = ("--bound-factor", "10")


def test_a_short_soak_passes() -> None:
    run = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "6", "--concurrency", "12", *LOADED],
        capture_output=True,
        text=True,
        timeout=90,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SOAK PASSED" in run.stdout
