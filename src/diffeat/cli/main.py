"""Entry point of the ``diffeat`` command: the group, error handling and plugin commands."""

from __future__ import annotations

import sys
import traceback

import click

from diffeat import __version__
from diffeat.core.errors import DiffeatError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="diffeat")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Correspondences from diffusion-model features."""
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet


def _add_commands() -> None:
    """The built-in commands, then the commands plugins bring (``register_commands``):
    ``generate`` comes with the stable-diffusion plugin, ``checkpoint`` and
    ``plot mixing-weights`` with the hyperfeatures plugin."""
    from diffeat.cli import evaluate, extract, info, match, store, train
    from diffeat.core.plugins import get_plugin_manager

    for module in (info, extract, match, store, evaluate, train):
        module.add_to(cli)
    __import__("diffeat.cli.quickstart", fromlist=["add_to"]).add_to(cli)  # fold into the tuple
    get_plugin_manager().add_commands(cli)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit 0 on success, 2 on a user error (message, no traceback), 1 otherwise."""
    _add_commands()
    try:
        code = cli.main(args=argv, prog_name="diffeat", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
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
