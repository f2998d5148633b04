"""Parsing of the low-level commands' arguments, with one-line errors.

A person typing ``ovpnctl peer add ovpn0 1 --remote 2001:db8::1:1194`` should
get one line saying what is wrong and how to write it, not a usage screen or
a traceback; :class:`BadInput` is that line (exit status 2, like click's own
usage errors).  Values are checked here against what if_ovpn accepts, before
anything is sent.
"""
from __future__ import annotations

import binascii
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Union

import click

from bsd_ovpn.ifovpn import CIPHER_KEY_SIZES, IMPLICIT_IV_SIZE, MAX_KEY_ID, MAX_PEER_ID, KeySlot

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]

#: A key file given with @FILE is never read beyond this (keys are <= 32 bytes).
MAX_KEY_FILE = 4096


class BadInput(click.ClickException):
    """A command-line value is wrong: one line on stderr, exit status 2."""

    exit_code = 2

    def show(self, file: object = None) -> None:
        click.echo(f"ovpnctl: error: {self.format_message()}", err=True)


@dataclass(frozen=True)
class HostPort:
    """An ``ADDR:PORT`` argument; ``address`` None means the wildcard (``:PORT``)."""

    address: IPAddress | None
    port: int
    scope_id: int = 0

    def __str__(self) -> str:
        if self.address is None:
            return f":{self.port}"
        if self.address.version == 6:
            scope = f"%{self.scope_id}" if self.scope_id else ""
            return f"[{self.address}{scope}]:{self.port}"
        return f"{self.address}:{self.port}"


_V6 = re.compile(r"^\[([^\]]+)\]:(\d+)$")


def parse_hostport(text: str, option: str, *, allow_wildcard: bool = False) -> HostPort:
    """``192.0.2.1:1194``, ``[2001:db8::1]:1194``, ``[fe80::1%eth0]:1194``;
    with ``allow_wildcard`` (a local address) also ``:1194`` (any address)
    and port 0 (any free port)."""
    text = text.strip()
    m = _V6.match(text)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise BadInput(f"{option} {text!r}: write IPv6 addresses in brackets, "
                       "e.g. [2001:db8::1]:1194")
    else:
        raise BadInput(f"{option} {text!r}: expected ADDR:PORT, e.g. 192.0.2.1:1194")
    lowest = 0 if allow_wildcard else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 0xFFFF:
        raise BadInput(f"{option} {text!r}: the port must be {lowest}..65535")
    port = int(port_text)
    if host == "":
        if not allow_wildcard:
            raise BadInput(f"{option} {text!r}: an address is needed, e.g. 192.0.2.1:{port}")
        return HostPort(None, port)
    scope = 0
    if "%" in host:
        host, scope_text = host.split("%", 1)
        if scope_text.isdigit():
            scope = int(scope_text)
        else:
            try:
                scope = socket.if_nametoindex(scope_text)
            except OSError:
                raise BadInput(f"{option} {text!r}: no interface {scope_text!r} "
                               "for the IPv6 scope") from None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(f"{option} {text!r}: {host!r} is not an IP address "
                       "(names are not resolved)") from None
    if scope and addr.version == 4:
        raise BadInput(f"{option} {text!r}: an IPv4 address has no scope")
    return HostPort(addr, port, scope)


def parse_cidr(text: str, option: str = "--address") -> IPInterface:
    """``198.51.100.1/24`` or ``2001:db8:100::1/64`` (the host's own address and prefix)."""
    if "/" not in text:
        raise BadInput(f"{option} {text!r}: give the prefix length too, "
                       "e.g. 198.51.100.1/24 or 2001:db8:100::1/64")
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise BadInput(f"{option} {text!r} is not an address with a prefix length") from None
    if iface.ip.is_unspecified or iface.ip.is_multicast:
        raise BadInput(f"{option} {text!r}: not a usable interface address")
    return iface


