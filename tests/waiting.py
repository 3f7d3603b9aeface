"""Waiting in tests: on events and conditions (a marker written, a line printed), never on a
wall-clock budget.

A test that kills a process "after k entries" polls until the store holds k entries, then
kills it; on a loaded 2-core machine it waits longer, and passes. The only time limit is
:data:`HANG_GUARD_S`: a hang guard that ends a test that would otherwise wait forever (a
deadlock, a child that never starts), far above what any test needs on a slow machine. It
is not a speed budget, and no test asserts on elapsed time.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

#: seconds before a test that waits on a condition or a subprocess is declared hung
#: (``DIFFEAT_TEST_HANG_GUARD_S`` overrides it); a hang guard, not a speed budget
HANG_GUARD_S = float(os.environ.get("DIFFEAT_TEST_HANG_GUARD_S", "1800"))


def wait_until(
    condition: Callable[[], bool],
    what: str,
    *,
    proc: subprocess.Popen | None = None,
    output: Callable[[], str] | None = None,
    poll_s: float = 0.01,
) -> None:
    """Return as soon as ``condition()`` is true; ``what`` says what is awaited.

    With ``proc``, its ending first is a failure (the condition can no longer come), whose
    message shows ``output()`` (default: what is left on ``proc.stderr``). Only
    :data:`HANG_GUARD_S` without the condition fails as a hang.
    """
    guard = time.monotonic() + HANG_GUARD_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            if condition():  # it came just before the process ended
                return
            if output is not None:
                err = output()
            else:
                err = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {err}")
        if time.monotonic() > guard:
            raise AssertionError(f"hung: waited {HANG_GUARD_S:.0f} s for {what}")
        time.sleep(poll_s)
