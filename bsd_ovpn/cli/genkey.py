"""``ovpnctl genkey``: the key files of ``openvpn --genkey``, byte-compatible.

Formats are keyfile.py's (H3), so keys move freely between stock OpenVPN and
bsd_ovpn.  Files are created 0600 (also when one existed with a looser mode:
it is overwritten, as ``openvpn --genkey`` does) and never through a
symbolic link.  Without FILE (or with ``-``) the key goes to stdout.
"""
from __future__ import annotations

import os
import sys

import click

from bsd_ovpn.cli import cli
from bsd_ovpn.cli.args import BadInput
from bsd_ovpn.proto import keyfile

KINDS = ("tls-crypt", "tls-auth", "tls-crypt-v2-server", "tls-crypt-v2-client", "secret")


def write_private(path: str, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, refusing symlinks."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise BadInput(f"{path} is a symbolic link; refusing to write a key through it") \
                from None
        raise BadInput(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        os.fchmod(fh.fileno(), 0o600)       # an existing file keeps its mode otherwise
        fh.write(text)


@cli.command("genkey")
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("file", required=False, default=None)
@click.option("--server-key", metavar="FILE",
              help="tls-crypt-v2 server key (needed for tls-crypt-v2-client).")
@click.option("--metadata", metavar="BASE64",
              help="tls-crypt-v2-client: user metadata, base64 (default: a timestamp).")
def genkey(kind: str, file: str | None, server_key: str | None, metadata: str | None) -> None:
    """Generate a tls-crypt / tls-auth / tls-crypt-v2 key (file mode 0600)."""
    if kind != "tls-crypt-v2-client" and (server_key or metadata):
        raise BadInput("--server-key and --metadata are for tls-crypt-v2-client only")
    skey = None
    if kind == "tls-crypt-v2-client":
        if not server_key:
            raise BadInput("tls-crypt-v2-client needs --server-key FILE (the tls-crypt-v2 "
                           "server key that wraps it)")
        skey = keyfile.TLSCryptV2ServerKey.load(server_key)
    text = keyfile.genkey(kind, server_key=skey, metadata_b64=metadata)
    if file is None or file == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_private(file, text)
