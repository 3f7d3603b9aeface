"""Progress bars of long library work (a matcher's optimisation, the model passes of one
image), outside the CLI's reach.

Library code cannot see click's context, so ``diffeat --quiet`` (or ``-q`` after
a command's name) also sets the environment variable :data:`QUIET_ENV` for the
process; :func:`progress_bar` reads it. A bar is drawn on stderr only when
``enabled``, the process is not quiet and stderr is a terminal (tqdm's
``disable=None`` rule), so logs and pipes never fill with bar redraws.

:func:`inner_bar` is the bar inside one batch of images (the CLI's bar counts
images): it counts model passes (ensemble chunks, DDIM steps) and appears only
from :data:`INNER_MIN_PASSES` passes on, so a quick image draws nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

#: ``1`` (set by ``diffeat --quiet``): library code draws no progress bars
QUIET_ENV = "DIFFEAT_QUIET"

#: an :func:`inner_bar` is drawn from this many model passes on
INNER_MIN_PASSES = 4


def quiet() -> bool:
    """Whether this process was asked for no progress output (:data:`QUIET_ENV` set, not 0)."""
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Any:
    """A ``tqdm`` bar on stderr (use it as a context), hidden when not ``enabled``, when
    :func:`quiet`, or when stderr is not a terminal; its ``total`` is kept either way."""
    from tqdm import tqdm

    disable: bool | None = None if enabled and not quiet() else True
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False)


@contextmanager
def inner_bar(total: int, desc: str, unit: str = "UNet pass") -> Iterator[Any]:
    """The bar of the model passes of one batch of images (:func:`progress_bar`), drawn only
    when there are at least :data:`INNER_MIN_PASSES` of them; ``update(1)`` per pass. On a
    normal exit the final count is drawn, whatever tqdm's redraw interval skipped."""
    with progress_bar(total, desc, unit, enabled=total >= INNER_MIN_PASSES) as bar:
        yield bar
        bar.refresh()


def counted(items: Iterable[T], desc: str, unit: str = "UNet pass") -> Iterator[T]:
    """``items``, one model pass each, counted by an :func:`inner_bar` as each is done
    (``for t in counted(timesteps, "my-model, 2 images"): ...``), for a plugin whose passes
    are a plain loop."""
    items = list(items)
    with inner_bar(len(items), desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def row_slices(n: int, rows_per_pass: int) -> list[slice]:
    """The rows of each model pass when ``n`` latents run ``rows_per_pass`` at a time (an
    extractor's ``ensemble_batch``; 0: all ``n`` in one pass)."""
    size = rows_per_pass or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
