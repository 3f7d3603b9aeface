"""Built-in dataset plugins: ``spair``, ``pfwillow``, ``cub`` and ``synthetic``.

Each factory takes its validated options (``root``, ``split`` and more) and
returns a :class:`~diffeat.core.datasets.Dataset` (the contract, in core) that
yields :class:`~diffeat.core.datasets.Pair` objects; see ``docs/evaluation.md``
for the layouts and pair rules.
"""

from __future__ import annotations

from diffeat.core.hookspecs import Register, hookimpl
from diffeat.plugins.datasets.cub import CUB
from diffeat.plugins.datasets.pfwillow import PFWillow
from diffeat.plugins.datasets.spair import SPair
from diffeat.plugins.datasets.synthetic import Synthetic

__all__ = ["CUB", "PFWillow", "SPair", "Synthetic"]


@hookimpl
def register_datasets(register: Register) -> None:
    register("spair", SPair)
    register("pfwillow", PFWillow)
    register("cub", CUB)
    register("synthetic", Synthetic)
