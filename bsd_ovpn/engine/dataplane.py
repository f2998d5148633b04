"""The userspace engine's data plane: the contract, and a clear Python implementation.

The command handler (:mod:`.commands`) owns the if_ovpn *state machine*
(validation, errnos, notifications, keepalive timers); a data plane owns the
*packets*: UDP datagrams in and out of the engine's steered socket, IP packets
in and out of the tun device, the AEAD, replay windows and counters.  Two
implementations plug in through :class:`DataPlane`: :class:`PythonDataPlane`
here (correct and readable, a few tens of thousands of packets per second) and
H7's C fast path (``bsd_ovpn.engine.fastpath``).

The contract
------------
* Control calls come from one engine thread at a time; packet threads are the
  data plane's own business.  Arguments were validated by the engine, so a
  data plane may assume them well formed (peer exists, slot is 0 or 1, ...).
* Addresses are Python sockaddr tuples: ``("192.0.2.1", 1194)`` or
  ``("2001:db8::1", 1194, 0, scope_id)``; ports in host order.  ``local`` is
  None or an address whose port is already resolved.  ``vpn4``/``vpn6`` are
  4/16 raw bytes or None.
* ``set_key``: ``cipher`` is the kernel's name ("none", "AES-128-GCM", ...);
  the AES variant follows the key length, as in the kernel; for "none" keys
  and ivs are ``b""``.  The TX sequence of a new key starts at 1.
* TX (tun -> UDP), in the kernel's order: link not running -> lost_data out;
  no peer by routing (1 peer -> it; exact vpn address; else the gateway of the
  longest route pushed by ``set_routes``) -> lost_data out; no primary key ->
  silently dropped (the kernel's ENOLINK); sequence == ``rotate_threshold`` ->
  ROTATE_KEY event (the packet still goes; checked first, as the kernel does,
  and every time that sequence number is used); sequence past 2**32-1 -> refused,
  nomem_data out (for good: the kernel resets the counter to 2**32-1 and so
  reuses a nonce, which the engine does not reproduce); then the peer's
  packets/bytes out (plaintext length), encryption, send, data/tunnel out.
* RX (UDP -> tun): transport in += UDP length; key by key id, slot 0 first
  then slot 1 (the kernel's lookup: an empty slot 0 whose key id matches
  shadows slot 1); no such key or no decrypt key -> lost_data in; AEAD
  failure -> lost_data in; replay check (on by default in the engine, off by
  default in the kernel: the sysctl; the kernel's 64-packet window, see
  :class:`KernelReplayWindow`) -> lost_data in; ``last_active`` = now;
  a new source address -> a pending FLOAT event; data/tunnel in and the
  peer's packets/bytes in (decrypted length); empty plaintext -> nomem_data
  in; a first nibble other than 4/6 (pings, OCC) -> lost_data in; else the
  packet is written to the tun.
* FLOAT: the data plane does not change the remote itself.  The engine calls
  :meth:`set_remote` only after it has queued the FLOAT notification, which
  is the kernel's rule (remote updated only if the enqueue succeeded, so a
  full ring means "try again on a later packet").  One pending float per
  peer (the latest address) until :meth:`events` drains it.
* ``send_ping`` transmits the 16-byte ping magic on the primary key with the
  TX accounting above but no routing and no running check at the start (the
  kernel checks the link only when it encapsulates, after counting the peer).
* ``last_active`` uses ``time.monotonic()``; 0.0 means never.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable, Protocol, Sequence, Union, runtime_checkable

from bsd_ovpn.ifovpn import PING_MAGIC
from bsd_ovpn.proto.datachannel import DataChannel, DataChannelError, PacketIdExhaustedError
from bsd_ovpn.proto.keys import DataKeys

log = logging.getLogger("bsd_ovpn.engine")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
SockAddr = tuple

P_DATA_V2 = 9
TAG_SIZE = 16
HEADER_SIZE = 8             # op32 + seq32
UDP_HEADER = 8
SEQ_ROTATE = 0x80000000
SEQ_MAX = 0xFFFFFFFF
REPLAY_WINDOW = 64          # the kernel's bitmap width
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)     # Python 3.11 lacks the name (Linux: 8)


@dataclass
class PeerCounters:
    """A peer's counters, as GET_PEER_STATS and DEL_PEER notifications report them."""

    pkt_in: int = 0
    pkt_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class IfaceCounters:
    """Interface counters; GET_STATS reports them (lost_ctrl/ctrl are always 0)."""

    lost_data_in: int = 0
    lost_data_out: int = 0
    nomem_data_in: int = 0
    nomem_data_out: int = 0
    data_in: int = 0
    data_out: int = 0
    tunnel_in: int = 0
    tunnel_out: int = 0
    transport_in: int = 0
    transport_out: int = 0

    def copy(self) -> IfaceCounters:
        return IfaceCounters(**{f.name: getattr(self, f.name) for f in fields(self)})


