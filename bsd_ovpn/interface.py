"""The typed if_ovpn API: peers, keys, keepalive, stats and notifications.

The kernel trusts userspace with several fields (24-bit peer id, key id
0..7, key length against the cipher name, never lowering a running
keepalive to 0), and it answers with nvlists whose optional keys vary by
release.  This module is where both are made safe:

* every argument is checked *before* anything is sent, so a mistake is a
  :class:`~bsd_ovpn.errors.ValidationError` and never a corrupted tunnel;
* requests are built with exactly OpenVPN 2.6's keys, types and key order
  (the kernel ignores order, but the golden vectors prove the bytes);
* every reply is checked (presence, type, size, range) before use, and a
  bad one raises :class:`ReplyError`;
* kernel errnos become :class:`~bsd_ovpn.errors.IfOvpnError` subclasses
  whose message names the command and says what the errno means there.

It knows nothing of the OpenVPN protocol and nothing of how bytes reach the
kernel: a :class:`~bsd_ovpn.transport.Transport` does that.

A client's sequence, as OpenVPN 2.6 does it (FreeBSD, as root)::

    with Interface.create(rename_to="tun0", ifmode="p2p") as ifc:
        ifc.new_peer(peer_id, udp_sock, ("192.0.2.1", 1194))
        ifc.new_key(peer_id, KeySlot.PRIMARY, 0, "AES-256-GCM",
                    encrypt=KeyMaterial(tx_key, tx_iv), decrypt=KeyMaterial(rx_key, rx_iv))
        ifc.start_vpn()
        ifc.set_peer(peer_id, interval=10, timeout=60)
        ...
        for event in ifc.notifications():   # after each EAGAIN on udp_sock
            print(event.as_dict())
"""
from __future__ import annotations

import contextlib
import errno as _errno
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Union

from . import nv
from .errors import IfOvpnError, OvpnError, ValidationError
from .ifovpn import (
    AF_INET,
    AF_INET6,
    CIPHER_KEY_SIZES,
    GET_PKT_BUFSIZE,
    IFF_BROADCAST,
    IFF_MULTICAST,
    IFF_POINTOPOINT,
    IFMODE_P2P,
    IFMODE_SUBNET,
    IMPLICIT_IV_SIZE,
    MAX_KEY_ID,
    MAX_PEER_ID,
    MAX_REQUEST_SIZE,
    PEER_STATS_BUFSIZE,
    POLL_PKT_BUFSIZE,
    Command,
    DelReason,
    KeySlot,
    NotifType,
)
from .transport import Transport, encode_ifname, errno_error

__all__ = [
    "Interface", "Endpoint", "KeyMaterial", "InOut", "InterfaceStats", "PeerStats",
    "PeerDeleted", "RotateKey", "Float", "UnknownNotification", "Notification",
    "ReplyError", "explain_errno", "port_to_kernel", "port_from_kernel", "PipelineFailure",
]

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF
#: GET replies start at 4096 bytes and double on ENOSPC up to this (16 MiB:
#: ~130,000 peers), so a lying or runaway kernel cannot make us allocate more.
MAX_REPLY_BUFSIZE = PEER_STATS_BUFSIZE << 12
#: One notifications() call reads at most this many (the ring holds 32, but
#: new ones can arrive while we drain; the bound keeps a storm from hanging us).
MAX_NOTIFICATIONS_PER_DRAIN = 1024
_ENOTCAPABLE = getattr(_errno, "ENOTCAPABLE", None)  # FreeBSD capsicum (93); Linux has none


class ReplyError(OvpnError, ValueError):
    """A kernel (or engine) reply nvlist was malformed or out of range."""

    def __init__(self, command: Command, ifname: str | None, detail: str) -> None:
        self.command = command.name
        self.ifname = ifname
        self.detail = detail
        where = f"{command.name} on {ifname}" if ifname else command.name
        super().__init__(f"{where}: bad reply: {detail}")


# --------------------------------------------------------------------------
# Small value types
# --------------------------------------------------------------------------

def _json(value: Any) -> Any:
    if isinstance(value, (DelReason, NotifType, KeySlot)):
        return value.name
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


class _AsDict:
    """``as_dict()``: a JSON-friendly dict (enums by name, addresses as text)."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
                if f.repr}


def port_to_kernel(port: int) -> int:
    """The "port" number if_ovpn wants: the network-order port read as a host
    integer (it is stored raw into ``sin_port``): 1194 -> 43524 on amd64."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def port_from_kernel(value: int) -> int:
    """Inverse of :func:`port_to_kernel`."""
    return int.from_bytes(value.to_bytes(2, sys.byteorder), "big")


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class PipelineFailure:
    """One failed request of a :meth:`Interface.pipelined` block run with ``collect``.

    ``peer_id`` is the peer the request named, or, for an interface-wide
    command (START_VPN after a NEW_KEY), the peer of the request just before
    it: the client whose steps it completed.
    """

    command: Command
    peer_id: int | None
    error: IfOvpnError


