"""The guided-diffusion (ADM) UNet in two spellings: the official state dict and diffusers'
``UNet2DModel``, with the paper's block numbering between them.

One walk over the architecture (:meth:`AdmArchitecture.parts`), mirroring
guided-diffusion's ``UNetModel.__init__``, gives every module twice: its
official key prefix (``input_blocks.4.0``, ``output_blocks.11.2``, ...) and its
diffusers module name (``down_blocks.1.resnets.0``, ``up_blocks.3.upsamplers.0``).
The converter, the expected key set of a state dict, the tiny test checkpoints
and the capturable layers all come from that walk.

The official numbering of whole blocks (DIFT's ``up_ft_index`` counts
``output_blocks``) maps to the diffusers module that ends the block. For output
block ``i`` with ``j, k = divmod(i, num_res_blocks + 1)``: ``up_blocks[j].upsamplers[0]``
when the block upsamples (``k == num_res_blocks`` and ``j`` is not the last level),
else ``up_blocks[j].attentions[k]`` on a level with attention, else
``up_blocks[j].resnets[k]``. So on the 256x256 model output block 4 is
``up_blocks.1.attentions.1`` and output block 11 is ``up_blocks.3.upsamplers.0``.
Input block ``0`` is ``conv_in``; input block ``i > 0`` with ``l, r = divmod(i - 1,
num_res_blocks + 1)`` is ``down_blocks[l].downsamplers[0]`` when ``r == num_res_blocks``,
else ``down_blocks[l].attentions[r]`` or ``.resnets[r]``; ``middle_block`` is ``mid_block``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from diffeat.core.errors import DiffeatError

#: GroupNorm groups of every normalisation in guided-diffusion (``normalization``)
NORM_GROUPS = 32
#: the diffusers class the converter writes
UNET_CLASS = "UNet2DModel"

PartKind = Literal["linear", "conv", "norm", "resnet", "attention"]
AttentionOrder = Literal["legacy", "new"]


@dataclass(frozen=True)
class Part:
    """One module of the walk: official prefix, diffusers name, kind and channels.

    ``block`` is the official block it belongs to (``input_blocks.3``, ``middle_block``,
    ``output_blocks.11``; empty for the time embedding and the output head); ``stride``
    is the block's output stride in input pixels.
    """

    official: str
    diffusers: str
    kind: PartKind
    in_channels: int
    out_channels: int
    block: str = ""
    stride: int = 1


@dataclass(frozen=True)
class BlockInfo:
    """One capturable official block: its name, the diffusers module ending it, its output."""

    name: str
    module: str
    channels: int
    stride: int


@dataclass(frozen=True)
class AdmArchitecture:
    """What fixes the shapes of a guided-diffusion ``UNetModel`` (without class labels).

    ``block_out_channels`` are ``model_channels * channel_mult`` per level;
    ``attention_levels`` the levels (0 = full resolution) whose blocks have attention;
    ``num_head_channels`` the channels per attention head (not visible in the weights:
    64 in the 256x256 unconditional model); ``scale_shift`` guided-diffusion's
    ``use_scale_shift_norm``.
    """

    block_out_channels: tuple[int, ...] = (256, 256, 512, 512, 1024, 1024)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (3, 4, 5)
    num_head_channels: int = 64
    in_channels: int = 3
    out_channels: int = 6
    scale_shift: bool = True
    image_size: int = 256

    def __post_init__(self) -> None:
        for level in self.attention_levels:
            ch = self.block_out_channels[level]
            if ch % self.num_head_channels:
                raise DiffeatError(
                    f"attention at level {level} has {ch} channels, not a multiple of "
                    f"num_head_channels {self.num_head_channels}: pass the head width the "
                    f"checkpoint was trained with (--head-channels; 64 for 256x256_diffusion_uncond)"
                )

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def model_channels(self) -> int:
        return self.block_out_channels[0]

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels

    # -- the walk ---------------------------------------------------------------------------

    def parts(self) -> list[Part]:
        """Every module with weights, in guided-diffusion's construction order."""
        return list(self._walk())

    def _walk(self) -> Iterator[Part]:
        c0, emb = self.model_channels, self.time_embed_dim
        yield Part("time_embed.0", "time_embedding.linear_1", "linear", c0, emb)
        yield Part("time_embed.2", "time_embedding.linear_2", "linear", emb, emb)
        yield Part("input_blocks.0.0", "conv_in", "conv", self.in_channels, c0, "input_blocks.0")
        skips, ch, block, last = [c0], c0, 1, self.levels - 1
        for level, out in enumerate(self.block_out_channels):
            stride = 2**level
            for r in range(self.num_res_blocks):
                name = f"input_blocks.{block}"
                down = f"down_blocks.{level}"
                yield Part(f"{name}.0", f"{down}.resnets.{r}", "resnet", ch, out, name, stride)
                ch = out
                if level in self.attention_levels:
                    yield Part(
                        f"{name}.1", f"{down}.attentions.{r}", "attention", ch, ch, name, stride
                    )
                skips.append(ch)
                block += 1
            if level != last:
                name = f"input_blocks.{block}"
                down = f"down_blocks.{level}.downsamplers.0"
                yield Part(f"{name}.0", down, "resnet", ch, ch, name, 2 * stride)
                skips.append(ch)
                block += 1
        stride = 2**last
        mid = "middle_block"
        yield Part(f"{mid}.0", "mid_block.resnets.0", "resnet", ch, ch, mid, stride)
        yield Part(f"{mid}.1", "mid_block.attentions.0", "attention", ch, ch, mid, stride)
        yield Part(f"{mid}.2", "mid_block.resnets.1", "resnet", ch, ch, mid, stride)
        block = 0
        for j, level in enumerate(reversed(range(self.levels))):
            out, stride = self.block_out_channels[level], 2**level
            for k in range(self.num_res_blocks + 1):
                name, up = f"output_blocks.{block}", f"up_blocks.{j}"
                yield Part(
                    f"{name}.0", f"{up}.resnets.{k}", "resnet", ch + skips.pop(), out, name, stride
                )
                ch = out
                sub = 1
                if level in self.attention_levels:
                    yield Part(
                        f"{name}.1", f"{up}.attentions.{k}", "attention", ch, ch, name, stride
                    )
                    sub = 2
                if level and k == self.num_res_blocks:
                    yield Part(
                        f"{name}.{sub}", f"{up}.upsamplers.0", "resnet", ch, ch, name, stride // 2
                    )
                block += 1
        yield Part("out.0", "conv_norm_out", "norm", c0, c0)
        yield Part("out.2", "conv_out", "conv", c0, self.out_channels)

    # -- the official state dict --------------------------------------------------------------

    def official_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the official state dict with its shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        for p in self.parts():
            for suffix, shape in self._official_tensors(p):
                shapes[f"{p.official}.{suffix}"] = shape
        return shapes

    def _official_tensors(self, p: Part) -> list[tuple[str, tuple[int, ...]]]:
        i, o = p.in_channels, p.out_channels
        if p.kind == "linear":
            return [("weight", (o, i)), ("bias", (o,))]
        if p.kind == "conv":
            return [("weight", (o, i, 3, 3)), ("bias", (o,))]
        if p.kind == "norm":
            return [("weight", (o,)), ("bias", (o,))]
        if p.kind == "attention":
            return [
                ("norm.weight", (o,)),
                ("norm.bias", (o,)),
                ("qkv.weight", (3 * o, o, 1)),
                ("qkv.bias", (3 * o,)),
                ("proj_out.weight", (o, o, 1)),
                ("proj_out.bias", (o,)),
            ]
        emb = 2 * o if self.scale_shift else o
        out = [
            ("in_layers.0.weight", (i,)),
            ("in_layers.0.bias", (i,)),
            ("in_layers.2.weight", (o, i, 3, 3)),
            ("in_layers.2.bias", (o,)),
            ("emb_layers.1.weight", (emb, self.time_embed_dim)),
            ("emb_layers.1.bias", (emb,)),
            ("out_layers.0.weight", (o,)),
            ("out_layers.0.bias", (o,)),
            ("out_layers.3.weight", (o, o, 3, 3)),
            ("out_layers.3.bias", (o,)),
        ]
        if i != o:
            out += [("skip_connection.weight", (o, i, 1, 1)), ("skip_connection.bias", (o,))]
        return out

    # -- diffusers ------------------------------------------------------------------------------

    def unet_config(self) -> dict[str, Any]:
        """The ``UNet2DModel`` keyword arguments of this architecture."""
        attn = set(self.attention_levels)
        down = [
            "AttnDownBlock2D" if lvl in attn else "ResnetDownsampleBlock2D"
            for lvl in range(self.levels)
        ]
        up = [
            "AttnUpBlock2D" if lvl in attn else "ResnetUpsampleBlock2D"
            for lvl in reversed(range(self.levels))
        ]
        return {
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": False,
            "time_embedding_type": "positional",
            "flip_sin_to_cos": True,  # guided-diffusion's timestep_embedding: [cos, sin]
            "freq_shift": 0,
            "down_block_types": down,
            "mid_block_type": "UNetMidBlock2D",
            "up_block_types": up,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.num_res_blocks,
            "mid_block_scale_factor": 1,
            "downsample_type": "resnet",
            "upsample_type": "resnet",
            "dropout": 0.0,
            "act_fn": "silu",
            "attention_head_dim": self.num_head_channels,
            "norm_num_groups": NORM_GROUPS,
            "attn_norm_num_groups": NORM_GROUPS,  # the mid-block attention has its GroupNorm
            "norm_eps": 1e-5,
            "resnet_time_scale_shift": "scale_shift" if self.scale_shift else "default",
            "add_attention": True,
            "class_embed_type": None,
            "num_class_embeds": None,
        }

    @classmethod
    def from_unet_config(
        cls, config: Mapping[str, Any], where: str = "config.json"
    ) -> AdmArchitecture:
        """The architecture of a ``UNet2DModel`` config written by :meth:`unet_config`;
        anything else is refused with a message naming what was found."""
        found = config.get("_class_name", "?")
        if found != UNET_CLASS:
            raise DiffeatError(
                f"{where}: a {found} model, not an ADM UNet2DModel: the adm extractor reads "
                f"folders written by `diffeat convert adm STATE.safetensors OUT_DIR`"
            )
        down = list(config.get("down_block_types", []))
        allowed = {"AttnDownBlock2D", "ResnetDownsampleBlock2D"}
        if not down or set(down) - allowed or config.get("downsample_type") != "resnet":
            raise DiffeatError(
                f"{where}: a UNet2DModel with down blocks {down} and downsample_type "
                f"{config.get('downsample_type')!r}, not guided-diffusion's ADM layout "
                f"(ResnetDownsampleBlock2D / AttnDownBlock2D with resnet down-sampling); "
                f"write the folder with `diffeat convert adm`"
            )
        arch = cls(
            block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
            num_res_blocks=int(config["layers_per_block"]),
            attention_levels=tuple(i for i, t in enumerate(down) if t == "AttnDownBlock2D"),
            num_head_channels=int(config["attention_head_dim"]),
            in_channels=int(config["in_channels"]),
            out_channels=int(config["out_channels"]),
            scale_shift=config.get("resnet_time_scale_shift") == "scale_shift",
            image_size=int(config.get("sample_size") or 256),
        )
        expected = arch.unet_config()
        differs = {
            k: config.get(k)
            for k in ("up_block_types", "upsample_type", "attn_norm_num_groups", "flip_sin_to_cos")
            if config.get(k) != expected[k]
        }
        if differs:
            raise DiffeatError(
                f"{where}: not the ADM layout diffeat writes ({differs}); write the folder with "
                f"`diffeat convert adm`"
            )
        return arch

    # -- capturable blocks ----------------------------------------------------------------------

    def blocks(self) -> list[BlockInfo]:
        """Every official block in forward order, with the diffusers module that ends it."""
        last: dict[str, Part] = {}
        for p in self.parts():
            if p.block:
                last[p.block] = p
        return [BlockInfo(n, p.diffusers, p.out_channels, p.stride) for n, p in last.items()]

    def resolve_layers(self, patterns: list[str], where: str = "layers") -> list[BlockInfo]:
        """The blocks named by ``patterns`` (exact names or globs such as ``output_blocks.*``),
        in forward order; a name that matches nothing lists the nearest valid names."""
        import difflib

        blocks = self.blocks()
        names = [b.name for b in blocks]
        chosen: set[str] = set()
        for pattern in patterns:
            matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
                hint = f" (nearest: {', '.join(close)})" if close else ""
                raise DiffeatError(
                    f"{where}: this ADM model has no block {pattern!r}{hint}; its blocks are "
                    f"input_blocks.0-{sum(n.startswith('input') for n in names) - 1}, "
                    f"middle_block and output_blocks.0-"
                    f"{sum(n.startswith('output') for n in names) - 1} (guided-diffusion's "
                    f"numbering; globs such as 'output_blocks.*' are allowed)"
                )
            chosen.update(matches)
        return [b for b in blocks if b.name in chosen]


def interleaved_qkv(qkv: Any, heads: int, order: AttentionOrder = "legacy") -> tuple[Any, Any, Any]:
    """Split a fused qkv weight ``[3C, ...]`` (or bias ``[3C]``) into q, k, v ``[C, ...]``.

    ``legacy`` (guided-diffusion's ``QKVAttentionLegacy``, the 256x256 model): the rows are
    grouped by head first, ``[heads, 3, ch, ...]``, q/k/v inside each head; ``new``
    (``QKVAttention``, ``use_new_attention_order``): three plain thirds.
    """
    if order == "new":
        return tuple(qkv.chunk(3, dim=0))  # type: ignore[return-value]
    rest = tuple(qkv.shape[1:])
    c = qkv.shape[0] // 3
    grouped = qkv.reshape(heads, 3, c // heads, *rest)
    q, k, v = (grouped[:, i].reshape(c, *rest) for i in range(3))
    return q, k, v