@runtime_checkable
class DataPlane(Protocol):
    """What the engine needs from a data plane (see the module docstring)."""

    replay_protection: bool
    rotate_threshold: int

    def attach(self, udp_fd: int, tun_fd: int) -> None: ...
    def detach(self) -> None: ...
    def set_running(self, up: bool) -> None: ...
    def add_peer(self, peer_id: int, remote: SockAddr, local: SockAddr | None,
                 vpn4: bytes | None, vpn6: bytes | None) -> None: ...
    def del_peer(self, peer_id: int) -> PeerCounters: ...
    def set_remote(self, peer_id: int, remote: SockAddr) -> None: ...
    def set_key(self, peer_id: int, slot: int, key_id: int, cipher: str, enc_key: bytes,
                enc_iv: bytes, dec_key: bytes, dec_iv: bytes) -> None: ...
    def swap_keys(self, peer_id: int) -> None: ...
    def del_key(self, peer_id: int, slot: int) -> None: ...
    def send_ping(self, peer_id: int) -> None: ...
    def set_routes(self, routes: Sequence[tuple[Network, bytes]]) -> None: ...
    def peer_counters(self, peer_id: int) -> PeerCounters: ...
    def iface_counters(self) -> IfaceCounters: ...
    def last_active(self, peer_id: int) -> float: ...
    def events(self) -> list[tuple]: ...


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------

Addr = tuple  # canonical: (4, addr4 bytes, port, 0) or (6, addr16 bytes, port, scope_id)


