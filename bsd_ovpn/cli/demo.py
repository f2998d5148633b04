"""``ovpnctl demo``: the first command after install (see :mod:`bsd_ovpn.demo`).

Exit status 0 when a ping went through the tunnel and ``ovpnctl status``
showed the client; 1 with the failing step's reason otherwise; 130 after
Ctrl-C / SIGTERM.  In every case what the demo made is gone afterwards.
"""
from __future__ import annotations

import sys

import click

from bsd_ovpn.cli import cli


@cli.command("demo")
@click.option("--engine", type=click.Choice(["auto", "kernel", "userspace"]), default="auto",
              show_default=True,
              help="Data channel: if_ovpn(4) (FreeBSD), the userspace engine, or auto "
                   "(the kernel when if_ovpn loads).")
@click.option("--timeout", type=click.FloatRange(1, 600), default=30.0, show_default=True,
              metavar="SECONDS", help="Give up on a step after this long.")
@click.option("-v", "--verbose", is_flag=True,
              help="Also print the two config files and the daemons' log tails.")
def demo_cmd(engine: str, timeout: float, verbose: bool) -> None:
    """Run a server and a client in two throwaway namespaces, ping, show status, clean up.

    Needs root.  Linux: network namespaces and the userspace engine;
    FreeBSD: vnet jails and if_ovpn(4).  Uses only 192.0.2.0/24,
    198.51.100.0/24 and 2001:db8::/32, and touches no existing interface.
    """
    from bsd_ovpn.demo import DemoInterrupted, run_demo

    def out(line: str) -> None:
        click.echo(line)
        sys.stdout.flush()

    try:
        result = run_demo(out=out, engine=engine, verbose=verbose, timeout=timeout)
    except DemoInterrupted as exc:
        click.echo(f"ovpnctl demo: {exc}; everything it made was removed", err=True)
        sys.exit(130)
    click.echo(f"demo passed in {result.seconds:.1f} s: the tunnel carried "
               f"{result.ping_received}/{result.ping_sent} pings and status showed the client.")
    click.echo("next: `ovpnctl demo -v` shows the two configs it used; README.rst walks "
               "through a real server and client.")
