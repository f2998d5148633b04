"""The if_ovpn command set as a userspace state machine (sans-IO).

:class:`Engine` answers the same packed nvlists with the same errnos, checked
in the same order, as FreeBSD's ``sys/net/if_ovpn.c`` (spec if_ovpn.md §1-§10),
so the typed API drives it unchanged.  It does no I/O of its own: sockets,
tun devices and routes go through a :class:`Host` (``daemon.LinuxHost`` in
production, a small fake in unit tests), packets through a
:class:`~bsd_ovpn.engine.dataplane.DataPlane`, and time comes from a clock
(``time.monotonic``) so keepalives can be driven by :meth:`Engine.tick`.

Check order, per request (first failure wins):

* unknown interface: ENXIO (ifioctl fails before the driver sees anything);
* SET: more than 4096 bytes: E2BIG; the nvlist does not unpack with flags 0:
  EINVAL; a command that is not a SET command (GET commands, 9 = SEND_PKT,
  anything unknown): ENOTSUP; then the command's own checks (below);
* GET: a command that is not a GET command: ENOTSUP; reply larger than
  ``bufsize``: ENOSPC (for GET_PKT the notification is already dequeued and
  is lost, as in the kernel).

The socket follows ovpn_rele_so: every peer holds a reference, and when the
last peer is deleted (DEL_PEER, timeout) the socket is unhooked and
forgotten, so the next NEW_PEER may bring any socket.  (The shared spec's
DEL_PEER section says the socket stays hooked; the kernel source and
dco-freebsd-openvpn.md §3.6 say it is released, and the engine follows the
source.)

Numbers are truncated the way the kernel's C variables truncate them: slot
and ifmode to 32 bits (``int``), peer ids looked up as ``uint32``, keepalive
values to ``uint32``; the port field to 16 bits and read as network order.

Where the engine deliberately differs from the kernel:

* NEW_PEER ``peerid`` > 0xFFFFFF and NEW_KEY ``keyid`` > 7 or ``peerid`` >
  0xFFFFFF are EINVAL.  The kernel stores them and corrupts the opcode word
  on the wire; the engine refuses.  (NEW_PEER checks it right after the
  peerid/fd/remote presence checks, NEW_KEY after the slot check.)
* NEW_KEY whose encrypt and decrypt use different cipher families (none /
  GCM / ChaCha) is EINVAL: data planes hold one cipher per key.  AES names
  with a different key length behave as in the kernel (the length wins).
* NEW_PEER's socket must be a UDP/IP socket bound with SO_REUSEPORT (the
  engine joins its port, see :mod:`.steering`); a non-IP datagram socket is
  EPROTOTYPE, a socket without SO_REUSEPORT EADDRINUSE (at the step where the
  kernel hooks the socket).
* SET_PEER with interval 0 stops a running ping timer (the kernel would
  re-arm it with 0 ticks: a tight loop).  A timeout lowered to 0 deletes the
  peer when the armed timer fires, as in the kernel.
* Replay protection is on by default (``net.link.openvpn.replay_protection``
  defaults to 0 in the kernel).
* Data path (see :mod:`.dataplane`): "transport in" counts only the
  datagrams steered to the engine (the kernel counts every datagram on the
  socket); past 2**32-1 TX packets a key stays refused (the kernel resets the
  counter and reuses a nonce); P_DATA_V2 for an unknown peer id that
  shares a 64-id block with a known one (the steering program works on
  whole blocks, so that it changes once per 64 new peers, not per peer) is
  dropped by the engine (lost_data) instead of reaching the control plane,
  and so is every unknown id when the blocks form more than
  ``steering.MAX_TREE_RUNS`` (681) runs and the steering falls back to the
  opcode alone (see :mod:`.steering`).
* Notifications cannot wake the control plane's socket (the kernel sets
  ``so_error = EAGAIN`` on it); controllers poll POLL_PKT/GET_PKT, which
  OpenVPN and bsd_ovpn's daemons do anyway.
"""
from __future__ import annotations

import errno as E
import heapq
import ipaddress
import itertools
import os
import socket
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from bsd_ovpn import nv
from bsd_ovpn.engine.dataplane import DataPlane, PeerCounters
from bsd_ovpn.engine.steering import PeerIdSet
from bsd_ovpn.ifovpn import (
    AF_INET, AF_INET6, CIPHER_KEY_SIZES, GET_COMMANDS, IFF_BROADCAST, IFF_MULTICAST,
    IFF_POINTOPOINT, IFMODE_P2P, IMPLICIT_IV_SIZE, INTERFACE_PREFIX, MAX_KEY_ID, MAX_KEY_SIZE,
    MAX_PEER_ID, MAX_REQUEST_SIZE, NOTIFICATION_QUEUE_LEN, SET_COMMANDS, Command, DelReason,
    NotifType,
)

