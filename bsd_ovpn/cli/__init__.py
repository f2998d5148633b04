"""ovpnctl: the command line.  Thin: every command maps to one library call.

Each command group lives in its own module and registers itself here.
Errors a person can act on are printed as one line with a non-zero exit;
``--debug`` shows the traceback.
"""
from __future__ import annotations

import sys

import click

from bsd_ovpn import __version__
from bsd_ovpn.errors import OvpnError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(__version__, prog_name="ovpnctl")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run OpenVPN-protocol tunnels on if_ovpn(4) or the userspace engine."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console entry point: OvpnError becomes one line on stderr and exit 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="ovpnctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (OvpnError, OSError) as exc:
        if debug:
            raise
        click.echo(f"ovpnctl: error: {exc}", err=True)
        sys.exit(1)


# Command modules register themselves on ``cli`` when imported.
from bsd_ovpn.cli import _commands  # noqa: E402,F401
