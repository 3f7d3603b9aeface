"""Import paths that moved in the architecture step still work, with a warning naming the new one."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("diffeat.plugins.datasets.schema", "diffeat.core.datasets", "Pair"),
        ("diffeat.testing_models", "diffeat.testing.sd", "build_tiny_stable_diffusion"),
        ("diffeat.testing_vit", "diffeat.testing.vit", "build_tiny_dino"),
    ],
)
def test_moved_module_warns_and_reexports(old: str, new: str, name: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_pck_protocol_former_name() -> None:
    from diffeat.eval import protocols

    with pytest.warns(DeprecationWarning, match="PCKProtocol"):
        assert protocols.Protocol is protocols.PCKProtocol
