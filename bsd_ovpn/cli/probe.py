"""``ovpnctl probe``: handshake with a server using a client config and report the result."""
from __future__ import annotations

import json
import sys

import click

from bsd_ovpn.cli import cli


@cli.command("probe")
@click.option("-c", "--config", "config_path", required=True,
              type=click.Path(exists=True, dir_okay=False), help="OpenVPN client config file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.5, 3600),
              help="Seconds to wait for the handshake.")
@click.option("--key-derivation", "kdf", type=click.Choice(["tls-ekm", "prf"]),
              default="tls-ekm", show_default=True,
              help="Announce TLS-EKM (the server then uses it) or only the OpenVPN PRF.")
def probe(config_path: str, as_json: bool, timeout: float, kdf: str) -> None:
    """Connect to the config's server, negotiate keys, print what was pushed, send EXIT.

    Needs no root and creates no interface; exits non-zero with the reason
    (TLS error, AUTH_FAILED, no answer) when the handshake fails.
    """
    from bsd_ovpn.probe import ProbeError, probe_config

    try:
        result = probe_config(config_path, timeout=timeout, ekm=kdf == "tls-ekm")
    except ProbeError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "reason": exc.reason, "error": str(exc)}))
            sys.exit(1)
        raise
    if as_json:
        click.echo(json.dumps({"ok": True, **result.as_dict()}, indent=2))
        return
    d = result.as_dict()
    click.echo(f"connected to {d['remote']} in {d['seconds']} s")
    click.echo(f"  server certificate CN: {d['server_common_name']}")
    click.echo(f"  TLS: {d['tls_version']} {d['tls_cipher']}")
    click.echo(f"  data channel: {d['cipher']}, key derivation {d['key_derivation']}, "
               f"peer id {d['peer_id']}, key id {d['key_id']}")
    click.echo("  pushed options:")
    for opt in d["pushed"]:
        click.echo(f"    {opt}")
