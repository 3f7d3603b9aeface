"""Progress bars of long library work (a matcher's optimisation), outside the CLI's reach.

Library code cannot see click's context, so ``diffeat --quiet`` (or ``-q`` after
a command's name) also sets the environment variable :data:`QUIET_ENV` for the
process; :func:`progress_bar` reads it. A bar is drawn on stderr only when
``enabled``, the process is not quiet and stderr is a terminal (tqdm's
``disable=None`` rule), so logs and pipes never fill with bar redraws.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: ``1`` (set by ``diffeat --quiet``): library code draws no progress bars
QUIET_ENV = "DIFFEAT_QUIET"


def quiet() -> bool:
    """Whether this process was asked for no progress output (:data:`QUIET_ENV` set, not 0)."""
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar on stderr (use it as a context), hidden when not ``enabled``, when
    :func:`quiet`, or when stderr is not a terminal; its ``total`` is kept either way."""
    from tqdm import tqdm

    disable: bool | None = None if enabled and not quiet() else True
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False)
