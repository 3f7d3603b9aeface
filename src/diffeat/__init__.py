"""diffeat: correspondences from diffusion-model features.

The public entry points are :class:`diffeat.Pipeline` (extract, describe, match),
:class:`diffeat.FeatureStore` (the zarr feature store) and the plugin API in
:mod:`diffeat.core.hookspecs`.
"""

from __future__ import annotations

from diffeat.core.version import __version__

__all__ = ["FeatureSet", "FeatureStore", "LayerInfo", "Pipeline", "__version__", "hookimpl"]


def __getattr__(name: str):  # lazy imports keep `import diffeat` and the CLI start fast
    if name == "Pipeline":
        from diffeat.core.pipeline import Pipeline

        return Pipeline
    if name == "FeatureStore":
        from diffeat.store import FeatureStore

        return FeatureStore
    if name in ("FeatureSet", "LayerInfo"):
        from diffeat.core import features

        return getattr(features, name)
    if name == "hookimpl":
        from diffeat.core.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'diffeat' has no attribute {name!r}")
