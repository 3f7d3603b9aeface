"""The progress bars training draws: what it needs of one, and a bar that draws nothing."""

from __future__ import annotations

from typing import Any, Protocol


class Bar(Protocol):
    """What training needs of a progress bar (a ``tqdm`` bar fits)."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix(
        self, ordered_dict: dict[str, str] | None = None, refresh: bool = True
    ) -> object:
        """Show ``ordered_dict`` (e.g. the loss) next to the bar."""
        ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, *exc: object) -> object: ...


class ProgressFactory(Protocol):
    """``progress(total=..., desc=..., unit=..., initial=...)`` -> a :class:`Bar`."""

    def __call__(self, *, total: int, desc: str, unit: str, initial: int = 0) -> Bar: ...


class NullBar:
    """A bar that draws nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, ordered_dict: dict[str, str] | None = None, refresh: bool = True) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def null_progress(*, total: int, desc: str, unit: str, initial: int = 0, **_: Any) -> NullBar:
    """The :class:`ProgressFactory` of a run without bars."""
    return NullBar()
