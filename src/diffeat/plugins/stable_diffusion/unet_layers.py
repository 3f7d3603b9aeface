"""The UNet layers an extractor reads: the catalogue of capturable layers (channels and
stride from the UNet's structure, before any image runs), names and glob patterns resolved
against it, and the one way every recipe runs a UNet pass while capturing those layers'
outputs (with SDXL's added conditioning when the UNet has one)."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from diffeat.core.errors import ConfigError
from diffeat.core.features import LayerInfo
from diffeat.core.progress import row_slices
from diffeat.plugins.module_capture import HookTarget, ModuleCapture, first_tensor

#: the key of the UNet output among a pass's captured maps (no module has this name)
_SAMPLE = " sample"

#: the parts of a ResNet block whose outputs are maps (``conv2``: the residual branch)
RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")


def unet_layer_catalog(unet: nn.Module, vae_factor: int) -> list[LayerInfo]:
    """Every capturable layer of a diffusers ``UNet2DConditionModel``: name, channels and
    stride in model-input pixels, in the model's registration order.

    Computed from the module structure (which the UNet config defines; a UNet built on
    the ``meta`` device will do), never from a forward pass. Capturable are the modules
    whose output is a ``[B, C, h, w]`` map: ``conv_in``, every down/mid/up block, its
    ResNet blocks (and their ``norm1``, ``conv1``, ``norm2``, ``conv2``,
    ``conv_shortcut``), its transformer blocks (``attentions.j``, whose output is
    reshaped back to a map), its down/upsamplers, ``conv_norm_out`` and ``conv_out``.
    Modules inside a transformer block work on token sequences and are not listed.
    """
    rows: list[LayerInfo] = []

    def add(name: str, channels: int, level: int) -> None:
        rows.append(LayerInfo(name, int(channels), float(vae_factor * 2**level)))

    def block_parts(prefix: str, block: nn.Module, level: int) -> None:
        attentions = getattr(block, "attentions", None) or []
        for j, res in enumerate(block.resnets):
            add(f"{prefix}.resnets.{j}", res.out_channels, level)
            for part in RESNET_PARTS:
                module = getattr(res, part, None)
                if module is None:
                    continue
                channels = module.num_channels if part.startswith("norm") else module.out_channels
                add(f"{prefix}.resnets.{j}.{part}", channels, level)
        for j, attn in enumerate(attentions):
            add(f"{prefix}.attentions.{j}", attn.out_channels, level)

    level = 0
    add("conv_in", unet.conv_in.out_channels, level)
    for i, block in enumerate(unet.down_blocks):
        prefix = f"down_blocks.{i}"
        block_parts(prefix, block, level)
        out = block.resnets[-1].out_channels
        if block.downsamplers is not None:
            level += 1
            add(f"{prefix}.downsamplers.0", block.downsamplers[0].out_channels, level)
        add(prefix, out, level)
    if unet.mid_block is not None:
        block_parts("mid_block", unet.mid_block, level)
        add("mid_block", unet.mid_block.resnets[-1].out_channels, level)
    for i, block in enumerate(unet.up_blocks):
        prefix = f"up_blocks.{i}"
        block_parts(prefix, block, level)
        out = block.resnets[-1].out_channels
        if block.upsamplers is not None:
            level -= 1
            add(f"{prefix}.upsamplers.0", block.upsamplers[0].out_channels, level)
        add(prefix, out, level)
    if unet.conv_norm_out is not None:
        add("conv_norm_out", unet.conv_norm_out.num_channels, level)
    add("conv_out", unet.conv_out.out_channels, level)
    order = {n: i for i, (n, _) in enumerate(unet.named_modules())}
    return sorted(rows, key=lambda r: order[r.name])


def resolve_modules(
    model: nn.Module,
    patterns: list[str],
    where: str = "layers",
    capturable: list[str] | None = None,
) -> list[str]:
    """Expand exact names and glob patterns (``up_blocks.*.resnets.*.conv2``) to module names.

    The order is the model's registration order. With ``capturable`` (the names of
    :func:`unet_layer_catalog`) patterns resolve against those names only. A name that
    matches nothing is an error listing the nearest valid names (difflib).
    """
    modules = [n for n, _ in model.named_modules() if n]
    names = capturable if capturable is not None else modules
    chosen: list[str] = []
    for pattern in patterns:
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise ConfigError(_no_match(pattern, names, modules, where))
        chosen.extend(m for m in matches if m not in chosen)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def _no_match(pattern: str, names: list[str], modules: list[str], where: str) -> str:
    near = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5)
    tops = sorted({n.split(".")[0] for n in names})
    hint = f"nearest valid names: {', '.join(near)}" if near else f"top level: {', '.join(tops)}"
    inner = [n for n in modules if n not in names and fnmatch.fnmatchcase(n, pattern)]
    what = (
        f"{inner[0]!r} is a module of the model, but its output is a token sequence, not a map"
        if inner
        else f"no module of the model matches {pattern!r}"
    )
    return (
        f"{where}: {what}; {hint}. Glob patterns such as 'up_blocks.*.resnets.*.conv2' are "
        f"allowed; `diffeat layers CONFIG --all` lists every capturable layer"
    )


def capture_outputs(
    model: nn.Module, names: list[str], *, stop_early: bool = True
) -> ModuleCapture:
    """A :class:`ModuleCapture` of the outputs of the named submodules of ``model``."""
    modules = dict(model.named_modules())
    targets = [HookTarget(name, modules[name], "output", first_tensor) for name in names]
    return ModuleCapture(targets, stop_early=stop_early)


class UNetPasses:
    """UNet passes that capture the outputs of ``names`` (float32), shared by every recipe.

    :meth:`maps` is for a pass whose UNet output is not needed: with ``stop_early``
    the forward ends once the deepest captured module ran. :meth:`predict` is for a
    pass whose noise prediction moves a latent on: it runs the whole UNet and
    captures only when asked.

    With ``rows_per_pass`` (the extractor's ``ensemble_batch``) a call runs the UNet on
    that many latents at a time and concatenates the outputs (the rows are
    independent: the same result up to float rounding); :attr:`bar`, when set, counts
    every UNet forward.
    """

    def __init__(
        self,
        unet: nn.Module,
        names: list[str],
        *,
        stop_early: bool = True,
        rows_per_pass: int = 0,
    ) -> None:
        self.unet = unet
        self.names = names
        self.stop_early = stop_early
        #: latents per UNet forward (0: all of a call's latents in one forward)
        self.rows_per_pass = rows_per_pass
        #: SDXL's ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) of the passes now
        #: running, one row per latent (see :meth:`conditioned`); None for SD 1.x/2.x
        self.added: dict[str, torch.Tensor] | None = None
        #: a progress bar (``update(1)`` per UNet forward) while an extraction runs
        self.bar: Any = None

    @contextmanager
    def conditioned(
        self, added: dict[str, torch.Tensor] | None, *, zero_added: bool = False
    ) -> Iterator[None]:
        """Passes inside run with ``added`` as the UNet's ``added_cond_kwargs``; with
        ``zero_added`` the UNet's added embedding is replaced by zeros (a forward hook on
        ``add_embedding``: the time embedding is the timestep's alone, as DistillDIFT's
        copied forward, which never adds it)."""
        handle = None
        if zero_added and added is not None:
            handle = self.unet.add_embedding.register_forward_hook(
                lambda module, args, out: torch.zeros_like(out)
            )
        self.added = added
        try:
            yield
        finally:
            self.added = None
            if handle is not None:
                handle.remove()

    def row_chunks(self, n: int) -> list[slice]:
        """The rows of each UNet forward of a call on ``n`` latents."""
        return row_slices(n, self.rows_per_pass)

    def forwards(self, n: int) -> int:
        """UNet forwards of one call on ``n`` latents."""
        return len(self.row_chunks(n))

    def _kwargs(self, context: torch.Tensor, rows: slice) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": context[rows]}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = {k: v[rows] for k, v in self.added.items()}
        return kwargs

    def _chunked(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | int,
        context: torch.Tensor,
        around: Callable[[slice], AbstractContextManager[Any]] | None,
        forward: Callable[[torch.Tensor, Any, dict[str, Any]], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``forward(latents, t, kwargs)`` on each chunk of rows (inside ``around(rows)``),
        the outputs concatenated; one chunk is returned as it came."""
        n = latents.shape[0]
        parts = []
        for rows in self.row_chunks(n):
            rows_t = t[rows] if isinstance(t, torch.Tensor) and t.ndim == 1 and len(t) == n else t
            with around(rows) if around is not None else nullcontext():
                parts.append(forward(latents[rows], rows_t, self._kwargs(context, rows)))
            if self.bar is not None:
                self.bar.update(1)
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def maps(
        self,
        latents: torch.Tensor,
        t: torch.Tensor | int,
        context: torch.Tensor,
        around: Callable[[slice], AbstractContextManager[Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The captured outputs of one pass at timestep ``t`` on prompt states ``context``;
        ``around(rows)``, when given, is entered around the forward of those rows."""

        def forward(x: torch.Tensor, tt: Any, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
            with capture_outputs(self.unet, self.names, stop_early=self.stop_early) as cap:
                outs = cap.run(lambda: self.unet(x, tt, **kwargs))
            return {name: outs[name].float() for name in self.names}

        return self._chunked(latents, t, context, around, forward)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, capture: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The UNet output (``.sample``) of one whole pass and, with ``capture``, its maps."""

        def forward(x: torch.Tensor, tt: Any, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
            if not capture:
                return {_SAMPLE: self.unet(x, tt, **kwargs).sample}
            result: dict[str, torch.Tensor] = {}

            def run() -> None:
                result[_SAMPLE] = self.unet(x, tt, **kwargs).sample

            with capture_outputs(self.unet, self.names, stop_early=False) as cap:
                outs = cap.run(run)
            return {_SAMPLE: result[_SAMPLE], **{name: outs[name].float() for name in self.names}}

        out = self._chunked(latents, t, context, None, forward)
        sample = out.pop(_SAMPLE)
        return sample, (out if capture else None)
