"""Feature-map pictures: a layer's ``C`` channels projected to RGB by PCA, beside the image.

As the papers show them: per image, the ``H x W`` cells of one layer at one timestep
are ``H*W`` vectors of ``C`` channels; their first three principal components become
red, green and blue, each scaled to ``[0, 1]``. Cells that look alike in the model's
eyes get alike colours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from diffeat.core.errors import DiffeatError
from diffeat.core.features import FeatureSet

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

DPI = 100


@dataclass(frozen=True)
class FeatureMap:
    """One layer at one timestep of one image, as the picture shows it."""

    layer: str
    timestep: int
    channels: int
    rgb: np.ndarray  # [H, W, 3] in [0, 1]
    explained: list[float] = field(default_factory=list)  # variance share of each component

    @property
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` of the layer's grid."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def pca_rgb(feature_map: torch.Tensor | np.ndarray) -> tuple[np.ndarray, list[float]]:
    """``[C, H, W]`` -> (``[H, W, 3]`` in ``[0, 1]``, the variance share of each component).

    The three leading principal components of the ``H*W`` cell vectors, each min-max
    scaled to ``[0, 1]``; the sign of a component is chosen so its largest loading is
    positive (the same features give the same colours). With fewer than three channels
    (or components without variance) the missing colours are 0.
    """
    x = torch.as_tensor(feature_map).detach().to("cpu", torch.float64)
    if x.ndim != 3:
        raise ValueError(f"a feature map is [C, H, W], got {tuple(x.shape)}")
    c, h, w = x.shape
    cells = x.reshape(c, h * w).T.numpy()
    cells = cells - cells.mean(axis=0, keepdims=True)
    rgb = np.zeros((h * w, 3))
    explained: list[float] = []
    if cells.size and np.isfinite(cells).all():
        _, s, vt = np.linalg.svd(cells, full_matrices=False)
        total = float((s**2).sum())
        for k in range(min(3, len(s))):
            if s[k] <= 1e-6 * s[0]:  # numerical noise, not a direction of the data
                break
            loading = vt[k]
            if loading[np.argmax(np.abs(loading))] < 0:
                loading = -loading
            proj = cells @ loading
            span = proj.max() - proj.min()
            rgb[:, k] = (proj - proj.min()) / span if span > 0 else 0.0
            explained.append(float(s[k] ** 2 / total) if total > 0 else 0.0)
    return rgb.reshape(h, w, 3), explained


def feature_map(
    features: FeatureSet, layer: str | None = None, timestep: int | None = None
) -> FeatureMap:
    """The PCA picture of ``layer`` (default: the first) at ``timestep`` (default: the first).

    An unknown layer or timestep is a :class:`DiffeatError` naming the ones there are.
    """
    names = list(features.layers)
    if not names:
        raise DiffeatError("the features hold no layer")
    if layer is None:
        layer = names[0]
    if layer not in features.layers:
        raise DiffeatError(f"no layer {layer!r}; the features have: {', '.join(names)}")
    steps = list(features.timesteps)
    if timestep is None:
        timestep = steps[0]
    if timestep not in steps:
        listed = ", ".join(str(t) for t in steps)
        raise DiffeatError(f"no timestep {timestep} in layer {layer!r}; there are: {listed}")
    tensor = features.layers[layer][steps.index(timestep)]
    rgb, explained = pca_rgb(tensor)
    return FeatureMap(layer, int(timestep), int(tensor.shape[0]), rgb, explained)


def feature_figure(image: Image.Image, fmap: FeatureMap, *, title: str | None = None) -> Figure:
    """The image (left) and the PCA picture of its features (right), at the same height.

    The feature grid covers the model input (squashed, cropped or padded as the
    extractor's transform says); its cells are drawn as blocks, without smoothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = fmap.grid
    panel_h = 3.2
    image_w = panel_h * image.width / max(1, image.height)
    map_w = panel_h * w / max(1, h)
    fig, (ax_i, ax_f) = plt.subplots(
        1,
        2,
        figsize=(image_w + map_w + 0.6, panel_h + 0.8),
        dpi=DPI,
        gridspec_kw={"width_ratios": [image_w, map_w]},
    )
    ax_i.imshow(image.convert("RGB"))
    ax_i.set_title("image", fontsize=9)
    ax_f.imshow(fmap.rgb, interpolation="nearest")
    share = sum(fmap.explained)
    ax_f.set_title(
        f"{fmap.layer} @ t={fmap.timestep}\n{fmap.channels} ch, {h}x{w} cells; PCA -> RGB "
        f"({100 * share:.0f}% var.)",
        fontsize=8,
    )
    for ax in (ax_i, ax_f):
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_features(
    image: Image.Image,
    features: FeatureSet,
    out: str | Path,
    *,
    layer: str | None = None,
    timestep: int | None = None,
    title: str | None = None,
) -> FeatureMap:
    """Save the PCA-to-RGB picture of one layer beside ``image`` as a PNG; returns what it
    drew."""
    import matplotlib.pyplot as plt

    fmap = feature_map(features, layer, timestep)
    fig = feature_figure(image, fmap, title=title)
    try:
        fig.savefig(Path(out), dpi=DPI)
    finally:
        plt.close(fig)
    return fmap
