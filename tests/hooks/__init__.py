"""Test-only process hooks, injected through PYTHONPATH into the worker processes a test starts."""

from __future__ import annotations

import os
from pathlib import Path

HOOKS = Path(__file__).parent


def slow_first_delivery_env(delay: float, gate: str | Path | None = None) -> dict[str, str]:
    """Environment for a worker whose first delivery of each bulk task waits ``delay`` seconds (or for
    the ``gate`` file): see ``slow_first_delivery/sitecustomize.py``."""
    path = os.pathsep.join(p for p in (str(HOOKS / "slow_first_delivery"), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TEST_TASK_DELAY": str(delay)}
    if gate is not None:
        env["TEST_TASK_GATE"] = str(gate)
    return env
