"""``ovpnctl stats`` (OVPN_GET_STATS + GET_PEER_STATS) and ``ovpnctl events`` (GET_PKT).

``events`` drains the notification queue, which is the kernel's only copy:
whatever it prints is gone for any other controller of the interface (an
OpenVPN-style daemon learns of deleted peers and key rotation this way), so
on an interface a daemon manages, use it for debugging only.  ``--follow``
keeps polling (POLL_PKT semantics through GET_PKT's ENOENT) until Ctrl-C.
"""
from __future__ import annotations

import errno as _errno
import sys
import time

import click

from bsd_ovpn.cli import cli
from bsd_ovpn.cli.engineopts import engine_name, engine_options, interface
from bsd_ovpn.cli.output import dumps, notification_json, notification_text, stats_json, stats_text
from bsd_ovpn.errors import IfOvpnError

#: Seconds between queue polls with --follow (the queue holds 32 notifications;
#: a few per second is far more than a tunnel produces).
FOLLOW_INTERVAL = 0.5


@cli.command("stats")
@click.argument("ifname", metavar="IFACE")
@click.option("--json", "as_json", is_flag=True, help="JSON output (docs/json.md).")
@engine_options
@click.pass_context
def stats(ctx: click.Context, ifname: str, as_json: bool) -> None:
    """Interface counters and per-peer counters."""
    with interface(ctx, ifname) as ifc:
        st = ifc.stats()
        try:
            peers = ifc.peer_stats()
        except IfOvpnError as exc:
            if exc.errno not in (_errno.ENOTSUP, _errno.EOPNOTSUPP):
                raise
            peers = None            # an early FreeBSD 14 kernel without GET_PEER_STATS
        if as_json:
            click.echo(dumps(stats_json(ifc.name, engine_name(ifc.transport), st, peers)))
        else:
            click.echo(stats_text(ifc.name, st, peers))


@cli.command("events")
@click.argument("ifname", metavar="IFACE")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line (JSON Lines, docs/json.md).")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for notifications (Ctrl-C ends).")
@engine_options
@click.pass_context
def events(ctx: click.Context, ifname: str, as_json: bool, follow: bool) -> None:
    """Drain the interface's notifications (del_peer, rotate_key, float)."""
    with interface(ctx, ifname) as ifc:
        try:
            while True:
                for n in ifc.iter_notifications():
                    if as_json:
                        click.echo(dumps(notification_json(ifc.name, n), lines=True))
                    else:
                        click.echo(notification_text(ifc.name, n))
                    sys.stdout.flush()
                if not follow:
                    return
                time.sleep(FOLLOW_INTERVAL)
        except KeyboardInterrupt:
            if not follow:
                raise
