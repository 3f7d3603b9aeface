"""The adm plugin's command: ``diffeat convert adm STATE.safetensors OUT_DIR``.

Registered by the plugin's ``register_commands`` hook into the ``convert`` group (shared:
other plugins may add their own converters to it). Only click and :mod:`diffeat.cli.api`
are imported here; torch and diffusers when the command runs.
"""

from __future__ import annotations

import click

from diffeat.cli.api import command_group, emit_json

CONVERT_HELP = "Convert official weights into the folders diffeat's extractors load."


@click.command("adm")
@click.argument("state", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--head-channels",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Channels per attention head (num_head_channels; 64 for 256x256_diffusion_uncond).",
)
@click.option(
    "--attention-order",
    type=click.Choice(["legacy", "new"]),
    default="legacy",
    show_default=True,
    help="How the fused qkv is laid out: legacy (per head, the 256x256 model: "
    "use_new_attention_order=False) or new (three thirds).",
)
@click.option(
    "--image-size", type=int, default=256, show_default=True, help="The training resolution."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
def convert_adm_cmd(
    state: str,
    out_dir: str,
    head_channels: int,
    attention_order: str,
    image_size: int,
    as_json: bool,
) -> None:
    """Turn guided-diffusion's UNet state dict (exported once to safetensors: see docs/adm.md)
    into a diffusers UNet2DModel folder for the adm extractor, checked key by key and shape
    by shape."""
    from diffeat.plugins.adm.convert import convert_file

    out, arch = convert_file(
        state,
        out_dir,
        num_head_channels=head_channels,
        attention_order=attention_order,  # type: ignore[arg-type]
        image_size=image_size,
    )
    report = {
        "out": str(out),
        "block_out_channels": list(arch.block_out_channels),
        "num_res_blocks": arch.num_res_blocks,
        "attention_levels": list(arch.attention_levels),
        "num_head_channels": arch.num_head_channels,
        "out_channels": arch.out_channels,
        "tensors": len(arch.official_shapes()),
    }
    if as_json:
        emit_json(report)
        return
    click.echo(
        f"wrote {out}: channels {report['block_out_channels']}, "
        f"{arch.num_res_blocks} residual blocks per level, attention at levels "
        f"{report['attention_levels']}, {report['tensors']} tensors checked"
    )


def add_commands(cli: click.Group) -> None:
    """Add ``convert adm`` to the ``diffeat`` group ``cli``."""
    command_group(cli, "convert", CONVERT_HELP).add_command(convert_adm_cmd)