def parse_vpn_ips(values: tuple[str, ...]) -> tuple[IPAddress | None, IPAddress | None]:
    """Repeatable ``--vpn-ip``: at most one IPv4 and one IPv6 address."""
    v4: IPAddress | None = None
    v6: IPAddress | None = None
    for text in values:
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            raise BadInput(f"--vpn-ip {text!r} is not an IP address") from None
        if addr.version == 4:
            if v4 is not None:
                raise BadInput("--vpn-ip: at most one IPv4 address (and one IPv6)")
            v4 = addr
        else:
            if v6 is not None:
                raise BadInput("--vpn-ip: at most one IPv6 address (and one IPv4)")
            v6 = addr
    return v4, v6


def parse_peer_id(value: int) -> int:
    if not 0 <= value <= MAX_PEER_ID:
        raise BadInput(f"peer id {value} is out of range: 0..{MAX_PEER_ID} (24 bits)")
    return value


def parse_key_id(value: int) -> int:
    if not 0 <= value <= MAX_KEY_ID:
        raise BadInput(f"--key-id {value} is out of range: 0..{MAX_KEY_ID}")
    return value


SLOT_NAMES = {"primary": KeySlot.PRIMARY, "secondary": KeySlot.SECONDARY,
              "0": KeySlot.PRIMARY, "1": KeySlot.SECONDARY}


def parse_slot(text: str) -> KeySlot:
    try:
        return SLOT_NAMES[text.strip().lower()]
    except KeyError:
        raise BadInput(f"--slot {text!r}: primary or secondary") from None


def parse_cipher(text: str) -> str:
    """The kernel's (case-sensitive) cipher name, accepting any case on input."""
    for name in CIPHER_KEY_SIZES:
        if name.lower() == text.strip().lower():
            return name
    raise BadInput(f"--cipher {text!r}: one of {', '.join(CIPHER_KEY_SIZES)}")


def _decode_hex(text: str) -> bytes | None:
    cleaned = re.sub(r"[\s:]", "", text)
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    if not cleaned or len(cleaned) % 2 or re.search(r"[^0-9a-fA-F]", cleaned):
        return None
    try:
        return binascii.unhexlify(cleaned)
    except binascii.Error:
        return None


def read_secret(value: str | None, option: str, size: int) -> bytes:
    """A key or IV argument of exactly ``size`` bytes.

    ``value`` is hex (spaces and colons allowed), or ``@FILE``: a file holding
    the bytes either raw or as hex text -- whichever has the right length
    (they cannot both: hex text is twice as long as its bytes).
    """
    what = "key" if option.endswith("-key") else "IV"
    if value is None:
        raise BadInput(f"{option} is required ({size}-byte {what}, hex or @FILE)")
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise BadInput(f"{option}: cannot read {path}: {exc.strerror}") from None
        if len(raw) > MAX_KEY_FILE:
            raise BadInput(f"{option}: {path} is too large to be a {what}")
        if len(raw) == size:
            return raw
        try:
            decoded = _decode_hex(raw.decode("ascii"))
        except UnicodeDecodeError:
            decoded = None
        if decoded is not None and len(decoded) == size:
            return decoded
        got = len(decoded) if decoded is not None else len(raw)
        raise BadInput(f"{option}: {path} holds {got} bytes; the {what} must be exactly "
                       f"{size} bytes (raw, or {2 * size} hex digits)")
    data = _decode_hex(value)
    if data is None:
        raise BadInput(f"{option}: not hex; give {2 * size} hex digits or @FILE")
    if len(data) != size:
        raise BadInput(f"{option}: {len(data)} bytes given; the {what} must be exactly "
                       f"{size} bytes ({2 * size} hex digits)")
    return data


def key_sizes(cipher: str) -> tuple[int, int]:
    """(key size, IV size) the kernel expects for ``cipher`` (0, 0 for none)."""
    size = CIPHER_KEY_SIZES[cipher]
    return size, (IMPLICIT_IV_SIZE if size else 0)