@dataclass(frozen=True)
class Endpoint(_AsDict):
    """A transport address (IP, port, IPv6 scope) as if_ovpn's sockaddr nvlist carries it."""

    address: IPAddress
    port: int
    scope_id: int = 0

    @classmethod
    def parse(cls, value: Any, *, what: str = "address", allow_port_zero: bool = False) -> Endpoint:
        """Accept an Endpoint, ``(host, port)`` or a socket-style
        ``(host, port, flowinfo, scope_id)``; host is an IP literal (str or
        ipaddress object, ``"fe80::1%3"`` allowed).  No name resolution:
        resolve first, so the caller decides which address family is used."""
        if isinstance(value, Endpoint):
            host, port, scope = value.address, value.port, value.scope_id
        elif isinstance(value, tuple) and len(value) in (2, 4):
            host, port = value[0], value[1]
            scope = value[3] if len(value) == 4 else 0
        else:
            raise ValidationError(
                f"{what} must be a (host, port) tuple or an Endpoint, not {value!r}")
        if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            addr: IPAddress = host
        elif isinstance(host, str):
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                raise ValidationError(
                    f"{what} host {host!r} is not an IP address (resolve names first)") from None
        else:
            raise ValidationError(f"{what} host must be an IP address, not {host!r}")
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            text_scope = addr.scope_id
            addr = ipaddress.IPv6Address(addr.packed)
            if scope:
                raise ValidationError(f"{what}: scope given twice ({text_scope!r} and {scope})")
            if text_scope.isdigit():
                scope = int(text_scope)
            else:
                try:
                    scope = socket.if_nametoindex(text_scope)
                except OSError:
                    raise ValidationError(
                        f"{what}: no interface {text_scope!r} for the IPv6 scope") from None
        _check_int(port, f"{what} port", 0 if allow_port_zero else 1, 0xFFFF)
        _check_int(scope, f"{what} IPv6 scope id", 0, U32_MAX)
        if scope and isinstance(addr, ipaddress.IPv4Address):
            raise ValidationError(f"{what}: an IPv4 address has no scope id")
        return cls(addr, port, scope)

    @property
    def af(self) -> int:
        """FreeBSD's address family number (AF_INET6 is 28 there, not Linux's 10)."""
        return AF_INET if self.address.version == 4 else AF_INET6

    def to_nvlist(self) -> dict[str, Any]:
        """OpenVPN's key order: af, address, port; scopeid only when set (link-local),
        as OpenVPN master does -- 2.6 never sends it and cannot reach link-local peers."""
        out: dict[str, Any] = {"af": self.af, "address": self.address.packed,
                               "port": port_to_kernel(self.port)}
        if self.scope_id:
            out["scopeid"] = self.scope_id
        return out

    @classmethod
    def from_nvlist(cls, nvl: Any) -> Endpoint:
        """Parse the kernel's sockaddr nvlist (af, port, address[, scopeid])."""
        af = nvl.get_number("af", lo=0, hi=U32_MAX)
        if af == AF_INET:
            raw = nvl.get_binary("address", size=4)
            addr: IPAddress = ipaddress.IPv4Address(raw)
        elif af == AF_INET6:
            raw = nvl.get_binary("address", size=16)
            addr = ipaddress.IPv6Address(raw)
        else:
            raise nv.NVFieldError("af", f"{AF_INET} (AF_INET) or {AF_INET6} (AF_INET6)", str(af))
        port = port_from_kernel(nvl.get_number("port", lo=0, hi=0xFFFF))
        scope = 0
        if af == AF_INET6 and "scopeid" in nvl:
            scope = nvl.get_number("scopeid", lo=0, hi=U32_MAX)
        return cls(addr, port, scope)

    def __str__(self) -> str:
        if self.address.version == 6:
            scope = f"%{self.scope_id}" if self.scope_id else ""
            return f"[{self.address}{scope}]:{self.port}"
        return f"{self.address}:{self.port}"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": str(self.address), "port": self.port}
        if self.scope_id:
            out["scope_id"] = self.scope_id
        return out


@dataclass(frozen=True)
class KeyMaterial:
    """One direction's AEAD key and 8-byte implicit IV (hidden from repr: they are secrets)."""

    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)


@dataclass(frozen=True)
class InOut(_AsDict):
    """An ``{in, out}`` counter pair (``in_`` because ``in`` is a keyword)."""

    in_: int
    out: int

    def as_dict(self) -> dict[str, Any]:
        return {"in": self.in_, "out": self.out}


@dataclass(frozen=True)
class InterfaceStats(_AsDict):
    """OVPN_GET_STATS.  Kernel quirks kept as-is: ``tunnel.out`` and
    ``transport.out`` repeat the *received* counters, and ``ctrl`` /
    ``lost_ctrl`` are never incremented by current kernels."""

    lost_ctrl: InOut
    lost_data: InOut
    nomem_data: InOut
    data: InOut
    ctrl: InOut
    tunnel: InOut
    transport: InOut


@dataclass(frozen=True)
class PeerStats(_AsDict):
    """One peer's counters from OVPN_GET_PEER_STATS (bytes are tunnel/plaintext bytes)."""

    peer_id: int
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class PeerDeleted(_AsDict):
    """The kernel deleted a peer (DEL_PEER request, keepalive timeout, destroy).

    ``reason`` is None and the counters are None when an older kernel left
    them out; an unknown future reason is kept as its number.
    """

    peer_id: int
    reason: DelReason | int | None
    packets_in: int | None = None
    packets_out: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"type": "peer_deleted", **super().as_dict()}


