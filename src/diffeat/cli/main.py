"""Entry point of the ``diffeat`` command: the group, error handling and plugin commands.

``diffeat --version`` and ``diffeat --help`` import neither torch nor
diffusers: the group (:class:`~diffeat.cli.group.DiffeatGroup`) imports a
command's module when the command is asked for.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import TextIO

import click

from diffeat import __version__
from diffeat.cli.group import DiffeatGroup, verbose_callback
from diffeat.core.errors import DiffeatError, DiffeatWarning

ENVIRONMENT = """\b
Environment:
  DIFFEAT_PLUGINS          comma-separated names: the only third-party plugins
                           (entry points) to load; built-ins always load
  DIFFEAT_DISABLE_PLUGINS  comma-separated plugins (built-in or third-party)
                           not to load, their commands included
  DIFFEAT_STORE            the feature store of extract/match/eval/plot when
                           --store is not given (--no-store: none)
  DIFFEAT_STORE_DTYPE      float16 (default), float32 or bfloat16: what
                           --store-dtype is when not given
  DIFFEAT_IMAGE_ORIENTATION  raw: keep a photo's stored raster (default exif:
                           turn it upright by its EXIF orientation)
  DIFFEAT_QUIET            1: no progress bars from library code (what
                           --quiet sets for the process)
  DIFFEAT_FULL_HASH        1: fingerprint every byte of large weight files
                           (default: 16 sampled 1 MiB blocks; a new store key)
  DIFFEAT_ZARR_FAST_PATH   0 to read and write the store through zarr's
                           public API only (default 1: the faster path)
  AWS_ENDPOINT_URL         endpoint of an S3-compatible server for --store
                           s3://... (credentials: the usual AWS_* variables)
  HF_HUB_OFFLINE           1: use only models already in the Hugging Face
                           cache, never the network
  HF_HOME, HF_HUB_CACHE    where models downloaded from the hub are cached
                           (default ~/.cache/huggingface/hub)

\b
Exit status: 0 done, 2 a user error (the message says what to change),
1 an internal error (with traceback), 130 interrupted (Ctrl-C).
Every command also takes --quiet and -v/--verbose after its name.
"""


@click.group(
    cls=DiffeatGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=ENVIRONMENT,
)
@click.version_option(__version__, prog_name="diffeat")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or progress lines.")
@click.option(
    "--verbose",
    "-v",
    count=True,
    expose_value=False,
    is_eager=True,
    callback=verbose_callback,
    help="Log what happens on stderr (-vv: debug, every library).",
)
@click.option(
    "--raw-orientation",
    is_flag=True,
    help="Keep photos' stored pixels: do not apply their EXIF orientation.",
)
@click.pass_context
def cli(ctx: click.Context, quiet: bool, raw_orientation: bool) -> None:
    """Correspondences from diffusion-model features."""
    obj = ctx.ensure_object(dict)
    obj["quiet"] = bool(quiet or obj.get("quiet"))
    if obj["quiet"]:
        from diffeat.core.progress import QUIET_ENV

        os.environ[QUIET_ENV] = "1"  # read by library progress bars (the matchers')
    if raw_orientation:
        from diffeat.core.images import ORIENTATION_ENV

        os.environ[ORIENTATION_ENV] = "raw"  # read by every image load of this process


def _add_commands() -> None:
    """Every command at once: the built-in ones, then those of the plugins the process-wide
    registry holds (``register_commands``): ``generate`` comes with the stable-diffusion
    plugin, ``checkpoint`` and ``plot mixing-weights`` with the hyperfeatures plugin.

    ``main()`` does not need this (the group loads commands on demand); it is for
    embedding and for tests that swap the registry (``reset_plugin_manager``)."""
    from diffeat.cli.info import record_plugin_commands
    from diffeat.core.plugins import get_plugin_manager

    assert isinstance(cli, DiffeatGroup)
    cli.load_builtins()
    cli.plugins_loaded = True
    pm = get_plugin_manager()
    pm.add_commands(cli)
    record_plugin_commands(pm)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Print a :class:`~diffeat.core.errors.DiffeatWarning` as one ``warning: ...`` line on
    stderr (no source location: it is about the user's files); other warnings as Python does."""
    if issubclass(category, DiffeatWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit 0 on success, 2 on a user error (message, no traceback), 1 on an
    internal error, 130 when interrupted (Ctrl-C)."""
    warnings.showwarning = _show_warning
    try:
        code = cli.main(args=argv, prog_name="diffeat", standalone_mode=False)
    except click.exceptions.Abort:
        # click turns Ctrl-C during a prompt or while parsing into Abort
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DiffeatError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        click.echo(
            "error: internal error (the traceback above is a bug report's best friend)", err=True
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
