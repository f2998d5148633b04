"""``ovpnctl interface create|destroy|list|up`` and ``ovpnctl start``.

``interface up`` is OVPN_START_VPN: it brings the interface and its link up,
and if_ovpn drops every packet sent into the tunnel until it has run.  A
FreeBSD admin knows "up" from ``ifconfig ovpn0 up``, so that is the name;
``ovpnctl start`` is the same call under the kernel's own name.  There is no
"down": if_ovpn has no stop command (``ifconfig down``/``ip link set down``
work as on any interface, and destroy ends everything).
"""
from __future__ import annotations

import contextlib

import click

from bsd_ovpn.cli import cli
from bsd_ovpn.cli import netconf
from bsd_ovpn.cli.args import BadInput, parse_cidr
from bsd_ovpn.cli.engineopts import engine_name, engine_options, interface, transport
from bsd_ovpn.cli.output import dumps, interface_list_json
from bsd_ovpn.errors import IfOvpnError, OvpnError
from bsd_ovpn.interface import Interface


@cli.group("interface")
@engine_options
def interface_group() -> None:
    """Create, list and destroy if_ovpn interfaces."""


@interface_group.command("create")
@click.argument("name", required=False, default="ovpn")
@click.option("--address", "addresses", multiple=True, metavar="CIDR",
              help="Tunnel address with prefix (repeatable; IPv4 and/or IPv6), "
                   "e.g. 198.51.100.1/24.")
@click.option("--mtu", type=int, default=None, help="Interface MTU (default 1428).")
@click.option("--mode", type=click.Choice(["p2p", "subnet"]), default=None,
              help="OVPN_SET_IFMODE: p2p (default) or subnet (servers).")
@engine_options
@click.pass_context
def create(ctx: click.Context, name: str, addresses: tuple[str, ...], mtu: int | None,
           mode: str | None) -> None:
    """Create an interface (NAME "ovpn" or omitted: the next free ovpnN) and print its name."""
    addrs = [parse_cidr(a) for a in addresses]
    if mtu is not None and not netconf.MIN_MTU <= mtu <= netconf.MAX_MTU:
        raise BadInput(f"--mtu {mtu}: if_ovpn accepts {netconf.MIN_MTU}..{netconf.MAX_MTU}")
    with transport(ctx) as tr:
        ifc = Interface.create(name, ifmode=mode, transport=tr)
        try:
            netconf.configure(ifc.name, addrs, mtu, subnet_mode=mode == "subnet")
        except BaseException:
            with contextlib.suppress(OvpnError, OSError):
                ifc.destroy()       # no half-configured interface left behind
            raise
        ifc.detach()
        click.echo(ifc.name)


@interface_group.command("destroy")
@click.argument("name")
@engine_options
@click.pass_context
def destroy(ctx: click.Context, name: str) -> None:
    """Destroy an interface: its peers are deleted and its UDP socket released."""
    with interface(ctx, name) as ifc:
        ifc.destroy()


@interface_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output (docs/json.md).")
@engine_options
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List the engine's if_ovpn interfaces and their peer ids."""
    with transport(ctx) as tr:
        items: list[tuple[str, list[int] | None]] = []
        for name in tr.list_interfaces():
            try:
                ids: list[int] | None = sorted(Interface(name, tr).peer_stats())
            except (IfOvpnError, OvpnError):
                ids = None
            items.append((name, ids))
        if as_json:
            click.echo(dumps(interface_list_json(engine_name(tr), items)))
            return
        for name, ids in items:
            peers = "?" if ids is None else (" ".join(map(str, ids)) or "-")
            click.echo(f"{name}\tpeers: {peers}")


def _start(ctx: click.Context, name: str) -> None:
    with interface(ctx, name) as ifc:
        ifc.start_vpn()


@interface_group.command("up")
@click.argument("name")
@engine_options
@click.pass_context
def up(ctx: click.Context, name: str) -> None:
    """OVPN_START_VPN: bring the interface and its link up (nothing is sent before)."""
    _start(ctx, name)


@cli.command("start")
@click.argument("name")
@engine_options
@click.pass_context
def start(ctx: click.Context, name: str) -> None:
    """OVPN_START_VPN (same as `interface up`)."""
    _start(ctx, name)
