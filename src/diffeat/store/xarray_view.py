"""The xarray view of one stored layer, with pixel coordinates for plotting without diffeat.

:meth:`diffeat.store.FeatureStore.open_xarray` returns the layer's zarr group as
an xarray Dataset (variable ``features``, dims ``(timestep, channel, y, x)``) and
adds, from the entry's stored image transform (``meta["transform"]``, see
:class:`diffeat.core.geometry.ImageTransform`):

- ``x_input`` / ``y_input`` (dims ``x`` / ``y``): each cell's centre in the
  model-input pixel frame (the grid covers the model input exactly, cell ``j``
  of ``w`` has its centre at ``(j + 0.5) * model_w / w - 0.5``);
- ``x_image`` / ``y_image``: the same centres in the original image's pixel
  indices, through the transform (``image = (model - offset + 0.5) / scale - 0.5``);
- attributes ``image_size``, ``model_size``, ``transform_scale``,
  ``transform_offset`` and ``extent_image`` (``[left, right, bottom, top]`` of the
  grid in image pixels, for ``matplotlib``'s ``imshow(..., extent=...)`` over the
  image, whose own extent is ``[-0.5, W - 0.5, H - 0.5, -0.5]``).

Pixel indices follow the library's convention (``core/geometry.py``): the centre of
the top-left pixel is ``(0, 0)``. Every value is a plain number, so the dataset
can be saved (``to_zarr``, ``to_netcdf``) and plotted where diffeat is not installed.
An entry without a stored transform gets input coordinates from the extractor's
declared stride (when the store has it), no image coordinates, and a
``coordinates`` attribute that says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffeat.core.geometry import ImageTransform, rescale_points

__all__ = ["cell_coordinates"]


def _axis_points(n: int, axis: int) -> torch.Tensor:
    """``[n, 2]`` float64 grid points along one axis (the other coordinate 0)."""
    pts = torch.zeros(n, 2, dtype=torch.float64)
    pts[:, axis] = torch.arange(n, dtype=torch.float64)
    return pts


def cell_coordinates(
    grid_size: tuple[int, int],
    transform: dict[str, Any] | None,
    stride: float | None = None,
) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, Any]]:
    """The coordinates and attributes of a ``[..., h, w]`` grid (``grid_size = (w, h)``).

    Returns ``({name: (dim, values)}, attrs)``: ``x_input``, ``y_input``, ``x_image``,
    ``y_image`` from ``transform`` (an :meth:`ImageTransform.to_dict` dict); without
    one, ``x_input`` / ``y_input`` from ``stride`` (model-input pixels per cell) when
    given, and a ``coordinates`` note in the attributes.
    """
    w, h = int(grid_size[0]), int(grid_size[1])
    coords: dict[str, tuple[str, np.ndarray]] = {}
    attrs: dict[str, Any] = {}
    xs, ys = _axis_points(w, 0), _axis_points(h, 1)
    if transform is None:
        if stride is None:
            attrs["coordinates"] = (
                "this entry stores no image transform and its extractor no stride: "
                "no pixel coordinates"
            )
            return coords, attrs
        model = (w * float(stride), h * float(stride))
        x_in = rescale_points(xs, (w, h), model)[:, 0]
        y_in = rescale_points(ys, (w, h), model)[:, 1]
        coords["x_input"] = ("x", x_in.numpy())
        coords["y_input"] = ("y", y_in.numpy())
        attrs["coordinates"] = (
            "this entry stores no image transform (written before diffeat recorded it): "
            "x_input/y_input come from the extractor's declared stride, and there are no "
            "image coordinates; extract it again for x_image/y_image"
        )
        return coords, attrs
    try:
        t = ImageTransform.from_dict(transform)
    except (KeyError, TypeError, ValueError):
        attrs["coordinates"] = f"this entry's stored transform is not readable: {transform!r}"
        return coords, attrs
    x_in = rescale_points(xs, (w, h), t.model_size)[:, 0]
    y_in = rescale_points(ys, (w, h), t.model_size)[:, 1]
    x_im = t.grid_to_image(xs, (w, h))[:, 0]
    y_im = t.grid_to_image(ys, (w, h))[:, 1]
    coords["x_input"] = ("x", x_in.numpy())
    coords["y_input"] = ("y", y_in.numpy())
    coords["x_image"] = ("x", x_im.numpy())
    coords["y_image"] = ("y", y_im.numpy())
    # the grid's outer edges (cell -0.5 and w - 0.5) in image pixels
    edges = torch.tensor([[-0.5, -0.5], [w - 0.5, h - 0.5]], dtype=torch.float64)
    (left, top), (right, bottom) = t.grid_to_image(edges, (w, h)).tolist()
    attrs.update(
        {
            "image_size": list(t.image_size),
            "model_size": list(t.model_size),
            "transform_scale": list(t.scale),
            "transform_offset": list(t.offset),
            "extent_image": [left, right, bottom, top],
        }
    )
    return coords, attrs


def with_coordinates(
    ds: Any, grid_size: tuple[int, int], transform: dict[str, Any] | None, stride: float | None
) -> Any:
    """``ds`` with :func:`cell_coordinates` assigned (coordinates and attributes)."""
    coords, attrs = cell_coordinates(grid_size, transform, stride)
    ds = ds.assign_coords({name: (dim, values) for name, (dim, values) in coords.items()})
    for name in coords:
        ds[name].attrs["units"] = "pixels"
    ds.attrs.update(attrs)
    return ds
