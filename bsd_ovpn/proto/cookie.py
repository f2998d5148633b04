"""Stateless server session-id cookie (spec §6.3).

A 2.6 UDP server answers a client's hard reset without creating any state:
its own session id is an HMAC over the client's address and session id and
a coarse time slot.  Only when the client's next packet echoes that id back
(in the ACK's remote session id) is an instance created.  This keeps spoofed
resets from costing memory.  The HMAC input layout is private to the server
(no peer ever recomputes it), so only the slot arithmetic follows OpenVPN.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import struct

from bsd_ovpn.errors import LocalProtocolError
from bsd_ovpn.proto.fastcrypto import hmac_digest

__all__ = ["CookieJar", "COOKIE_SIZE"]

COOKIE_SIZE = 8
_SECRET_SIZE = 32


def _addr_bytes(addr: object) -> bytes:
    """Canonical bytes of a socket address tuple ``(host, port[, flowinfo, scope_id])``."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        raise LocalProtocolError(f"address must be a (host, port, ...) tuple, not {addr!r}")
    host, port = addr[0], addr[1]
    packed = _host_bytes(host) if isinstance(host, str) else _ip_bytes(host)
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"address port {port!r} is not 0..65535")
    scope = addr[3] if len(addr) >= 4 and isinstance(addr[3], int) else 0
    return packed + struct.pack(">HI", port, scope & 0xFFFFFFFF)


def _ip_bytes(host: object) -> bytes:
    """``version || packed address`` of a host; IPv4-mapped IPv6 counts as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0] if isinstance(host, str) else host)
    except ValueError:
        raise LocalProtocolError(f"address host {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped                    # same peer whichever socket family saw it
    return bytes((ip.version,)) + ip.packed


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def _host_bytes(host: str) -> bytes:
    """:func:`_ip_bytes` of a host string, via inet_pton when that is unambiguous.

    ipaddress parsing costs more than the cookie HMAC itself; a string that
    inet_pton accepts and that is already in inet_ntop's canonical form is one
    ipaddress accepts with the same value, so only other spellings (and
    ``%scope`` suffixes) take the long way.  No cache: spoofed sources must
    not grow any state.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        packed = socket.inet_pton(family, host)
    except (OSError, ValueError):              # not an address / embedded NUL
        return _ip_bytes(host)
    if socket.inet_ntop(family, packed) != host:
        return _ip_bytes(host)
    if family == socket.AF_INET:
        return b"\x04" + packed
    if packed[:12] == _MAPPED_PREFIX:
        return b"\x04" + packed[12:]
    return b"\x06" + packed


class CookieJar:
    """Makes and checks 8-byte session-id cookies; keeps no per-client state."""

    def __init__(self, secret: bytes | None = None, hand_window: int = 60) -> None:
        if secret is None:
            secret = os.urandom(_SECRET_SIZE)
        if len(secret) < 16:
            raise LocalProtocolError("cookie secret must be at least 16 bytes")
        if not isinstance(hand_window, int) or hand_window < 1:
            raise LocalProtocolError(f"hand_window must be a positive int, not {hand_window!r}")
        self._secret = bytes(secret)
        self.hand_window = hand_window
        # OpenVPN's slot length: (hand-window + 1) / 2 in integer seconds (60 -> 30 s)
        self.slot_seconds = max(1, (hand_window + 1) // 2)

    def _slot(self, now: float) -> int:
        return int(now) // self.slot_seconds

    def _cookie(self, slot: int, addr_bytes: bytes, client_sid: bytes) -> bytes:
        mac = hmac_digest(self._secret, struct.pack(">I", slot & 0xFFFFFFFF) + addr_bytes
                          + bytes(client_sid))[:COOKIE_SIZE]
        # a session id must be non-zero; remap the (2^-64) all-zero case deterministically
        return mac if any(mac) else b"\x00" * (COOKIE_SIZE - 1) + b"\x01"

    @staticmethod
    def _check_sid(client_sid: bytes) -> None:
        if not isinstance(client_sid, (bytes, bytearray)) or len(client_sid) != 8:
            raise LocalProtocolError(f"client session id must be 8 bytes, not {client_sid!r}")

    def make(self, now: float, addr: tuple, client_sid: bytes) -> bytes:
        """The server session id to put in the stateless reset for this client."""
        self._check_sid(client_sid)
        return self._cookie(self._slot(now), _addr_bytes(addr), client_sid)

    def check(self, now: float, addr: tuple, client_sid: bytes, cookie: bytes) -> bool:
        """True if ``cookie`` was made for this address and sid in the last two slots."""
        self._check_sid(client_sid)
        if not isinstance(cookie, (bytes, bytearray)) or len(cookie) != COOKIE_SIZE:
            return False
        ab = _addr_bytes(addr)
        slot = self._slot(now)
        ok = False
        for off in (0, 1, 2):  # evaluate all three: no timing hint which slot matched
            ok |= hmac.compare_digest(self._cookie(slot - off, ab, client_sid), bytes(cookie))
        return ok