def canon_addr(sa: SockAddr) -> Addr:
    """Canonical comparable form; v4-mapped IPv6 becomes IPv4 (a dual-stack socket)."""
    ip = ipaddress.ip_address(sa[0].split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return (4, ip.ipv4_mapped.packed, sa[1], 0)
    if ip.version == 4:
        return (4, ip.packed, sa[1], 0)
    return (6, ip.packed, sa[1], sa[3] if len(sa) > 3 else 0)


def addr_tuple(a: Addr) -> SockAddr:
    if a[0] == 4:
        return (str(ipaddress.IPv4Address(a[1])), a[2])
    return (str(ipaddress.IPv6Address(a[1])), a[2], 0, a[3])


def _dest_for(a: Addr, family: int) -> SockAddr:
    """The sendto() address for ``a`` on a socket of ``family``."""
    if family == socket.AF_INET6 and a[0] == 4:
        return ("::ffff:" + str(ipaddress.IPv4Address(a[1])), a[2], 0, 0)
    return addr_tuple(a)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------

class _NoReplay:
    """Switches the protocol codec's own (OpenVPN) replay window off: the data
    plane checks sequence numbers with :class:`KernelReplayWindow` instead."""

    @staticmethod
    def check_and_accept(packet_id: int, now: float, timestamp: int = 0) -> None:
        return None


_NO_REPLAY = _NoReplay()


class KernelReplayWindow:
    """The receive replay check of if_ovpn (``ovpn_check_replay``), one per decrypt key.

    Why not the protocol library's :class:`~bsd_ovpn.proto.datachannel.ReplayWindow`:
    the engine stands in for the kernel, so both data planes must accept and
    refuse exactly the packets the kernel would (H7's C data plane runs the
    same algorithm; tests/unit/test_engine_parity.py holds them to the same
    sequences).  OpenVPN's sliding window differs after a large jump.

    State: ``rx_seq``, the highest sequence number below which everything
    counts as seen (0 at first, so 0 is never accepted), and ``rx_window``, a
    64-bit map whose bit ``d`` says "rx_seq + 1 + d was seen".  A sequence
    number is refused if it is not above ``rx_seq`` or its bit is set.  One
    more than 64 ahead is accepted and restarts the window there (``rx_seq``
    jumps to it, the map is cleared), so every older straggler is refused
    from then on.  The bound ``rx_seq + 64`` is computed in 32 bits, as the
    kernel's ``uint32_t`` does: within 64 of 2**32 it wraps, and every newer
    number restarts the window.  After each accept the window slides over
    the contiguous run of seen numbers.
    """

    __slots__ = ("rx_seq", "rx_window")

    def __init__(self) -> None:
        self.rx_seq = 0
        self.rx_window = 0

    def check_and_accept(self, seq: int) -> bool:
        """True (and record ``seq``) if it is new; False for a replay or a straggler."""
        if seq <= self.rx_seq:
            return False
        if seq > (self.rx_seq + REPLAY_WINDOW) & SEQ_MAX:
            self.rx_seq = seq
            self.rx_window = 0
            return True
        bit = 1 << (seq - self.rx_seq - 1)
        if self.rx_window & bit:
            return False
        window = self.rx_window | bit
        while window & 1:
            self.rx_seq += 1
            window >>= 1
        self.rx_window = window
        return True


def _aead_name(cipher: str, key: bytes) -> str:
    """The kernel picks GCM vs ChaCha by name and the AES size by key length."""
    if cipher.startswith("AES-"):
        return f"AES-{len(key) * 8}-GCM"
    return cipher


class KeyDir:
    """One direction of an installed key, on top of the protocol library's codec.

    The kernel keeps a cipher per direction, so each direction is its own
    :class:`~bsd_ovpn.proto.datachannel.DataChannel` (built with that
    direction's key on both sides and used one way only): the AEAD layout is
    the protocol library's, not a second copy.  The codec's own replay window
    (OpenVPN's) is switched off; receive keys use :class:`KernelReplayWindow`.
    """

    __slots__ = ("cipher", "channel", "window")

    def __init__(self, cipher: str, key: bytes, iv: bytes, key_id: int, peer_id: int) -> None:
        name = _aead_name(cipher, key)
        keys = DataKeys(cipher=name, key_id=key_id, encrypt_key=key, encrypt_iv=iv,
                        decrypt_key=key, decrypt_iv=iv)
        self.cipher = cipher
        self.channel = DataChannel(keys, peer_id=peer_id, replay_window=REPLAY_WINDOW,
                                   replay_time=0)
        self.channel.replay = _NO_REPLAY
        self.window = KernelReplayWindow()

    @property
    def tx_seq(self) -> int:
        """The sequence number the next packet will carry (starts at 1)."""
        return self.channel.send_packet_id + 1

    def seal(self, plaintext: bytes) -> bytes:
        return self.channel.encrypt(plaintext)

    def open(self, payload: bytes, now: float, replay: bool) -> bytes | None:
        """Authenticated (and, if ``replay``, replay-checked) plaintext, or None.

        As in the kernel, the replay check comes after authentication: a
        forged packet never moves the window."""
        try:
            plaintext = self.channel.decrypt(payload, now)
        except DataChannelError:
            return None
        if replay and not self.window.check_and_accept(
                int.from_bytes(payload[4:HEADER_SIZE], "big")):
            return None
        return plaintext


class KeySlot:
    __slots__ = ("key_id", "peer_id", "encrypt", "decrypt")

    def __init__(self) -> None:
        self.key_id = 0
        self.peer_id = 0
        self.encrypt: KeyDir | None = None
        self.decrypt: KeyDir | None = None


class Peer:
    __slots__ = ("peer_id", "remote", "local", "vpn4", "vpn6", "slots", "counters",
                 "last_active")

    def __init__(self, peer_id: int, remote: Addr, local: Addr | None,
                 vpn4: bytes | None, vpn6: bytes | None) -> None:
        self.peer_id = peer_id
        self.remote = remote
        self.local = local
        self.vpn4 = vpn4 or bytes(4)
        self.vpn6 = vpn6 or bytes(16)
        self.slots = [KeySlot(), KeySlot()]
        self.counters = PeerCounters()
        self.last_active = 0.0


def ip_family(packet: bytes) -> int:
    """4, 6 or 0 from the first nibble, as the kernel's ovpn_get_af."""
    if not packet:
        return 0
    v = packet[0] >> 4
    return v if v in (4, 6) else 0


# ---------------------------------------------------------------------------
# The Python data plane
# ---------------------------------------------------------------------------

class PythonDataPlane:
    """A :class:`DataPlane` in plain Python, one packet thread per attached interface.

    The packet logic is in :meth:`handle_datagram` and :meth:`handle_tun_packet`
    (bytes in, bytes out, no I/O) so unit tests drive it without a tun or
    root; :meth:`attach` adds a thread that feeds them from the fds.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 tun_header: int = 0) -> None:
        self.tun_header = tun_header     # 4 on FreeBSD tun(4) with TUNSIFHEAD
        self.replay_protection = True
        self.rotate_threshold = SEQ_ROTATE
        self._clock = clock
        self._lock = threading.RLock()
        self._peers: dict[int, Peer] = {}
        self._counters = IfaceCounters()
        self._running = False
        self._routes: list[tuple[Network, bytes]] = []
        self._events: list[tuple] = []
        self._floats: dict[int, Addr] = {}
        self._udp: socket.socket | None = None
        self._tun_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._pktinfo_ok = False

    # -- control -----------------------------------------------------------
    def attach(self, udp_fd: int, tun_fd: int) -> None:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("data plane already attached")
            self._udp = socket.socket(fileno=os.dup(udp_fd))
            self._udp.setblocking(False)
            bound = self._udp.getsockname()
            self._pktinfo_ok = ipaddress.ip_address(bound[0]).is_unspecified
            self._tun_fd = os.dup(tun_fd)
            os.set_blocking(self._tun_fd, False)
            self._wake = os.pipe()
            self._thread = threading.Thread(target=self._run, name="engine-dataplane",
                                            daemon=True)
            self._thread.start()

    def detach(self) -> None:
        with self._lock:
            thread, wake = self._thread, self._wake
            self._thread = None
        if thread is None:
            return
        assert wake is not None
        os.write(wake[1], b"x")
        thread.join()
        with self._lock:
            os.close(wake[0])
            os.close(wake[1])
            self._wake = None
            if self._udp is not None:
                self._udp.close()
                self._udp = None
            if self._tun_fd is not None:
                os.close(self._tun_fd)
                self._tun_fd = None

    def set_running(self, up: bool) -> None:
        with self._lock:
            self._running = bool(up)

    def add_peer(self, peer_id: int, remote: SockAddr, local: SockAddr | None,
                 vpn4: bytes | None, vpn6: bytes | None) -> None:
        with self._lock:
            self._peers[peer_id] = Peer(peer_id, canon_addr(remote),
                                        canon_addr(local) if local else None, vpn4, vpn6)

    def del_peer(self, peer_id: int) -> PeerCounters:
        with self._lock:
            peer = self._peers.pop(peer_id)
            self._floats.pop(peer_id, None)
            return PeerCounters(**vars_of(peer.counters))

    def set_remote(self, peer_id: int, remote: SockAddr) -> None:
        with self._lock:
            peer = self._peers.get(peer_id)
            if peer is not None:
                peer.remote = canon_addr(remote)

    def set_key(self, peer_id: int, slot: int, key_id: int, cipher: str, enc_key: bytes,
                enc_iv: bytes, dec_key: bytes, dec_iv: bytes) -> None:
        enc = KeyDir(cipher, enc_key, enc_iv, key_id, peer_id)
        dec = KeyDir(cipher, dec_key, dec_iv, key_id, peer_id)
        with self._lock:
            ks = self._peers[peer_id].slots[slot]
            ks.encrypt, ks.decrypt, ks.key_id, ks.peer_id = enc, dec, key_id, peer_id

    def swap_keys(self, peer_id: int) -> None:
        with self._lock:
            s = self._peers[peer_id].slots
            s[0], s[1] = s[1], s[0]

    def del_key(self, peer_id: int, slot: int) -> None:
        with self._lock:
            self._peers[peer_id].slots[slot] = KeySlot()

    def set_routes(self, routes: Sequence[tuple[Network, bytes]]) -> None:
        ordered = sorted(routes, key=lambda r: r[0].prefixlen, reverse=True)
        with self._lock:
            self._routes = list(ordered)

    def set_tx_seq(self, peer_id: int, slot: int, next_seq: int) -> None:
        """Test hook: the sequence number the next packet on that key uses."""
        with self._lock:
            enc = self._peers[peer_id].slots[slot].encrypt
            if enc is not None:
                enc.channel.send_packet_id = next_seq - 1

    def peer_counters(self, peer_id: int) -> PeerCounters:
        with self._lock:
            return PeerCounters(**vars_of(self._peers[peer_id].counters))

    def iface_counters(self) -> IfaceCounters:
        with self._lock:
            return self._counters.copy()

    def last_active(self, peer_id: int) -> float:
        with self._lock:
            return self._peers[peer_id].last_active

    def events(self) -> list[tuple]:
        with self._lock:
            out = self._events
            self._events = []
            for peer_id, addr in self._floats.items():
                out.append(("float", peer_id, addr_tuple(addr)))
            self._floats.clear()
            return out

    def send_ping(self, peer_id: int) -> None:
        with self._lock:
            peer = self._peers.get(peer_id)
            out = self._encrypt_for(peer, PING_MAGIC) if peer is not None else None
        if out is not None:
            self._send(*out)

    # -- packet logic (no I/O) ---------------------------------------------
    def route(self, packet: bytes) -> Peer | None:
        """TX peer selection (kernel ovpn_route_peer); caller holds the lock."""
        if len(self._peers) == 1:
            return next(iter(self._peers.values()))
        fam = ip_family(packet)
        if fam == 4 and len(packet) >= 20:
            dst = packet[16:20]
            attr = "vpn4"
        elif fam == 6 and len(packet) >= 40:
            dst = packet[24:40]
            attr = "vpn6"
        else:
            return None
        for peer in sorted(self._peers.values(), key=lambda p: p.peer_id):
            if getattr(peer, attr) == dst:
                return peer
        ip = ipaddress.ip_address(dst)
        for net, gateway in self._routes:
            if net.version == ip.version and ip in net:
                for peer in sorted(self._peers.values(), key=lambda p: p.peer_id):
                    if getattr(peer, attr) == gateway:
                        return peer
                return None
        return None

    def handle_tun_packet(self, packet: bytes) -> tuple[bytes, Addr, Addr | None] | None:
        """An IP packet from the tun: (datagram, destination, local) to send, or None."""
        with self._lock:
            if not self._running:
                self._counters.lost_data_out += 1
                return None
            peer = self.route(packet)
            if peer is None:
                self._counters.lost_data_out += 1
                return None
            return self._encrypt_for(peer, packet)

    def _encrypt_for(self, peer: Peer, plaintext: bytes) -> tuple[bytes, Addr, Addr | None] | None:
        ks = peer.slots[0]
        enc = ks.encrypt
        if enc is None:
            return None                                  # ENOLINK, not counted
        seq = enc.tx_seq
        if seq == self.rotate_threshold:                 # the kernel checks this first
            self._events.append(("rotate_key", peer.peer_id))
        if seq > SEQ_MAX:
            self._counters.nomem_data_out += 1
            return None
        peer.counters.pkt_out += 1
        peer.counters.bytes_out += len(plaintext)
        if not self._running:
            enc.channel.send_packet_id = seq             # the sequence number is used up
            self._counters.lost_data_out += 1            # ovpn_encap: link not up
            return None
        try:
            wire = enc.seal(plaintext)
        except PacketIdExhaustedError:                   # pragma: no cover - checked above
            self._counters.nomem_data_out += 1
            return None
        self._counters.data_out += 1
        self._counters.tunnel_out += len(plaintext)
        ip_hdr = 20 if peer.remote[0] == 4 else 40
        self._counters.transport_out += len(wire) + UDP_HEADER + ip_hdr
        return wire, peer.remote, peer.local

    def handle_datagram(self, payload: bytes, source: SockAddr) -> bytes | None:
        """A UDP payload from the engine's socket: the IP packet for the tun, or None."""
        now = self._clock()
        with self._lock:
            c = self._counters
            c.transport_in += len(payload) + UDP_HEADER
            if len(payload) < HEADER_SIZE:
                c.lost_data_in += 1
                return None
            op = int.from_bytes(payload[:4], "big")
            peer = self._peers.get(op & 0xFFFFFF)
            if peer is None or (op >> 27) != P_DATA_V2:
                # The steering program keeps these on the control plane's
                # socket; only the opcode-only program lets them through.
                c.lost_data_in += 1
                return None
            key_id = (op >> 24) & 7
            if peer.slots[0].key_id == key_id:
                ks = peer.slots[0]
            elif peer.slots[1].key_id == key_id:
                ks = peer.slots[1]
            else:
                ks = None
            if ks is None or ks.decrypt is None:
                c.lost_data_in += 1
                return None
            dec = ks.decrypt
            replay = self.replay_protection
        plaintext = dec.open(payload, now, replay)   # AEAD, then the kernel's replay window
        with self._lock:
            if plaintext is None:
                c.lost_data_in += 1
                return None
            if self._peers.get(peer.peer_id) is not peer:
                c.lost_data_in += 1                # deleted while decrypting
                return None
            peer.last_active = now
            src = canon_addr(source)
            if src != peer.remote:
                self._floats[peer.peer_id] = src
            c.data_in += 1
            c.tunnel_in += len(plaintext)
            peer.counters.pkt_in += 1
            peer.counters.bytes_in += len(plaintext)
            if not plaintext:
                c.nomem_data_in += 1
                return None
            if ip_family(plaintext) == 0:
                c.lost_data_in += 1
                return None
            return plaintext

    # -- I/O thread --------------------------------------------------------
    def _send(self, wire: bytes, dest: Addr, local: Addr | None) -> None:
        udp = self._udp
        if udp is None:
            return
        try:
            if (local is not None and self._pktinfo_ok and local[0] == dest[0]
                    and any(local[1])):
                udp.sendmsg([wire], [_pktinfo(local, udp.family)], 0, _dest_for(dest, udp.family))
            else:
                udp.sendto(wire, _dest_for(dest, udp.family))
        except (BlockingIOError, InterruptedError):
            with self._lock:
                self._counters.nomem_data_out += 1
        except OSError:
            with self._lock:
                self._counters.lost_data_out += 1

    def _run(self) -> None:
        udp, tun, wake = self._udp, self._tun_fd, self._wake
        assert udp is not None and tun is not None and wake is not None
        sel = selectors.DefaultSelector()
        sel.register(udp, selectors.EVENT_READ, "udp")
        sel.register(tun, selectors.EVENT_READ, "tun")
        sel.register(wake[0], selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        return
                    try:
                        if key.data == "udp":
                            self._drain_udp(udp, tun)
                        else:
                            self._drain_tun(tun)
                    except Exception:                # one bad packet must not stop the tunnel
                        log.exception("engine data plane: packet handling failed")
        finally:
            sel.close()

    def _drain_udp(self, udp: socket.socket, tun: int) -> None:
        for _ in range(256):
            try:
                payload, source = udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue                      # ICMP errors reported on the socket
                raise
            packet = self.handle_datagram(payload, source)
            if packet is not None:
                if self.tun_header:
                    af = 2 if packet[0] >> 4 == 4 else 28
                    packet = af.to_bytes(self.tun_header, "big") + packet
                try:
                    os.write(tun, packet)
                except OSError:
                    with self._lock:
                        self._counters.lost_data_in += 1

    def _drain_tun(self, tun: int) -> None:
        for _ in range(256):
            try:
                packet = os.read(tun, 65535)
            except (BlockingIOError, InterruptedError):
                return
            out = self.handle_tun_packet(packet[self.tun_header:])
            if out is not None:
                self._send(*out)


def vars_of(counters: PeerCounters) -> dict[str, int]:
    return {f.name: getattr(counters, f.name) for f in fields(counters)}


def _pktinfo(local: Addr, family: int) -> tuple[int, int, bytes]:
    """Ancillary data choosing the source address (the peer's ``local``, multihome).

    An IPv4 source uses IP_PKTINFO even on a dual-stack IPv6 socket: Linux
    sends to a v4-mapped destination through the IPv4 path, which reads it.
    """
    if local[0] == 6:
        return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, local[1] + struct.pack("=I", 0)
    return socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, local[1], bytes(4))
