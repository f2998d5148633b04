"""``ovpnctl install-service``: put the shipped rc.d script or systemd units in place.

Thin wrapper over :mod:`bsd_ovpn.service`; it installs files only and never
enables or starts anything (that stays the admin's ``sysrc`` / ``systemctl
enable`` decision).
"""
from __future__ import annotations

import click

from bsd_ovpn.cli import cli


@cli.command("install-service")
@click.option("--system", type=click.Choice(["auto", "linux", "freebsd"]), default="auto",
              show_default=True, help="Which files: systemd units (linux) or rc.d (freebsd).")
@click.option("--dest", metavar="DIR", default=None,
              help="Target directory (default /etc/systemd/system or /usr/local/etc/rc.d).")
@click.option("--program", metavar="PATH", default=None,
              help="ovpnctl path written into the files (default: the one found on PATH).")
@click.option("--force", is_flag=True, help="Replace files that differ from the shipped ones.")
@click.option("--dry-run", is_flag=True, help="Print the files instead of writing them.")
def install_service(system: str, dest: str | None, program: str | None, force: bool,
                    dry_run: bool) -> None:
    """Install the rc.d script (FreeBSD) or the systemd units (Linux); enables nothing."""
    from bsd_ovpn import service

    sysname = service.this_system() if system == "auto" else system
    files = service.files_for(sysname, program or service.find_program())
    target = dest or service.default_dest(sysname)
    if dry_run:
        for f in files:
            click.echo(f"# ----- {target}/{f.name} (mode {f.mode:o}) -----")
            click.echo(f.text, nl=False)
        return
    for item in service.install(files, target, force=force):
        click.echo(f"{'installed' if item.changed else 'unchanged'} {item.path}")
    if sysname == "linux" and dest is None:
        problem = service.systemd_reload()
        if problem:
            click.echo(f"warning: systemctl daemon-reload failed: {problem}", err=True)
        click.echo("next: systemctl enable --now ovpnctl-server@NAME "
                   "(config /etc/openvpn/server/NAME.conf)")
    elif sysname == "freebsd" and dest is None:
        click.echo('next: sysrc ovpnctl_enable=YES ovpnctl_configs="NAME" '
                   "(config /usr/local/etc/bsd_ovpn/NAME.conf); service ovpnctl start")