@dataclass(frozen=True)
class RotateKey(_AsDict):
    """The primary key's TX counter reached 2**31: renegotiate now."""

    peer_id: int

    def as_dict(self) -> dict[str, Any]:
        return {"type": "rotate_key", **super().as_dict()}


@dataclass(frozen=True)
class Float(_AsDict):
    """An authenticated packet came from a new address; the kernel already moved the peer."""

    peer_id: int
    address: Endpoint

    def as_dict(self) -> dict[str, Any]:
        return {"type": "float", **super().as_dict()}


@dataclass(frozen=True)
class UnknownNotification(_AsDict):
    """A notification type this library does not know (a newer kernel)."""

    peer_id: int
    notification: int

    def as_dict(self) -> dict[str, Any]:
        return {"type": "unknown", **super().as_dict()}


Notification = Union[PeerDeleted, RotateKey, Float, UnknownNotification]


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------

def _check_int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise ValidationError(f"{what} {value} is out of range {lo}..{hi:#x}"
                              if hi > 0xFFFF else f"{what} {value} is out of range {lo}..{hi}")
    return int(value)


def _check_peer_id(peer_id: Any) -> int:
    return _check_int(peer_id, "peer id", 0, MAX_PEER_ID)


def _check_slot(slot: Any) -> int:
    if isinstance(slot, bool) or not isinstance(slot, int) or slot not in (0, 1):
        raise ValidationError(f"key slot must be 0 (primary) or 1 (secondary), not {slot!r}")
    return int(slot)


def _check_ifmode(mode: Any) -> int:
    if isinstance(mode, str):
        names = {"p2p": IFMODE_P2P, "subnet": IFMODE_SUBNET}
        if mode not in names:
            raise ValidationError(f"ifmode {mode!r} must be 'p2p' or 'subnet'")
        return names[mode]
    _check_int(mode, "ifmode", 0, U32_MAX)
    if mode & ~IFF_MULTICAST not in (IFF_POINTOPOINT, IFF_BROADCAST):
        raise ValidationError(
            f"ifmode {mode:#x} must be IFF_POINTOPOINT ({IFF_POINTOPOINT:#x}) or IFF_BROADCAST "
            f"({IFF_BROADCAST:#x}), optionally with IFF_MULTICAST ({IFF_MULTICAST:#x})")
    return int(mode)


def _check_fd(sock_or_fd: Any) -> int:
    """The UDP socket for NEW_PEER: a socket object or a descriptor number."""
    if isinstance(sock_or_fd, socket.socket):
        if sock_or_fd.fileno() < 0:
            raise ValidationError("the UDP socket for the peer is closed")
        if sock_or_fd.type != socket.SOCK_DGRAM or sock_or_fd.family not in (
                socket.AF_INET, socket.AF_INET6):
            raise ValidationError(
                "if_ovpn needs a UDP socket (AF_INET/AF_INET6, SOCK_DGRAM); "
                f"got family {sock_or_fd.family!r}, type {sock_or_fd.type!r}")
        return sock_or_fd.fileno()
    if hasattr(sock_or_fd, "fileno") and not isinstance(sock_or_fd, int):
        sock_or_fd = sock_or_fd.fileno()
    return _check_int(sock_or_fd, "socket fd", 0, 0x7FFFFFFF)


def _check_socket_family(sock: socket.socket, remote: Endpoint) -> None:
    """The kernel takes the local address from the socket, so its family must
    match the remote's (EINVAL otherwise); an IPv6 socket reaches IPv4 peers
    through v4-mapped addresses."""
    if sock.family == socket.AF_INET6 and remote.address.version == 4:
        raise ValidationError(
            f"remote {remote} is IPv4 but the socket is IPv6: use the v4-mapped address "
            f"::ffff:{remote.address}")
    if sock.family == socket.AF_INET and remote.address.version == 6:
        raise ValidationError(f"remote {remote} is IPv6 but the socket is IPv4")
    try:
        bound_port = sock.getsockname()[1]
    except OSError as exc:
        raise ValidationError(f"cannot read the UDP socket's address: {exc}") from None
    if bound_port == 0:
        raise ValidationError("the UDP socket is not bound: bind it first (if_ovpn needs its "
                              "local port)")


def _ip_bytes(value: Any, version: int, what: str) -> bytes:
    try:
        addr = value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) \
            else ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(f"{what} {value!r} is not an IP address") from None
    if addr.version != version:
        raise ValidationError(f"{what} must be an IPv{version} address, not {value}")
    return addr.packed