U32 = 0xFFFFFFFF
IFNAMSIZ = 16

#: (kernel af, raw address bytes, port in host order, scope id)
KAddr = tuple


class CommandError(Exception):
    """Internal: a command check failed with this errno (never leaves the module)."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


@dataclass(frozen=True)
class SocketInfo:
    """What NEW_PEER learns from the passed fd (the kernel's getsock + sosockaddr)."""

    ident: tuple[int, int]          # (st_dev, st_ino): the same socket through any fd
    sock_type: int                  # socket.SOCK_DGRAM, ...
    family: int                     # socket.AF_INET / AF_INET6 / other
    local: KAddr | None             # bound address (port 0 if unbound); None: not IP


def inspect_socket(fd: int) -> SocketInfo:
    """Look at a socket fd without taking it over (raises OSError EBADF/ENOTSOCK)."""
    st = os.fstat(fd)
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(E.ENOTSOCK, "not a socket")
    sock = socket.socket(fileno=os.dup(fd))
    try:
        local: KAddr | None = None
        if sock.family == socket.AF_INET:
            name = sock.getsockname()
            local = (AF_INET, socket.inet_aton(name[0]), name[1], 0)
        elif sock.family == socket.AF_INET6:
            name = sock.getsockname()
            local = (AF_INET6, ipaddress.ip_address(name[0].split("%", 1)[0]).packed,
                     name[1], name[3])
        return SocketInfo((st.st_dev, st.st_ino), sock.type, sock.family, local)
    finally:
        sock.close()


class Host(Protocol):
    """The engine's I/O edge: tun devices, sockets, routes (``daemon.LinuxHost``)."""

    def inspect_socket(self, fd: int) -> SocketInfo: ...
    def select_source(self, remote: KAddr) -> bytes: ...
    def create_link(self, name: str) -> str: ...
    def destroy_link(self, name: str) -> None: ...
    def rename_link(self, name: str, new_name: str) -> None: ...
    def set_link_up(self, name: str) -> None: ...
    def link_is_up(self, name: str) -> bool: ...
    def link_exists(self, name: str) -> bool: ...
    def make_dataplane(self, name: str) -> DataPlane: ...
    def hook_socket(self, name: str, fd: int, dataplane: DataPlane) -> None: ...
    def unhook_socket(self, name: str, dataplane: DataPlane) -> None: ...
    def set_steering(self, name: str, peer_ids: PeerIdSet) -> None: ...
    def gateway_routes(self, name: str) -> list: ...


@dataclass
class Notification:
    type: NotifType
    peer_id: int
    del_reason: DelReason = DelReason.REQUESTED
    counters: PeerCounters | None = None
    address: KAddr | None = None


@dataclass
class PeerState:
    peer_id: int
    remote: KAddr
    local: KAddr
    vpn4: bytes
    vpn6: bytes
    key_ids: list[int] = field(default_factory=lambda: [0, 0])
    key_installed: list[bool] = field(default_factory=lambda: [False, False])
    interval: int = 0
    timeout: int = 0
    next_ping: float | None = None
    timeout_at: float | None = None
    #: creation order: due timers of several peers run in this order, as the
    #: former walk over ``peers`` (a dict, so creation order) did
    seq: int = 0
    #: push numbers of the live timer-heap entries for next_ping / timeout_at
    ping_entry: int = -1
    timeout_entry: int = -1


@dataclass
class IfState:
    name: str
    dataplane: DataPlane
    flags: int = IFMODE_P2P
    up: bool = False
    socket: SocketInfo | None = None
    peers: dict[int, PeerState] = field(default_factory=dict)
    ring: deque = field(default_factory=deque)
    routes: list = field(default_factory=list)
    #: the peer ids as runs, kept in step with ``peers`` for the steering program
    steer: PeerIdSet = field(default_factory=PeerIdSet)
    #: keepalive deadlines: a heap of (time, push number, PeerState).  Entries
    #: are never removed in place; one is stale (skipped when popped) unless
    #: its peer is still in ``peers`` and its push number is still that peer's
    #: ping_entry or timeout_entry.  Every live deadline has a live entry.
    timers: list = field(default_factory=list)

    def notify(self, n: Notification) -> bool:
        """Queue a notification; a full ring drops the new one (buf_ring_enqueue)."""
        if len(self.ring) >= NOTIFICATION_QUEUE_LEN:
            return False
        self.ring.append(n)
        return True


# ---------------------------------------------------------------------------
# nvlist helpers: the kernel's lookups by (name, type)
# ---------------------------------------------------------------------------

# plain ints: NVList.get_typed converts an NVType member with int() on every call
_NUMBER, _STRING, _NVLIST, _BINARY = (int(nv.NVType.NUMBER), int(nv.NVType.STRING),
                                       int(nv.NVType.NVLIST), int(nv.NVType.BINARY))


def _find(nvl: nv.NVList, name: str, nvtype: int) -> Any:
    """nvlist_find: the first value of pair (name, type), or None.

    One lookup where ``has_X`` + ``get_X`` take two (requests are parsed on
    every command, so this is on the per-peer path).
    """
    try:
        return nvl.get_typed(name, nvtype)
    except nv.NVFieldError:
        return None


def _number(nvl: nv.NVList, name: str) -> int:
    value = _find(nvl, name, _NUMBER)
    if value is None:
        raise CommandError(E.EINVAL)
    return value


def _c_int(value: int) -> int:
    """``int x = nvlist_get_number(...)``: the low 32 bits, signed."""
    value &= U32
    return value - (1 << 32) if value & 0x80000000 else value


def parse_sockaddr(nvl: nv.NVList) -> KAddr:
    """ovpn_nvlist_to_sockaddr: af/address/port required, af 2 or 28, exact length."""
    af = _find(nvl, "af", _NUMBER)
    addr = _find(nvl, "address", _BINARY)
    raw_port = _find(nvl, "port", _NUMBER)
    if af is None or addr is None or raw_port is None:
        raise CommandError(E.EINVAL)
    af = _c_int(af)
    addr = bytes(addr)
    raw_port &= 0xFFFF
    port = socket.ntohs(raw_port)                     # stored raw into sin_port
    if af == AF_INET:
        if len(addr) != 4:
            raise CommandError(E.EINVAL)
        return (AF_INET, addr, port, 0)
    if af == AF_INET6:
        if len(addr) != 16:
            raise CommandError(E.EINVAL)
        scope = nvl.get_number("scopeid") & U32 if nvl.has_number("scopeid") else 0
        return (AF_INET6, addr, port, scope)
    raise CommandError(E.EINVAL)


def sockaddr_nvlist(a: KAddr) -> nv.NVList:
    """ovpn_add_sockaddr: af, port (raw network order), address, and scopeid for v6."""
    out = nv.NVList()
    out.add("af", a[0])
    out.add("port", socket.htons(a[2]))
    out.add("address", bytes(a[1]))
    if a[0] == AF_INET6:
        out.add("scopeid", a[3])
    return out


def kaddr_to_sockaddr(a: KAddr) -> tuple:
    """Kernel address -> Python sockaddr tuple (what data planes take)."""
    if a[0] == AF_INET:
        return (socket.inet_ntop(socket.AF_INET, a[1]), a[2])   # = str(IPv4Address), faster
    return (str(ipaddress.IPv6Address(a[1])), a[2], 0, a[3])


def sockaddr_to_kaddr(sa: tuple) -> KAddr:
    ip = ipaddress.ip_address(sa[0].split("%", 1)[0])
    if ip.version == 4:
        return (AF_INET, ip.packed, sa[1], 0)
    return (AF_INET6, ip.packed, sa[1], sa[3] if len(sa) > 3 else 0)


def _counters(inn: int, out: int) -> dict:
    """``{in, out}`` as a reply sub-list (a dict: nv.pack packs any mapping)."""
    return {"in": inn, "out": out}


_CIPHER_FAMILY = {"none": "none", "AES-128-GCM": "gcm", "AES-192-GCM": "gcm",
                  "AES-256-GCM": "gcm", "CHACHA20-POLY1305": "chacha"}


def parse_key_dir(nvl: nv.NVList) -> tuple[str, bytes, bytes]:
    """ovpn_create_kkey_dir's checks: (cipher, key, iv) or CommandError."""
    cipher = _find(nvl, "cipher", _STRING)
    if cipher is None or cipher not in CIPHER_KEY_SIZES:
        raise CommandError(E.EINVAL)
    if cipher == "none":
        return cipher, b"", b""
    key = _find(nvl, "key", _BINARY)
    if key is None:
        raise CommandError(E.EINVAL)
    key = bytes(key)
    if len(key) > MAX_KEY_SIZE:
        raise CommandError(E.E2BIG)
    iv = _find(nvl, "iv", _BINARY)
    if iv is None:
        raise CommandError(E.EINVAL)
    iv = bytes(iv)
    if len(iv) != IMPLICIT_IV_SIZE:
        raise CommandError(E.E2BIG)
    # crypto_newsession: GCM takes 16/24/32-byte keys, ChaCha20-Poly1305 32.
    valid = (32,) if cipher == "CHACHA20-POLY1305" else (16, 24, 32)
    if len(key) not in valid:
        raise CommandError(E.EINVAL)
    return cipher, key, iv


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------

class Engine:
    """Every if_ovpn interface of one engine daemon, and their command handlers."""

    def __init__(self, host: Host, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.clock = clock
        self.interfaces: dict[str, IfState] = {}
        self.replay_protection = True
        self._peer_seq = itertools.count()
        self._push_seq = itertools.count()

    # -- cloner ------------------------------------------------------------
    def create_interface(self, name: str = INTERFACE_PREFIX) -> tuple[int, str]:
        """SIOCIFCREATE2: (0, name) or (errno, "").  Names must start with "ovpn"."""
        if not name.startswith(INTERFACE_PREFIX) or len(name.encode()) >= IFNAMSIZ \
                or "/" in name or any(c.isspace() for c in name):
            return E.EINVAL, ""
        if name in self.interfaces:
            return E.EEXIST, ""
        if name[len(INTERFACE_PREFIX):].rstrip("0123456789") == name[len(INTERFACE_PREFIX):]:
            # no unit given: the kernel appends the first free unit number
            unit = 0
            while f"{name}{unit}" in self.interfaces or self._host_has(f"{name}{unit}"):
                unit += 1
            name = f"{name}{unit}"
            if len(name.encode()) >= IFNAMSIZ:
                return E.ENOSPC, ""
        try:
            real = self.host.create_link(name)
        except OSError as exc:
            return exc.errno or E.EIO, ""
        dp = self.host.make_dataplane(real)
        dp.replay_protection = self.replay_protection
        dp.set_running(False)
        self.interfaces[real] = IfState(real, dp)
        return 0, real

    def _host_has(self, name: str) -> bool:
        return self.host.link_exists(name)

    def destroy_interface(self, name: str) -> int:
        """SIOCIFDESTROY: peers deleted (notifications flushed), socket released."""
        ifs = self.interfaces.get(name)
        if ifs is None:
            return E.ENXIO
        for peer_id in sorted(ifs.peers):
            self._delete_peer(ifs, peer_id, DelReason.REQUESTED)
        ifs.ring.clear()
        ifs.timers.clear()
        if ifs.socket is not None:
            self.host.unhook_socket(name, ifs.dataplane)
            ifs.socket = None
        ifs.dataplane.detach()
        close = getattr(ifs.dataplane, "close", None)     # the C data plane frees its engine
        if close is not None:
            close()
        del self.interfaces[name]
        self.host.destroy_link(name)
        return 0

    def rename_interface(self, name: str, new_name: str) -> int:
        """SIOCSIFNAME (any new name, as the kernel allows: OpenVPN renames to tun0)."""
        ifs = self.interfaces.get(name)
        if ifs is None:
            return E.ENXIO
        if not new_name or len(new_name.encode()) >= IFNAMSIZ or "/" in new_name:
            return E.EINVAL
        if new_name in self.interfaces or (new_name != name and self._host_has(new_name)):
            return E.EEXIST
        try:
            self.host.rename_link(name, new_name)
        except OSError as exc:
            return exc.errno or E.EIO
        del self.interfaces[name]
        ifs.name = new_name
        self.interfaces[new_name] = ifs
        return 0

    def list_interfaces(self) -> list[str]:
        return sorted(self.interfaces)

    def close(self) -> None:
        for name in list(self.interfaces):
            self.destroy_interface(name)

    # -- SIOCSDRVSPEC ------------------------------------------------------
    def handle_set(self, ifname: str, cmd: int, data: bytes | None, fd: int | None = None) -> int:
        """One SET request; returns 0 or the kernel's errno."""
        ifs = self.interfaces.get(ifname)
        if ifs is None:
            return E.ENXIO
        err, nvl = self._parse_set(cmd, data)
        if err:
            return err
        self.sync(ifs)
        return self._run_set(ifs, cmd, nvl, fd)

    def handle_set_many(self, ifname: str,
                        requests: list[tuple[int, bytes | None, int | None]],
                        on_crash: Callable[[int, Exception], int] | None = None) -> list[int]:
        """Several SET requests on one interface, in order: each one's errno.

        Each request runs exactly as :meth:`handle_set` would run it, a
        failure not stopping the ones after it, except that data-plane events
        and due timers are processed once, before the first request that
        gets that far, instead of before each: the batch is one instant on
        the engine's clock (its requests arrived together).  ``on_crash``
        turns an unexpected exception of one request into its errno (the
        daemon logs it and answers EIO); without it the exception propagates.
        """
        ifs = self.interfaces.get(ifname)
        if ifs is None:
            return [E.ENXIO] * len(requests)
        out = []
        synced = False
        for cmd, data, fd in requests:
            try:
                err, nvl = self._parse_set(cmd, data)
                if not err:
                    if not synced:
                        self.sync(ifs)
                        synced = True
                    err = self._run_set(ifs, cmd, nvl, fd)
            except Exception as exc:
                if on_crash is None:
                    raise
                err = on_crash(cmd, exc)
            out.append(err)
        return out

    def _parse_set(self, cmd: int, data: bytes | None) -> tuple[int, nv.NVList | None]:
        """A SET request's checks before its command runs: (errno or 0, nvlist)."""
        nvl: nv.NVList | None = None
        if data:
            if len(data) > MAX_REQUEST_SIZE:
                return E.E2BIG, None
            try:
                nvl = nv.unpack(data, flags=0, nfds=0)
            except nv.NVError:
                return E.EINVAL, None
        if cmd not in self._SET:
            return E.ENOTSUP, None
        return 0, nvl

    def _run_set(self, ifs: IfState, cmd: int, nvl: nv.NVList | None, fd: int | None) -> int:
        """The command's own checks and effect: 0 or its errno."""
        try:
            if cmd == Command.OVPN_NEW_PEER:
                self._new_peer(ifs, nvl, fd)
            else:
                self._SET[cmd](self, ifs, nvl)
        except CommandError as exc:
            return exc.errno
        return 0

    def _new_peer(self, ifs: IfState, nvl: nv.NVList | None, fd: int | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        peer_id = _number(nvl, "peerid")
        _number(nvl, "fd")
        remote_nvl = _find(nvl, "remote", _NVLIST)
        if remote_nvl is None:
            raise CommandError(E.EINVAL)
        if peer_id > MAX_PEER_ID:
            raise CommandError(E.EINVAL)            # engine: the kernel does not check
        remote = parse_sockaddr(remote_nvl)
        # getsock(): the descriptor that came with the request (SCM_RIGHTS)
        if fd is None:
            raise CommandError(E.EBADF)
        try:
            info = self.host.inspect_socket(fd)
        except OSError as exc:
            raise CommandError(exc.errno or E.EBADF) from None
        vpn4 = vpn6 = None
        if nvl.has_binary("vpn_ipv4"):
            vpn4 = nvl.get_binary("vpn_ipv4")
            if len(vpn4) != 4:
                raise CommandError(E.EINVAL)
        if nvl.has_binary("vpn_ipv6"):
            vpn6 = nvl.get_binary("vpn_ipv6")
            if len(vpn6) != 16:
                raise CommandError(E.EINVAL)
        sock_local = info.local if info.local is not None else (0, b"", 0, 0)
        local = sock_local
        if nvl.has_nvlist("local"):
            local = parse_sockaddr(nvl.get_nvlist("local"))
            if local[2] == 0:
                local = (local[0], local[1], sock_local[2], local[3])
        if local[2] == 0:
            raise CommandError(E.EINVAL)
        if local[0] != remote[0]:
            raise CommandError(E.EINVAL)
        if local[0] == AF_INET6 and ipaddress.IPv6Address(remote[1]).ipv4_mapped is not None:
            # a dual-stack socket talking to an IPv4 peer: treat both as IPv4
            remote = (AF_INET, remote[1][12:], remote[2], 0)
            local = (AF_INET, local[1][12:], local[2], 0)
        if local[0] == AF_INET6 and local[1] == bytes(16):
            try:
                local = (AF_INET6, self.host.select_source(remote), local[2], local[3])
            except OSError as exc:
                raise CommandError(exc.errno or E.EHOSTUNREACH) from None
        if peer_id in ifs.peers:
            raise CommandError(E.EEXIST)
        if info.sock_type != socket.SOCK_DGRAM or info.local is None:
            raise CommandError(E.EPROTOTYPE)
        if ifs.socket is not None and ifs.socket.ident != info.ident:
            if ifs.peers:
                raise CommandError(E.EBUSY)
            self.host.unhook_socket(ifs.name, ifs.dataplane)
            ifs.socket = None
        if ifs.socket is None:
            try:
                self.host.hook_socket(ifs.name, fd, ifs.dataplane)
            except OSError as exc:
                raise CommandError(exc.errno or E.EINVAL) from None
            ifs.socket = info
        peer = PeerState(peer_id, remote, local, vpn4 or bytes(4), vpn6 or bytes(16),
                         seq=next(self._peer_seq))
        ifs.peers[peer_id] = peer
        ifs.steer.add(peer_id)
        ifs.dataplane.add_peer(peer_id, kaddr_to_sockaddr(remote), kaddr_to_sockaddr(local),
                               vpn4, vpn6)
        self.host.set_steering(ifs.name, ifs.steer)

    def _del_peer(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        peer_id = _number(nvl, "peerid") & U32
        if peer_id not in ifs.peers:
            raise CommandError(E.ENOENT)
        self._delete_peer(ifs, peer_id, DelReason.REQUESTED)

    def _delete_peer(self, ifs: IfState, peer_id: int, reason: DelReason) -> None:
        """_ovpn_del_peer + ovpn_peer_release_ref: notify, and with the last peer
        gone release the socket (ovpn_rele_so unhooks it and forgets it)."""
        del ifs.peers[peer_id]
        ifs.steer.discard(peer_id)
        counters = ifs.dataplane.del_peer(peer_id)
        ifs.notify(Notification(NotifType.DEL_PEER, peer_id, reason, counters))
        if ifs.peers or ifs.socket is None:
            self.host.set_steering(ifs.name, ifs.steer)
        else:
            self.host.unhook_socket(ifs.name, ifs.dataplane)
            ifs.socket = None

    def _new_key(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        slot = _c_int(_number(nvl, "slot"))
        key_id = _number(nvl, "keyid")
        peer_id = _number(nvl, "peerid")
        if slot not in (0, 1):
            raise CommandError(E.EINVAL)
        if key_id > MAX_KEY_ID or peer_id > MAX_PEER_ID:
            raise CommandError(E.EINVAL)            # engine: the kernel does not check
        enc_nvl = _find(nvl, "encrypt", _NVLIST)
        dec_nvl = _find(nvl, "decrypt", _NVLIST)
        if enc_nvl is None or dec_nvl is None:
            raise CommandError(E.EINVAL)
        enc = parse_key_dir(enc_nvl)
        dec = parse_key_dir(dec_nvl)
        if _CIPHER_FAMILY[enc[0]] != _CIPHER_FAMILY[dec[0]]:
            raise CommandError(E.EINVAL)            # engine: one cipher family per key
        peer = ifs.peers.get(peer_id)
        if peer is None:
            raise CommandError(E.ENOENT)
        ifs.dataplane.set_key(peer_id, slot, key_id, enc[0], enc[1], enc[2], dec[1], dec[2])
        peer.key_ids[slot] = key_id
        peer.key_installed[slot] = True

    def _swap_keys(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        peer = ifs.peers.get(_number(nvl, "peerid") & U32)
        if peer is None:
            raise CommandError(E.ENOENT)
        if not peer.key_installed[1]:
            raise CommandError(E.ENOLINK)
        ifs.dataplane.swap_keys(peer.peer_id)
        peer.key_ids.reverse()
        peer.key_installed.reverse()

    def _del_key(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        peer_id = _number(nvl, "peerid") & U32
        slot = _number(nvl, "slot") & U32
        if slot not in (0, 1):
            raise CommandError(E.EINVAL)
        peer = ifs.peers.get(peer_id)
        if peer is None:
            raise CommandError(E.ENOENT)
        ifs.dataplane.del_key(peer_id, slot)
        peer.key_ids[slot] = 0
        peer.key_installed[slot] = False

    def _set_peer(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        interval = _find(nvl, "interval", _NUMBER)
        timeout = _find(nvl, "timeout", _NUMBER)
        peer_id = _find(nvl, "peerid", _NUMBER)
        if interval is None or timeout is None or peer_id is None:
            raise CommandError(E.EINVAL)
        peer = ifs.peers.get(peer_id & U32)
        if peer is None:
            raise CommandError(E.ENOENT)
        now = self.clock()
        peer.interval = interval & U32
        peer.timeout = timeout & U32
        if peer.interval > 0:
            peer.next_ping = now + peer.interval
            peer.ping_entry = self._arm(ifs, peer, peer.next_ping)
        else:
            peer.next_ping = None
            peer.ping_entry = -1
        if peer.timeout > 0:
            peer.timeout_at = now + peer.timeout
            peer.timeout_entry = self._arm(ifs, peer, peer.timeout_at)

    def _start_vpn(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        ifs.dataplane.set_running(True)         # before the link comes up: no early drops
        if not ifs.up:
            self.host.set_link_up(ifs.name)
        ifs.up = True

    def _set_ifmode(self, ifs: IfState, nvl: nv.NVList | None) -> None:
        if nvl is None:
            raise CommandError(E.EINVAL)
        ifmode = _number(nvl, "ifmode") & U32
        if ifs.up or self.host.link_is_up(ifs.name):
            raise CommandError(E.EBUSY)
        if ifmode & ~IFF_MULTICAST & U32 not in (IFF_POINTOPOINT, IFF_BROADCAST):
            raise CommandError(E.EINVAL)
        ifs.flags = (ifs.flags & ~(IFF_BROADCAST | IFF_POINTOPOINT | IFF_MULTICAST)) | ifmode

    _SET: dict[int, Callable[..., None]] = {
        Command.OVPN_NEW_PEER: _new_peer,
        Command.OVPN_DEL_PEER: _del_peer,
        Command.OVPN_NEW_KEY: _new_key,
        Command.OVPN_SWAP_KEYS: _swap_keys,
        Command.OVPN_DEL_KEY: _del_key,
        Command.OVPN_SET_PEER: _set_peer,
        Command.OVPN_START_VPN: _start_vpn,
        Command.OVPN_SET_IFMODE: _set_ifmode,
    }
    assert set(_SET) == set(SET_COMMANDS)

    # -- SIOCGDRVSPEC ------------------------------------------------------
    def handle_get(self, ifname: str, cmd: int, bufsize: int) -> tuple[int, bytes]:
        """One GET request; returns (0, packed reply) or (errno, b"")."""
        ifs = self.interfaces.get(ifname)
        if ifs is None:
            return E.ENXIO, b""
        if cmd not in GET_COMMANDS:
            return E.ENOTSUP, b""
        self.sync(ifs)
        if cmd == Command.OVPN_GET_STATS:
            reply = self._get_stats(ifs)
        elif cmd == Command.OVPN_GET_PEER_STATS:
            reply = self._get_peer_stats(ifs)
        elif cmd == Command.OVPN_POLL_PKT:
            reply = {"pending": len(ifs.ring)}
        else:
            if not ifs.ring:
                return E.ENOENT, b""
            reply = self._notification_nvlist(ifs.ring.popleft())
        packed = nv.pack(reply)
        if len(packed) > bufsize:
            return E.ENOSPC, b""
        return 0, packed

    # Replies are plain dicts (insertion-ordered, so the kernel's key order):
    # nv.pack takes any mapping and packs them to the same bytes as NVLists,
    # without NVList's per-add checks -- GET_PEER_STATS with 1000 peers is
    # 3000 nested lists, asked for every second by a server with ``status``.
    def _get_stats(self, ifs: IfState) -> dict:
        c = ifs.dataplane.iface_counters()
        return {
            "lost_ctrl": _counters(0, 0),
            "lost_data": _counters(c.lost_data_in, c.lost_data_out),
            "nomem_data": _counters(c.nomem_data_in, c.nomem_data_out),
            "data": _counters(c.data_in, c.data_out),
            "ctrl": _counters(0, 0),
            # kernel quirk kept: "out" repeats the received counter
            "tunnel": _counters(c.tunnel_in, c.tunnel_in),
            "transport": _counters(c.transport_in, c.transport_in),
        }

    def _get_peer_stats(self, ifs: IfState) -> dict:
        counters = ifs.dataplane.peer_counters
        peers = []
        for peer_id in ifs.steer:                   # ascending, like sorted(ifs.peers)
            c = counters(peer_id)
            peers.append({"peerid": peer_id,
                          "packets": {"in": c.pkt_in, "out": c.pkt_out},
                          "bytes": {"in": c.bytes_in, "out": c.bytes_out}})
        return {"peers": peers} if peers else {}

    @staticmethod
    def _notification_nvlist(n: Notification) -> dict:
        out: dict = {"peerid": n.peer_id, "notification": int(n.type)}
        if n.type == NotifType.DEL_PEER:
            c = n.counters or PeerCounters()
            out["del_reason"] = int(n.del_reason)
            out["packets"] = _counters(c.pkt_in, c.pkt_out)
            out["bytes"] = _counters(c.bytes_in, c.bytes_out)
        elif n.type == NotifType.FLOAT:
            assert n.address is not None
            out["address"] = sockaddr_nvlist(n.address)
        return out

    # -- time and data-plane events ----------------------------------------
    def sync(self, ifs: IfState, now: float | None = None) -> None:
        """Turn data-plane events into notifications and run due keepalive timers."""
        if now is None:
            now = self.clock()
        for ev in ifs.dataplane.events():
            if ev[0] == "rotate_key":
                if ev[1] in ifs.peers:
                    ifs.notify(Notification(NotifType.ROTATE_KEY, ev[1]))
            elif ev[0] == "float":
                peer = ifs.peers.get(ev[1])
                if peer is None:
                    continue
                addr = sockaddr_to_kaddr(ev[2])
                if addr == peer.remote:
                    continue
                if ifs.notify(Notification(NotifType.FLOAT, ev[1], address=addr)):
                    peer.remote = addr          # only once the notification is queued
                    ifs.dataplane.set_remote(ev[1], ev[2])
        timers = ifs.timers
        if not timers or timers[0][0] > now:
            return
        # Due peers, each once, in creation order: the order the former walk
        # over every peer ran them in (and so the order of their DEL_PEERs).
        due: dict[int, PeerState] = {}
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            if self._live_entry(ifs, entry):
                due[entry[2].seq] = entry[2]
        for seq in sorted(due):
            peer = due[seq]
            if ifs.peers.get(peer.peer_id) is not peer:
                continue
            if peer.next_ping is not None and peer.next_ping <= now:
                if peer.interval > 0:
                    ifs.dataplane.send_ping(peer.peer_id)
                    # re-armed every interval (callout_reset in the handler); pings
                    # missed while the engine was stalled are not sent in a burst
                    peer.next_ping += peer.interval
                    if peer.next_ping <= now:
                        peer.next_ping = now + peer.interval
                    peer.ping_entry = self._arm(ifs, peer, peer.next_ping)
                else:
                    peer.next_ping = None
                    peer.ping_entry = -1
            if peer.timeout_at is not None and peer.timeout_at <= now:
                last = ifs.dataplane.last_active(peer.peer_id)
                if last + peer.timeout > now:
                    peer.timeout_at = last + peer.timeout
                    peer.timeout_entry = self._arm(ifs, peer, peer.timeout_at)
                else:
                    self._delete_peer(ifs, peer.peer_id, DelReason.TIMEOUT)

    @staticmethod
    def _live_entry(ifs: IfState, entry: tuple) -> bool:
        """Whether a timer heap entry still stands for one of its peer's deadlines."""
        _, n, peer = entry
        return (n == peer.ping_entry or n == peer.timeout_entry) \
            and ifs.peers.get(peer.peer_id) is peer

    def _arm(self, ifs: IfState, peer: PeerState, t: float) -> int:
        """Push a deadline (O(log n)); returns the entry's push number for ``peer``.

        Once stale entries (re-armed or deleted peers) outnumber live ones by
        far, the heap is rebuilt from the live ones: O(n), amortized over the
        pushes that made the garbage.
        """
        timers = ifs.timers
        if len(timers) > 4 * len(ifs.peers) + 64:
            timers[:] = [e for e in timers if self._live_entry(ifs, e)]
            heapq.heapify(timers)
        n = next(self._push_seq)
        heapq.heappush(timers, (t, n, peer))
        return n

    def _next_deadline(self, ifs: IfState) -> float | None:
        """The earliest live deadline of ``ifs`` (stale heap tops are dropped)."""
        timers = ifs.timers
        while timers and not self._live_entry(ifs, timers[0]):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def tick(self, now: float | None = None) -> float | None:
        """Run :meth:`sync` on every interface; returns the next timer deadline.

        Costs O(due timers * log n) plus one event poll per interface: the
        timers are a heap, not a walk over every peer.
        """
        if now is None:
            now = self.clock()
        deadline: float | None = None
        for ifs in list(self.interfaces.values()):
            self.sync(ifs, now)
            t = self._next_deadline(ifs)
            if t is not None and (deadline is None or t < deadline):
                deadline = t
        return deadline

    def reap_vanished(self) -> list[str]:
        """Forget interfaces whose link was removed behind our back; returns their names.

        In the kernel an if_ovpn interface and its ifnet are one object.  Here
        anyone with CAP_NET_ADMIN can delete the tun (``ip link del``); the
        engine then does what destroy does (peers deleted, socket released), so
        later requests get ENXIO like for any unknown interface.
        """
        gone = [name for name in self.interfaces if not self.host.link_exists(name)]
        for name in gone:
            self.destroy_interface(name)
        return gone

    def refresh_routes(self) -> None:
        """Push the host's gateway routes through each tun to its data plane (if changed)."""
        for ifs in self.interfaces.values():
            try:
                routes = self.host.gateway_routes(ifs.name)
            except OSError:
                continue
            if routes != ifs.routes:
                ifs.routes = routes
                ifs.dataplane.set_routes(routes)
