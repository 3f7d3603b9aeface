"""Check a feature store entry by entry, and repair it by removing what cannot be used.

:func:`verify_store` reads every complete entry whole (what ``get`` checks: readable
metadata and chunks, shapes and dtypes as the entry records them, every chunk file
present; and that every value is finite), counts incomplete entries, damaged extractor
info and leftovers of killed writers. With ``repair=True`` it removes the damaged and
incomplete entries and the leftovers, so the next ``diffeat extract`` recomputes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffeat.store.featurestore import LEFTOVER_AGE_S, FeatureStore

__all__ = ["LEFTOVER_AGE_S", "EntryDamage", "VerifyReport", "verify_store"]


@dataclass
class EntryDamage:
    """One complete entry that cannot be used as stored."""

    cache_key: str
    image_key: str
    problem: str
    removed: bool = False


@dataclass
class VerifyReport:
    """What :func:`verify_store` found (and, with ``repair``, removed)."""

    path: str
    checked: int = 0
    damaged: list[EntryDamage] = field(default_factory=list)
    #: cache key -> image keys of entries without a (readable) completion marker
    incomplete: dict[str, list[str]] = field(default_factory=dict)
    #: cache key -> what is wrong with its extractor info
    damaged_info: dict[str, str] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing needs repairing (damaged extractor info is reported apart:
        ``diffeat extract`` rewrites it, and the entries are sound)."""
        return not self.damaged and not any(self.incomplete.values()) and not self.leftovers

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "checked": self.checked,
            "damaged": [vars(d) for d in self.damaged],
            "incomplete": self.incomplete,
            "damaged_info": self.damaged_info,
            "leftovers": self.leftovers,
            "repaired": self.repaired,
            "ok": self.ok,
        }


def verify_store(
    store: FeatureStore,
    *,
    cache_key: str | None = None,
    repair: bool = False,
    on_entry: Callable[[], object] | None = None,
) -> VerifyReport:
    """Check every complete entry of ``store`` (of one ``cache_key`` if given).

    ``repair`` (the store must be open in mode ``"a"``) removes each damaged entry
    (only the write that was checked: an entry replaced meanwhile is kept), the
    incomplete entries, and leftovers (see :data:`LEFTOVER_AGE_S`). ``on_entry`` is
    called after each entry (a progress bar's ``update``).
    """
    report = VerifyReport(str(store.path), repaired=repair)
    extractors = store.extractors()
    keys = [cache_key] if cache_key is not None else list(extractors)
    damaged_info = store.damaged_extractors()
    report.damaged_info = {k: v for k, v in damaged_info.items() if k in keys}
    for key in keys:
        there = store.has_cache_key(key)
        complete, incomplete = store.scan(key) if there else ([], [])
        for image_key in complete:
            write_id = store.write_id(key, image_key)
            problem = store.check_entry(key, image_key)
            report.checked += 1
            if problem is not None:
                damage = EntryDamage(key, image_key, problem)
                if repair and write_id is not None:
                    damage.removed = store.delete(key, image_key, write_id=write_id)
                report.damaged.append(damage)
            if on_entry is not None:
                on_entry()
        if repair and there:
            store.reindex(key)  # object storage: the index is rebuilt from the entries
        if incomplete:
            report.incomplete[key] = incomplete
            if repair:
                for image_key in incomplete:
                    store.delete(key, image_key, only_incomplete=True)
    leftovers = store.leftovers(LEFTOVER_AGE_S)
    if cache_key is not None:
        leftovers = [p for p in leftovers if _under(p, f"{store.path}/{cache_key}")]
    report.leftovers = [str(p) for p in leftovers]
    if repair:
        for path in leftovers:
            store.remove_leftover(path)
    return report


def _under(path: Path | str, folder: str) -> bool:
    path = str(path)
    return path == folder or path.startswith(folder + "/")