def _key_direction(cipher: str, material: KeyMaterial | None, what: str) -> dict[str, Any]:
    """One NEW_KEY direction nvlist: cipher, then key and iv (none: cipher only)."""
    size = CIPHER_KEY_SIZES[cipher]
    if size == 0:
        if material is not None:
            raise ValidationError(f"cipher 'none' takes no {what} key material")
        return {"cipher": cipher}
    if not isinstance(material, KeyMaterial):
        raise ValidationError(f"cipher {cipher} needs {what}=KeyMaterial(key, iv)")
    key, iv = material.key, material.iv
    if not isinstance(key, (bytes, bytearray)) or len(key) != size:
        got = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValidationError(f"{what} key for {cipher} must be exactly {size} bytes (got {got})")
    if not isinstance(iv, (bytes, bytearray)) or len(iv) != IMPLICIT_IV_SIZE:
        got = len(iv) if isinstance(iv, (bytes, bytearray)) else type(iv).__name__
        raise ValidationError(f"{what} iv must be exactly {IMPLICIT_IV_SIZE} bytes (got {got})")
    return {"cipher": cipher, "key": bytes(key), "iv": bytes(iv)}


# --------------------------------------------------------------------------
# Errno -> words
# --------------------------------------------------------------------------

def explain_errno(command: Command | str, err: int, *, peer_id: int | None = None,
                  fd: int | None = None, ifname: str | None = None) -> str:
    """What ``err`` means for ``command``, in words (from the kernel's check order)."""
    name = command.name if isinstance(command, Command) else str(command)
    peer = f"peer id {peer_id}" if peer_id is not None else "the peer"
    iface = f"interface {ifname}" if ifname else "the interface"
    specific: dict[tuple[str, int], str] = {
        ("OVPN_NEW_PEER", _errno.EEXIST): f"{peer} already exists",
        ("OVPN_NEW_PEER", _errno.EBUSY):
            "another socket is already attached (all peers of an interface share one socket)",
        ("OVPN_NEW_PEER", _errno.EPROTOTYPE): "the socket is not a datagram (UDP) socket",
        ("OVPN_NEW_PEER", _errno.EBADF): f"fd {fd} is not open in this process",
        ("OVPN_NEW_PEER", _errno.ENOTSOCK): f"fd {fd} is not a socket",
        ("OVPN_NEW_PEER", _errno.EINVAL):
            "rejected: bad remote/local address, socket not bound (local port 0), "
            "or local and remote address families differ",
        ("OVPN_NEW_PEER", _errno.EHOSTUNREACH): "no route to pick a local address for the remote",
        ("OVPN_NEW_PEER", _errno.EADDRNOTAVAIL): "no usable local address for the remote",
        ("OVPN_SWAP_KEYS", _errno.ENOLINK): "no key in the secondary slot",
        ("OVPN_NEW_KEY", _errno.E2BIG): "key longer than 32 bytes or iv not 8 bytes",
        ("OVPN_NEW_KEY", _errno.EINVAL):
            "rejected: invalid slot, unknown cipher or key refused by the crypto framework",
        ("OVPN_DEL_KEY", _errno.EINVAL): "rejected: invalid slot or missing field",
        ("OVPN_SET_IFMODE", _errno.EBUSY): f"{iface} is up; set the mode before START_VPN",
        ("OVPN_SET_IFMODE", _errno.EINVAL): "ifmode must be p2p (0x8010) or subnet (0x8002)",
        ("OVPN_GET_PKT", _errno.ENOENT): "no notification pending",
        ("OVPN_GET_PKT", _errno.ENOSPC):
            "reply larger than the buffer: the kernel dropped that notification",
        ("OVPN_GET_PEER_STATS", _errno.ENOTSUP):
            "this kernel has no OVPN_GET_PEER_STATS (an early FreeBSD 14)",
        ("SIOCIFCREATE2", _errno.EEXIST): f"{iface} already exists",
        ("SIOCIFCREATE2", _errno.EINVAL): "no if_ovpn cloner matches that name",
        ("SIOCSIFNAME", _errno.EEXIST): "an interface with the new name already exists",
        ("SIOCIFDESTROY", _errno.EBUSY): "crypto jobs in flight; retry",
    }
    if _ENOTCAPABLE is not None:
        specific[("OVPN_NEW_PEER", _ENOTCAPABLE)] = f"fd {fd} lacks the capability rights to connect"
    if (name, err) in specific:
        return specific[(name, err)]
    generic: dict[int, str] = {
        _errno.EPERM: "needs root (PRIV_NET_OVPN)",
        _errno.ENOENT: f"{peer} does not exist",
        _errno.E2BIG: "request larger than 4096 bytes",
        _errno.EINVAL: "rejected: missing or mistyped field, or an invalid value",
        _errno.ENOTSUP: "not supported by this kernel",
        _errno.EOPNOTSUPP: "not supported by this kernel",
        _errno.ENOSPC: "reply larger than the buffer",
        _errno.ENOMEM: "the kernel could not build the reply",
        _errno.ENXIO: f"no {iface}",
        _errno.EBUSY: f"{iface} is busy",
    }
    if err in generic:
        return generic[err]
    return os.strerror(err)


# --------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------

def default_transport() -> Transport:
    """The kernel transport (FreeBSD 14+); raises UnsupportedPlatform elsewhere."""
    from .transport import KernelTransport

    return KernelTransport()


