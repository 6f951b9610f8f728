"""Test-only hook, never part of styletag: Python imports this file at start-up in every process whose
PYTHONPATH holds its folder (``tests.hooks.slow_first_delivery_env``). In such a worker a bulk task delivered for
the first time waits ``TEST_TASK_DELAY`` seconds, or until the file ``TEST_TASK_GATE`` exists, before it works,
so that it outlives a short visibility timeout and its message is delivered again while it waits."""

import os
import time

DELAY = float(os.environ.get("TEST_TASK_DELAY") or 0)
GATE = os.environ.get("TEST_TASK_GATE") or None

if DELAY > 0:
    from celery import signals

    @signals.task_prerun.connect
    def _slow_first_delivery(task=None, **_kwargs) -> None:
        if task is None or task.name != "styletag.tag_products":
            return
        if (task.request.delivery_info or {}).get("redelivered"):
            return
        deadline = time.monotonic() + DELAY
        while time.monotonic() < deadline and not (GATE and os.path.exists(GATE)):
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
