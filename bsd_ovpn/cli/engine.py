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

import logging
import os
import signal

import click

from bsd_ovpn import engines
from bsd_ovpn.cli import cli
from bsd_ovpn.cli.args import BadInput
from bsd_ovpn.errors import OvpnError


class EngineStartError(OvpnError):
    """The engine daemon could not start; says why."""


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
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def run(socket_path: str | None, group: str | None, no_replay_protection: bool,
        verbose: bool) -> None:
    """Run the userspace engine daemon in the foreground until SIGTERM/SIGINT."""
    path = engines.engine_socket_path(socket_path)
    if os.geteuid() != 0:
        raise EngineStartError("the engine must run as root (it creates tun devices and "
                               "shares UDP ports)")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s engine: %(message)s")
    from bsd_ovpn.engine.daemon import EngineDaemon

    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--socket {path}: cannot create {parent}: {exc.strerror}") from None
    try:
        daemon = EngineDaemon(path, group=group)
    except KeyError:
        raise BadInput(f"--group {group!r}: no such group") from None
    except (RuntimeError, OSError) as exc:
        raise EngineStartError(f"cannot start the engine at {path}: {exc}") from None
    daemon.engine.replay_protection = not no_replay_protection
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    logging.getLogger("bsd_ovpn.engine").info("listening on %s", path)
    daemon.serve_forever()