class Interface:
    """One if_ovpn interface and the typed commands on it.

    ``Interface.create()`` clones a new interface and destroys it when the
    ``with`` block ends (the kernel would otherwise keep it, its peers and
    its socket alive forever); ``Interface.open()`` attaches to an existing
    one and leaves it alone.  ``detach()`` keeps a created interface.
    """

    def __init__(self, name: str, transport: Transport, *, owns_transport: bool = False,
                 destroy_on_exit: bool = False) -> None:
        encode_ifname(name)
        self._name = name
        self._transport = transport
        self._owns_transport = owns_transport
        self.destroy_on_exit = destroy_on_exit
        self._destroyed = False
        #: (interval, timeout) of peers configured through this object, for the
        #: "never lower a running keepalive to 0" hazard.
        self._keepalive: dict[int, tuple[int, int]] = {}
        #: requests held by :meth:`pipelined` (command, data, fd, peer id)
        self._held: list[tuple[Command, bytes | None, int | None, int | None]] | None = None
        #: where a ``pipelined(collect=...)`` block reports failures
        self._collect: list[PipelineFailure] | None = None
        #: GET buffer size that last sufficed, per command (see _query_growing)
        self._bufsize_hint: dict[Command, int] = {}

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def create(cls, name: str = "ovpn", *, rename_to: str | None = None,
               ifmode: int | str | None = None, transport: Transport | None = None) -> Interface:
        """Clone an interface ("ovpn" lets the kernel pick ovpnN), optionally
        rename it (e.g. to tun0, as OpenVPN does) and set its mode."""
        if ifmode is not None:
            ifmode = _check_ifmode(ifmode)
        own = transport is None
        tr = default_transport() if transport is None else transport
        try:
            try:
                created = tr.create_interface(name)
            except IfOvpnError as exc:
                raise _reexplain(exc, "SIOCIFCREATE2", ifname=name) from exc
            ifc = cls(created, tr, owns_transport=own, destroy_on_exit=True)
            try:
                if rename_to is not None:
                    ifc.rename(rename_to)
                if ifmode is not None:
                    ifc.set_ifmode(ifmode)
            except BaseException:
                # Best effort: the original error is the one worth reporting.
                with contextlib.suppress(OvpnError, OSError):
                    ifc._transport.destroy_interface(ifc.name)
                ifc._destroyed = True
                raise
            return ifc
        except BaseException:
            if own:
                tr.close()
            raise

    @classmethod
    def open(cls, name: str, *, transport: Transport | None = None) -> Interface:
        """Attach to an existing if_ovpn interface (checked with a harmless POLL_PKT)."""
        own = transport is None
        tr = default_transport() if transport is None else transport
        try:
            ifc = cls(name, tr, owns_transport=own, destroy_on_exit=False)
            try:
                ifc.poll()
            except IfOvpnError as exc:
                if exc.errno in (_errno.EINVAL, _errno.ENOTSUP, _errno.EOPNOTSUPP, _errno.ENOTTY):
                    raise errno_error(exc.errno, "OVPN_POLL_PKT",
                                      f"{name} is not an if_ovpn interface", name) from exc
                raise
        except BaseException:
            if own:
                tr.close()
            raise
        return ifc

    @property
    def name(self) -> str:
        return self._name

    @property
    def transport(self) -> Transport:
        return self._transport

    def rename(self, new_name: str) -> None:
        self._alive()
        try:
            self._transport.rename_interface(self._name, new_name)
        except IfOvpnError as exc:
            raise _reexplain(exc, "SIOCSIFNAME", ifname=self._name) from exc
        self._name = new_name

    def destroy(self) -> None:
        """SIOCIFDESTROY: deletes every peer, flushes notifications, releases the socket."""
        self._alive()
        try:
            self._transport.destroy_interface(self._name)
        except IfOvpnError as exc:
            raise _reexplain(exc, "SIOCIFDESTROY", ifname=self._name) from exc
        self._destroyed = True
        self._keepalive.clear()

    def detach(self) -> None:
        """Keep the interface after the ``with`` block / close()."""
        self.destroy_on_exit = False

    def close(self) -> None:
        """Destroy the interface if this object created it (and not detached),
        then close the transport if this object opened it."""
        try:
            if self.destroy_on_exit and not self._destroyed:
                self.destroy()
        finally:
            if self._owns_transport:
                self._owns_transport = False
                self._transport.close()

    def __enter__(self) -> Interface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " destroyed" if self._destroyed else ""
        return f"<Interface {self._name}{state}>"

    def _alive(self) -> None:
        if self._destroyed:
            raise ValidationError(f"interface {self._name} was destroyed")

    # -- plumbing --------------------------------------------------------------
    def _send(self, command: Command, nvl: Mapping[str, Any] | None, *,
              fd: int | None = None, peer_id: int | None = None) -> None:
        self._alive()
        data = None
        if nvl is not None:
            data = nv.pack(nvl, allow_descriptors=False)
            if len(data) > MAX_REQUEST_SIZE:
                raise ValidationError(
                    f"{command.name} request is {len(data)} bytes; if_ovpn accepts at most "
                    f"{MAX_REQUEST_SIZE}")
        if self._held is not None:
            self._held.append((command, data, fd, peer_id))
            return
        try:
            self._transport.request(self._name, command, data, fd=fd)
        except IfOvpnError as exc:
            raise _reexplain(exc, command, ifname=self._name, peer_id=peer_id, fd=fd) from exc

    @contextlib.contextmanager
    def pipelined(self, collect: list[PipelineFailure] | None = None) -> Iterator[None]:
        """Send the SET requests made inside the block together when it ends.

        Over the userspace engine every request is a round trip to another
        process; a new client's NEW_PEER, SET_PEER, NEW_KEY and START_VPN then
        cost one round trip instead of four, and a server that wraps all the
        clients it advanced in one go in a block pays one round trip for all
        of them.  The kernel transport has no ``request_many`` and runs them
        one by one, exactly as without the block.  Every held request is
        sent, in order, even after one failed (as independent ioctls would
        be); the first failure is then raised, named after its own command --
        or, with ``collect``, every failure is appended to it as a
        :class:`PipelineFailure` and nothing is raised (a server needs to know
        each client to drop, not only the first).  A query inside the block
        sends what is held first.  A block inside another joins it.
        """
        if self._held is not None:
            yield                                   # joins the enclosing block
            return
        self._held = []
        self._collect = collect
        try:
            yield
        except BaseException:
            self._flush_held(raise_errors=False)   # keep the kernel in step with our books
            raise
        self._flush_held(raise_errors=True)

    def _flush_held(self, *, raise_errors: bool, reopen: bool = False) -> None:
        held = self._held or []
        collect = self._collect
        self._held = [] if reopen else None
        if not reopen:
            self._collect = None
        if not held:
            return
        many = getattr(self._transport, "request_many", None)
        if many is not None:
            errors = many(self._name, [(c, d, f) for c, d, f, _ in held])
        else:
            errors = []
            for c, d, f, _ in held:
                try:
                    self._transport.request(self._name, c, d, fd=f)
                    errors.append(None)
                except IfOvpnError as exc:
                    errors.append(exc)
        owner = None
        for (command, _d, fd, peer_id), exc in zip(held, errors):
            if peer_id is not None:
                owner = peer_id
            if exc is None:
                continue
            err = _reexplain(exc, command, ifname=self._name, peer_id=peer_id, fd=fd)
            err.__cause__ = exc
            if collect is not None:
                collect.append(PipelineFailure(command, owner, err))
            elif raise_errors:
                raise err

    def _query(self, command: Command, bufsize: int) -> bytes:
        self._alive()
        if self._held:
            self._flush_held(raise_errors=True, reopen=True)
        try:
            return self._transport.query(self._name, command, bufsize)
        except IfOvpnError as exc:
            raise _reexplain(exc, command, ifname=self._name) from exc

    def _query_growing(self, command: Command) -> bytes:
        """GET with a buffer doubling from 4096 on ENOSPC (the kernel never says
        how much it needs), bounded by MAX_REPLY_BUFSIZE.

        The next call starts at the size that last sufficed: each ENOSPC means
        the whole reply was built for nothing, and with 1000 peers starting at
        4096 every time cost seven refusals per GET_PEER_STATS.
        """
        bufsize = self._bufsize_hint.get(command, PEER_STATS_BUFSIZE)
        while True:
            try:
                data = self._query(command, bufsize)
            except IfOvpnError as exc:
                if exc.errno != _errno.ENOSPC:
                    raise
                if bufsize >= MAX_REPLY_BUFSIZE:
                    raise errno_error(_errno.ENOSPC, command.name,
                                      f"reply still larger than {MAX_REPLY_BUFSIZE} bytes",
                                      self._name) from exc
                bufsize *= 2
                continue
            # shrink again (by halves) when replies got much smaller, e.g. peers left
            while bufsize > PEER_STATS_BUFSIZE and len(data) * 4 < bufsize:
                bufsize //= 2
            self._bufsize_hint[command] = bufsize
            return data

    def _unpack(self, command: Command, data: bytes) -> Any:
        try:
            return nv.unpack(data)
        except nv.NVError as exc:
            raise ReplyError(command, self._name, f"not a valid nvlist: {exc}") from exc

    # -- SET commands ----------------------------------------------------------
    def set_ifmode(self, mode: int | str) -> None:
        """OVPN_SET_IFMODE: "p2p" (0x8010, the default) or "subnet" (0x8002, servers).
        Only possible before start_vpn() (EBUSY once up)."""
        mode = _check_ifmode(mode)
        self._send(Command.OVPN_SET_IFMODE, {"ifmode": mode})

    def new_peer(self, peer_id: int, sock_or_fd: Any, remote: Any, local: Any = None,
                 vpn_ipv4: Any = None, vpn_ipv6: Any = None) -> None:
        """OVPN_NEW_PEER: hook the (bound) UDP socket and add a peer.

        ``remote``/``local`` are ``(host, port)`` tuples or Endpoints; IPv4,
        IPv6 and v4-mapped IPv6 (for dual-stack sockets) are sent as given.
        ``local`` with port 0 lets the kernel use the socket's bound port.
        ``vpn_ipv4``/``vpn_ipv6`` are the peer's tunnel addresses, which a
        multi-peer server needs to route to it.
        """
        peer_id = _check_peer_id(peer_id)
        fd = _check_fd(sock_or_fd)
        remote_ep = Endpoint.parse(remote, what="remote")
        local_ep = None
        if local is not None:
            local_ep = Endpoint.parse(local, what="local", allow_port_zero=True)
            if local_ep.af != remote_ep.af:
                raise ValidationError(
                    f"local {local_ep} and remote {remote_ep} are of different address families")
        if isinstance(sock_or_fd, socket.socket):
            _check_socket_family(sock_or_fd, remote_ep)
        v4 = _ip_bytes(vpn_ipv4, 4, "vpn_ipv4") if vpn_ipv4 is not None else None
        v6 = _ip_bytes(vpn_ipv6, 6, "vpn_ipv6") if vpn_ipv6 is not None else None
        # OpenVPN 2.6's order: local, remote, vpn_ipv4, vpn_ipv6, fd, peerid.
        nvl: dict[str, Any] = {}
        if local_ep is not None:
            nvl["local"] = local_ep.to_nvlist()
        nvl["remote"] = remote_ep.to_nvlist()
        if v4 is not None:
            nvl["vpn_ipv4"] = v4
        if v6 is not None:
            nvl["vpn_ipv6"] = v6
        nvl["fd"] = fd
        nvl["peerid"] = peer_id
        self._send(Command.OVPN_NEW_PEER, nvl, fd=fd, peer_id=peer_id)
        self._keepalive[peer_id] = (0, 0)

    def del_peer(self, peer_id: int) -> None:
        """OVPN_DEL_PEER (queues a DEL_PEER notification, reason REQUESTED)."""
        peer_id = _check_peer_id(peer_id)
        self._send(Command.OVPN_DEL_PEER, {"peerid": peer_id}, peer_id=peer_id)
        self._keepalive.pop(peer_id, None)

    def set_peer(self, peer_id: int, interval: int, timeout: int) -> None:
        """OVPN_SET_PEER: kernel keepalive (ping every ``interval`` s, delete the
        peer after ``timeout`` s without an authenticated data packet; 0 = off).

        A running keepalive cannot be lowered to 0: the kernel would spin
        (interval) or delete the peer at once (timeout).  Delete and re-add
        the peer instead.
        """
        peer_id = _check_peer_id(peer_id)
        interval = _check_int(interval, "keepalive interval", 0, U32_MAX)
        timeout = _check_int(timeout, "keepalive timeout", 0, U32_MAX)
        old_interval, old_timeout = self._keepalive.get(peer_id, (0, 0))
        for what, old, new in (("interval", old_interval, interval),
                               ("timeout", old_timeout, timeout)):
            if old > 0 and new == 0:
                raise ValidationError(
                    f"peer id {peer_id}: refusing to lower the running keepalive {what} "
                    f"from {old} to 0 (the kernel would {'spin' if what == 'interval' else 'delete the peer'}); "
                    "delete and re-add the peer instead")
        self._send(Command.OVPN_SET_PEER,
                   {"peerid": peer_id, "interval": interval, "timeout": timeout}, peer_id=peer_id)
        if peer_id in self._keepalive:
            self._keepalive[peer_id] = (interval, timeout)

    def new_key(self, peer_id: int, slot: int, key_id: int, cipher: str,
                encrypt: KeyMaterial | None = None, decrypt: KeyMaterial | None = None) -> None:
        """OVPN_NEW_KEY: install a key pair in ``slot`` (replacing what was there).

        The kernel does not match the key length to the cipher name or check
        the key id; both are enforced here.  Follow with start_vpn(), as
        OpenVPN does.
        """
        peer_id = _check_peer_id(peer_id)
        slot = _check_slot(slot)
        key_id = _check_int(key_id, "key id", 0, MAX_KEY_ID)
        if not isinstance(cipher, str) or cipher not in CIPHER_KEY_SIZES:
            raise ValidationError(
                f"cipher {cipher!r} is not one of if_ovpn's (case-sensitive): "
                + ", ".join(CIPHER_KEY_SIZES))
        nvl = {
            "slot": slot,
            "keyid": key_id,
            "peerid": peer_id,
            "encrypt": _key_direction(cipher, encrypt, "encrypt"),
            "decrypt": _key_direction(cipher, decrypt, "decrypt"),
        }
        self._send(Command.OVPN_NEW_KEY, nvl, peer_id=peer_id)

    def swap_keys(self, peer_id: int) -> None:
        """OVPN_SWAP_KEYS: the secondary key becomes primary (TX always uses slot 0)."""
        peer_id = _check_peer_id(peer_id)
        self._send(Command.OVPN_SWAP_KEYS, {"peerid": peer_id}, peer_id=peer_id)

    def del_key(self, peer_id: int, slot: int) -> None:
        """OVPN_DEL_KEY: free one slot (freeing an empty slot succeeds)."""
        peer_id = _check_peer_id(peer_id)
        slot = _check_slot(slot)
        self._send(Command.OVPN_DEL_KEY, {"slot": slot, "peerid": peer_id}, peer_id=peer_id)

    def start_vpn(self) -> None:
        """OVPN_START_VPN (no nvlist): interface up and link up; TX is dropped until then."""
        self._send(Command.OVPN_START_VPN, None)

    # -- GET commands ------------------------------------------------------------
    def stats(self) -> InterfaceStats:
        """OVPN_GET_STATS: interface-wide counters."""
        cmd = Command.OVPN_GET_STATS
        nvl = self._unpack(cmd, self._query_growing(cmd))
        try:
            return InterfaceStats(**{f.name: _inout(nvl, f.name) for f in fields(InterfaceStats)})
        except nv.NVError as exc:
            raise ReplyError(cmd, self._name, str(exc)) from exc

    def peer_stats(self) -> dict[int, PeerStats]:
        """OVPN_GET_PEER_STATS: counters per peer id ({} with no peers)."""
        cmd = Command.OVPN_GET_PEER_STATS
        nvl = self._unpack(cmd, self._query_growing(cmd))
        out: dict[int, PeerStats] = {}
        try:
            if "peers" not in nvl:
                return out
            for elem in nvl.get_nvlist_array("peers"):
                peer_id = elem.get_number("peerid", lo=0, hi=U32_MAX)
                packets, nbytes = _inout(elem, "packets"), _inout(elem, "bytes")
                if peer_id in out:
                    raise ReplyError(cmd, self._name, f"peer id {peer_id} listed twice")
                out[peer_id] = PeerStats(peer_id, packets.in_, packets.out,
                                         nbytes.in_, nbytes.out)
        except nv.NVError as exc:
            raise ReplyError(cmd, self._name, str(exc)) from exc
        return out

    def poll(self) -> int:
        """OVPN_POLL_PKT: how many notifications are queued."""
        cmd = Command.OVPN_POLL_PKT
        nvl = self._unpack(cmd, self._query(cmd, POLL_PKT_BUFSIZE))
        try:
            return nvl.get_number("pending", lo=0, hi=U32_MAX)
        except nv.NVError as exc:
            raise ReplyError(cmd, self._name, str(exc)) from exc

    def iter_notifications(self, limit: int = MAX_NOTIFICATIONS_PER_DRAIN) -> Iterator[Notification]:
        """Dequeue notifications one GET_PKT at a time until the queue is empty
        (ENOENT) or ``limit`` were read.  The buffer is always 4096 bytes: an
        ENOSPC on GET_PKT would lose the notification in the kernel."""
        cmd = Command.OVPN_GET_PKT
        for _ in range(limit):
            try:
                data = self._query(cmd, GET_PKT_BUFSIZE)
            except IfOvpnError as exc:
                if exc.errno == _errno.ENOENT:
                    return
                raise
            event = self._parse_notification(self._unpack(cmd, data))
            if isinstance(event, PeerDeleted):
                self._keepalive.pop(event.peer_id, None)
            yield event

    def notifications(self, limit: int = MAX_NOTIFICATIONS_PER_DRAIN) -> list[Notification]:
        """Drain the notification queue into a list (see iter_notifications)."""
        return list(self.iter_notifications(limit))

    def _parse_notification(self, nvl: Any) -> Notification:
        cmd = Command.OVPN_GET_PKT
        try:
            peer_id = nvl.get_number("peerid", lo=0, hi=U32_MAX)
            kind = nvl.get_number("notification", lo=0, hi=U32_MAX)
            if kind == NotifType.DEL_PEER:
                reason: DelReason | int | None = None
                if "del_reason" in nvl:
                    raw = nvl.get_number("del_reason", lo=0, hi=U32_MAX)
                    reason = DelReason(raw) if raw in DelReason._value2member_map_ else raw
                packets = _inout(nvl, "packets") if "packets" in nvl else None
                nbytes = _inout(nvl, "bytes") if "bytes" in nvl else None
                return PeerDeleted(
                    peer_id, reason,
                    packets.in_ if packets else None, packets.out if packets else None,
                    nbytes.in_ if nbytes else None, nbytes.out if nbytes else None)
            if kind == NotifType.ROTATE_KEY:
                return RotateKey(peer_id)
            if kind == NotifType.FLOAT:
                return Float(peer_id, Endpoint.from_nvlist(nvl.get_nvlist("address")))
            return UnknownNotification(peer_id, kind)
        except nv.NVError as exc:
            raise ReplyError(cmd, self._name, str(exc)) from exc


def _inout(nvl: Any, name: str) -> InOut:
    sub = nvl.get_nvlist(name)
    return InOut(sub.get_number("in", lo=0, hi=U64_MAX), sub.get_number("out", lo=0, hi=U64_MAX))


def _reexplain(exc: IfOvpnError, command: Command | str, *, ifname: str | None = None,
               peer_id: int | None = None, fd: int | None = None) -> IfOvpnError:
    """The same errno and exception class, with a cause that fits the command."""
    err = exc.errno if exc.errno is not None else _errno.EIO
    name = command.name if isinstance(command, Command) else command
    cause = explain_errno(command, err, peer_id=peer_id, fd=fd, ifname=ifname)
    return errno_error(err, name, cause, ifname or exc.ifname)
