"""``ovpnctl key new|swap|del``: OVPN_NEW_KEY, SWAP_KEYS, DEL_KEY.

Keys are given per direction as the kernel takes them: a cipher key and the
8-byte implicit IV (OpenVPN derives both from the TLS exchange; here they are
typed in, as for a static tunnel).  The two ends mirror each other: one
side's --encrypt-* is the other's --decrypt-*.  Values are hex or ``@FILE``,
so secrets need not appear in the process list.
"""
from __future__ import annotations

import click

from bsd_ovpn.cli import cli
from bsd_ovpn.cli.args import (
    BadInput, key_sizes, parse_cipher, parse_key_id, parse_peer_id, parse_slot, read_secret,
)
from bsd_ovpn.cli.engineopts import engine_options, interface
from bsd_ovpn.interface import KeyMaterial


@cli.group("key")
@engine_options
def key_group() -> None:
    """Install, swap and delete a peer's data channel keys."""


def _material(cipher: str, key: str | None, iv: str | None, direction: str) -> KeyMaterial | None:
    key_size, iv_size = key_sizes(cipher)
    if key_size == 0:
        if key is not None or iv is not None:
            raise BadInput(f"--{direction}-key/--{direction}-iv: cipher none takes no keys")
        return None
    return KeyMaterial(read_secret(key, f"--{direction}-key", key_size),
                       read_secret(iv, f"--{direction}-iv", iv_size))


@key_group.command("new")
@click.argument("ifname", metavar="IFACE")
@click.argument("peer_id", type=int)
@click.option("--slot", default="primary", show_default=True, metavar="primary|secondary",
              help="Key slot (TX always uses the primary).")
@click.option("--key-id", type=int, default=0, show_default=True, help="Key id 0..7.")
@click.option("--cipher", required=True, metavar="NAME",
              help="AES-128-GCM, AES-192-GCM, AES-256-GCM, CHACHA20-POLY1305 or none.")
@click.option("--encrypt-key", metavar="HEX|@FILE", help="Key for sending.")
@click.option("--encrypt-iv", metavar="HEX|@FILE", help="8-byte implicit IV for sending.")
@click.option("--decrypt-key", metavar="HEX|@FILE", help="Key for receiving.")
@click.option("--decrypt-iv", metavar="HEX|@FILE", help="8-byte implicit IV for receiving.")
@engine_options
@click.pass_context
def new(ctx: click.Context, ifname: str, peer_id: int, slot: str, key_id: int, cipher: str,
        encrypt_key: str | None, encrypt_iv: str | None, decrypt_key: str | None,
        decrypt_iv: str | None) -> None:
    """OVPN_NEW_KEY: install a key pair in a slot (replacing what was there)."""
    peer_id = parse_peer_id(peer_id)
    kslot = parse_slot(slot)
    key_id = parse_key_id(key_id)
    name = parse_cipher(cipher)
    enc = _material(name, encrypt_key, encrypt_iv, "encrypt")
    dec = _material(name, decrypt_key, decrypt_iv, "decrypt")
    with interface(ctx, ifname) as ifc:
        ifc.new_key(peer_id, kslot, key_id, name, encrypt=enc, decrypt=dec)


@key_group.command("swap")
@click.argument("ifname", metavar="IFACE")
@click.argument("peer_id", type=int)
@engine_options
@click.pass_context
def swap(ctx: click.Context, ifname: str, peer_id: int) -> None:
    """OVPN_SWAP_KEYS: the secondary key becomes the primary."""
    peer_id = parse_peer_id(peer_id)
    with interface(ctx, ifname) as ifc:
        ifc.swap_keys(peer_id)


@key_group.command("del")
@click.argument("ifname", metavar="IFACE")
@click.argument("peer_id", type=int)
@click.option("--slot", required=True, metavar="primary|secondary", help="Slot to free.")
@engine_options
@click.pass_context
def delete(ctx: click.Context, ifname: str, peer_id: int, slot: str) -> None:
    """OVPN_DEL_KEY: free one slot."""
    peer_id = parse_peer_id(peer_id)
    kslot = parse_slot(slot)
    with interface(ctx, ifname) as ifc:
        ifc.del_key(peer_id, kslot)
