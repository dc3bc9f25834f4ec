"""``pgqg serve`` without the role checks after raw statements: bench/run.py's ``pgqg-noguard``.

What the checks (issue 26, `gateway.engine._planner`) cost a point select is measured
in the same run as pgqg itself, against this. Only the benchmark starts it, and no
setting turns the checks off: a raw statement served by this could change the role it
runs as, and the session-level advisory locks it takes outlive its answer.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `gateway`

from gateway.cli import main
from gateway.engine import _lease  # plain Python even in a compiled build: patchable
from gateway.engine._pipeline import Session

_lease.Session = functools.partial(Session, role_checks=False)  # type: ignore[misc]

if __name__ == "__main__":
    main(prog_name="pgqg")
