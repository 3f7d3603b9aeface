"""Built-in dataset plugins: ``spair``, ``pfwillow``, ``cub``, ``synthetic``, ``hpatches``
(``"homography"``: image sequences), ``davis2017`` and ``jhmdb`` (``"propagation"`` datasets
yielding videos).

Each factory takes its validated options (``root``, ``split`` and more) and
returns a :class:`~diffeat.core.datasets.Dataset` (the contract, in core) that
yields :class:`~diffeat.core.datasets.Pair` objects; see ``docs/evaluation.md``
for the layouts and pair rules. ``hpatches`` is a homography benchmark (``task =
"homography"``): it yields :class:`~diffeat.core.sequences.HomographySequence` records;
``davis2017`` and ``jhmdb`` are propagation benchmarks yielding
:class:`~diffeat.core.videos.Video` records.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from diffeat.core.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from diffeat.plugins.datasets.cub import CUB
    from diffeat.plugins.datasets.davis import Davis2017
    from diffeat.plugins.datasets.hpatches import HPatches
    from diffeat.plugins.datasets.jhmdb import Jhmdb
    from diffeat.plugins.datasets.pfwillow import PFWillow
    from diffeat.plugins.datasets.spair import SPair
    from diffeat.plugins.datasets.synthetic import Synthetic

# Imported on first use (they need torch), so listing commands stays fast.
_EXPORTS = {
    "CUB": "cub",
    "HPatches": "hpatches",
    "Davis2017": "davis",
    "Jhmdb": "jhmdb",
    "PFWillow": "pfwillow",
    "SPair": "spair",
    "Synthetic": "synthetic",
}

__all__ = ["CUB", "Davis2017", "HPatches", "Jhmdb", "PFWillow", "SPair", "Synthetic"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


@hookimpl
def register_datasets(register: Register) -> None:
    from diffeat.plugins.datasets.cub import CUB
    from diffeat.plugins.datasets.davis import Davis2017
    from diffeat.plugins.datasets.hpatches import HPatches
    from diffeat.plugins.datasets.jhmdb import Jhmdb
    from diffeat.plugins.datasets.pfwillow import PFWillow
    from diffeat.plugins.datasets.spair import SPair
    from diffeat.plugins.datasets.synthetic import Synthetic

    register("spair", SPair)
    register("pfwillow", PFWillow)
    register("cub", CUB)
    register("synthetic", Synthetic)
    register("hpatches", HPatches)
    register("davis2017", Davis2017)
    register("jhmdb", Jhmdb)
