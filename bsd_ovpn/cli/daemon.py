"""``ovpnctl server``, ``ovpnctl client``, ``ovpnctl status``, ``ovpnctl kill``.

``ovpnctl server -c server.conf`` replaces ``openvpn --config server.conf``:
same file, the data channel in if_ovpn (or the userspace engine).  ``status``
and ``kill`` talk to a running daemon over its root-only control socket.
"""
from __future__ import annotations

import json
import logging
import sys

import click

from bsd_ovpn.cli import cli
from bsd_ovpn.cli.engineopts import chosen_engine, engine_options

_CONFIG = click.option("-c", "--config", "config_path", required=True,
                       type=click.Path(exists=True, dir_okay=False),
                       help="OpenVPN config file (the same one openvpn --config reads).")
_CONTROL = click.option("--control-socket", default=None, metavar="PATH",
                        help="Control socket (default /var/run/bsd_ovpn/<config name>.ctl).")


def _logging(config_path: str, verbose: bool) -> None:
    """verb 0-2 -> warnings+info summary, 3 -> info, >= 4 -> debug; ``log FILE`` honoured."""
    from bsd_ovpn import config as configmod

    try:
        cfg = configmod.load(config_path)
        verb, logfile, append = cfg.verb, cfg.log, cfg.log_append
    except Exception:  # noqa: BLE001 - the daemon reports config errors itself
        verb, logfile, append = 3, None, False
    level = logging.DEBUG if verbose or verb >= 4 else logging.INFO if verb >= 1 else logging.WARNING
    handler: logging.Handler = (logging.FileHandler(logfile, mode="a" if append else "w")
                                if logfile else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    from bsd_ovpn import logutil
    logutil.harden(handler)          # no auth-token/passwords in logs; junk floods rate-limited
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the daemon owns this process's logging: verb/-v apply to the library's loggers
    # too, whatever level an importer may have left on them
    logging.getLogger("bsd_ovpn").setLevel(level)


@cli.command("server")
@_CONFIG
@engine_options
@_CONTROL
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def server_cmd(ctx: click.Context, config_path: str, control_socket: str | None,
               verbose: bool) -> None:
    """Run an OpenVPN server from an OpenVPN config, data channel in if_ovpn.

    SIGTERM/SIGINT: clients are told (RESTART/EXIT), the interface and its
    routes are removed, exit 0.  SIGHUP: re-read the config, keep clients.
    """
    from bsd_ovpn.daemon.server import run_server

    engine, sock = chosen_engine(ctx)
    _logging(config_path, verbose)
    sys.exit(run_server(config_path, engine=engine, engine_socket=sock,
                        control_socket=control_socket))


@cli.command("client")
@_CONFIG
@engine_options
@_CONTROL
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def client_cmd(ctx: click.Context, config_path: str, control_socket: str | None,
               verbose: bool) -> None:
    """Run an OpenVPN client from an OpenVPN config, data channel in if_ovpn.

    Reconnects (remote list, connect-retry) on ping-restart or RESTART;
    SIGTERM sends EXIT and removes what it created.
    """
    from bsd_ovpn.daemon.client import run_client

    engine, sock = chosen_engine(ctx)
    _logging(config_path, verbose)
    sys.exit(run_client(config_path, engine=engine, engine_socket=sock,
                        control_socket=control_socket))


@cli.command("status")
@_CONTROL
@click.option("--json", "as_json", is_flag=True, help="JSON (stable, see docs/json.md).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "prometheus"]),
              default="text", show_default=True, help="Output format.")
def status_cmd(control_socket: str | None, as_json: bool, fmt: str) -> None:
    """Show a running daemon's peers: addresses, cipher, key id, traffic."""
    from bsd_ovpn.daemon.control import DaemonStatus, request
    from bsd_ovpn.daemon.status import render_json, render_prometheus, render_text

    answer = request(control_socket, {"cmd": "status"})
    st = DaemonStatus.from_dict(answer["status"])
    if as_json or fmt == "json":
        click.echo(render_json(st))
    elif fmt == "prometheus":
        click.echo(render_prometheus(st), nl=False)
    else:
        click.echo(render_text(st))


@cli.command("kill")
@_CONTROL
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def kill_cmd(control_socket: str | None, target: str, as_json: bool) -> None:
    """Disconnect a client by common name or peer id (it is sent RESTART)."""
    from bsd_ovpn.daemon.control import request

    answer = request(control_socket, {"cmd": "kill", "target": target})
    if as_json:
        click.echo(json.dumps({"killed": answer["killed"]}))
    else:
        click.echo("disconnected peer id " + ", ".join(str(p) for p in answer["killed"]))
