"""``ovpnctl peer add|del|set|list``: OVPN_NEW_PEER, DEL_PEER, SET_PEER, GET_PEER_STATS.

All peers of one interface share one UDP socket (the kernel answers EBUSY
to a second socket while peers exist).  ``peer add`` binds a fresh socket
each time, so it suits one peer per interface -- a static tunnel, the
``wg set`` case; a multi-peer server is a long-running program (the library)
that keeps its socket and passes it again for each new peer.
"""
from __future__ import annotations

import errno as _errno

import click

from bsd_ovpn import engines
from bsd_ovpn.cli import cli
from bsd_ovpn.cli.args import parse_hostport, parse_peer_id, parse_vpn_ips
from bsd_ovpn.cli.engineopts import engine_name, engine_options, interface
from bsd_ovpn.cli.output import dumps, peer_list_json, peer_text
from bsd_ovpn.cli.udpsock import open_peer_socket
from bsd_ovpn.errors import IfOvpnError
from bsd_ovpn.transport import errno_error


@cli.group("peer")
@engine_options
def peer_group() -> None:
    """Add, delete, configure and list the peers of an interface."""


@peer_group.command("add")
@click.argument("ifname", metavar="IFACE")
@click.argument("peer_id", type=int)
@click.option("--remote", required=True, metavar="ADDR:PORT",
              help="The peer's UDP address: 192.0.2.2:1194 or [2001:db8::2]:1194.")
@click.option("--local", default=None, metavar="ADDR:PORT",
              help="Bind here (default: any address, the remote's port); [::]:PORT with an "
                   "IPv4 remote gives a dual-stack socket.")
@click.option("--vpn-ip", "vpn_ips", multiple=True, metavar="ADDR",
              help="The peer's tunnel address (one IPv4 and/or one IPv6; repeatable), "
                   "used to route to it when the interface has several peers.")
@engine_options
@click.pass_context
def add(ctx: click.Context, ifname: str, peer_id: int, remote: str, local: str | None,
        vpn_ips: tuple[str, ...]) -> None:
    """OVPN_NEW_PEER: bind a UDP socket and hand it over with the peer."""
    peer_id = parse_peer_id(peer_id)
    remote_hp = parse_hostport(remote, "--remote")
    local_hp = parse_hostport(local, "--local", allow_wildcard=True) if local else None
    vpn4, vpn6 = parse_vpn_ips(vpn_ips)
    with interface(ctx, ifname) as ifc:
        ps = open_peer_socket(remote_hp, local_hp,
                              reuseport=engines.needs_reuseport(ifc.transport))
        try:
            ifc.new_peer(peer_id, ps.sock, ps.remote, ps.local, vpn_ipv4=vpn4, vpn_ipv6=vpn6)
        except IfOvpnError as exc:
            if exc.errno == _errno.EBUSY:
                raise errno_error(
                    _errno.EBUSY, exc.command,
                    f"{ifname} already has peers on another UDP socket; `peer add` binds a "
                    "new socket per call, so use one interface per peer", ifname) from exc
            raise
        finally:
            ps.close()          # if_ovpn / the engine holds its own reference


@peer_group.command("del")
@click.argument("ifname", metavar="IFACE")
@click.argument("peer_id", type=int)
@engine_options
@click.pass_context
def delete(ctx: click.Context, ifname: str, peer_id: int) -> None:
    """OVPN_DEL_PEER (queues a del_peer notification with the final counters)."""
    peer_id = parse_peer_id(peer_id)
    with interface(ctx, ifname) as ifc:
        ifc.del_peer(peer_id)


@peer_group.command("set")
@click.argument("ifname", metavar="IFACE")
@click.argument("peer_id", type=int)
@click.option("--keepalive", nargs=2, type=int, required=True, metavar="INTERVAL TIMEOUT",
              help="Ping every INTERVAL s; delete the peer after TIMEOUT s without data "
                   "(0 = off).")
@engine_options
@click.pass_context
def set_(ctx: click.Context, ifname: str, peer_id: int, keepalive: tuple[int, int]) -> None:
    """OVPN_SET_PEER: the kernel keepalive."""
    peer_id = parse_peer_id(peer_id)
    interval, timeout = keepalive
    with interface(ctx, ifname) as ifc:
        ifc.set_peer(peer_id, interval=interval, timeout=timeout)


@peer_group.command("list")
@click.argument("ifname", metavar="IFACE")
@click.option("--json", "as_json", is_flag=True, help="JSON output (docs/json.md).")
@engine_options
@click.pass_context
def list_(ctx: click.Context, ifname: str, as_json: bool) -> None:
    """Peer ids with their counters (OVPN_GET_PEER_STATS)."""
    with interface(ctx, ifname) as ifc:
        peers = ifc.peer_stats()
        if as_json:
            click.echo(dumps(peer_list_json(ifc.name, engine_name(ifc.transport), peers)))
            return
        for pid in sorted(peers):
            click.echo(peer_text(peers[pid]))
