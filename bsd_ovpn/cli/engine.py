"""``ovpnctl engine run``: the userspace engine daemon in the foreground.

The engine implements if_ovpn's command set over tun devices for hosts
without if_ovpn (Linux); every other command reaches it through its UNIX
socket (``--engine userspace`` or auto).  It runs in the foreground so a
service manager (systemd, rc.d with daemon(8)) or a test owns its lifetime;
SIGTERM/SIGINT destroy its interfaces and remove the socket.  The interfaces'
tun devices live in the engine's network namespace, so run the other
ovpnctl commands (which configure addresses with ``ip``) in the same one.
"""
from __future__ import annotations

import click

from bsd_ovpn import engines
from bsd_ovpn.cli import cli
from bsd_ovpn.engine.daemon import DATAPLANE_KINDS, run as run_engine, setup_logging


@cli.group("engine")
def engine_group() -> None:
    """The userspace engine (if_ovpn in userspace, over tun)."""


@engine_group.command("run")
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="Control socket (default $BSD_OVPN_ENGINE_SOCKET or "
                   f"{engines.DEFAULT_ENGINE_SOCKET}).")
@click.option("--group", default=None,
              help="Group allowed to use the engine (socket mode 0660; default root only).")
@click.option("--no-replay-protection", is_flag=True,
              help="Accept replayed data packets (the FreeBSD kernel's default).")
@click.option("--dataplane", type=click.Choice(DATAPLANE_KINDS), default="auto",
              show_default=True,
              help="Packet mover: the C fast path, the Python one, or auto (C if it loads).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(socket_path: str | None, group: str | None, no_replay_protection: bool,
        dataplane: str, verbose: bool) -> None:
    """Run the userspace engine daemon in the foreground until SIGTERM/SIGINT."""
    setup_logging(verbose=verbose)
    run_engine(engines.engine_socket_path(socket_path), group=group, dataplane=dataplane,
               replay_protection=not no_replay_protection)
