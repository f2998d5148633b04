"""``ovpnctl server -c FILE``: a multi-client OpenVPN server on if_ovpn (dco spec §4.1, §4.2).

The control channel is :class:`~bsd_ovpn.proto.server.ServerEndpoint`; the
data channel is the kernel (or the userspace engine).  This module is the
glue between them and nothing more:

* datagrams and time go into the endpoint; its events come out and go to
  :meth:`ServerDaemon._on_event`, which asks :class:`~bsd_ovpn.daemon.loop.IfOvpnPeers`
  for the if_ovpn calls;
* kernel notifications (DEL_PEER/TIMEOUT, ROTATE_KEY, FLOAT) go back into the
  sessions;
* per-client things OpenVPN does around that: address pool and
  client-config-dir, iroutes, auth-user-pass-verify scripts, status.

:class:`ServerDaemon` takes its I/O objects from the caller, so unit tests
drive it with a RecordingTransport and an in-memory client;
:func:`run_server` opens the real ones.
"""
from __future__ import annotations

import errno as _errno
import functools
import ipaddress
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bsd_ovpn import config as configmod
from bsd_ovpn.errors import ConfigError, LocalProtocolError, OvpnError
from bsd_ovpn.ifovpn import Command, DelReason
from bsd_ovpn.interface import Float, Interface, PeerDeleted, PipelineFailure, RotateKey
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.keymethod import IVProto
from bsd_ovpn.proto.server import ClientEvent, ServerEndpoint, ServerSettings
from bsd_ovpn.proto.session import RESTART_LINGER, Session, SessionSettings
from bsd_ovpn.settings import tls_config_from
from bsd_ovpn.binding import release_free_heap
from bsd_ovpn.daemon.control import ClientStatus, DaemonStatus, format_addr
from bsd_ovpn.daemon.heap import HeapTrimmer
from bsd_ovpn.daemon.loop import ENGINE_DRAIN_SPACING, IfOvpnPeers, DaemonError, log
from bsd_ovpn.daemon.netcfg import NetConfig
from bsd_ovpn.daemon.poolpersist import PoolPersistence

#: kernel routes for iroutes get this metric, as OpenVPN's DCO code installs them
IROUTE_METRIC = 100
#: SIGTERM: how long the loop waits for the RESTARTs to be acked (each session gives
#: up after RESTART_LINGER by itself; a little slack so the loop sees that happen)
SHUTDOWN_LINGER = RESTART_LINGER + 0.5
AUTH_SCRIPT_TIMEOUT = 30.0

Addr = Any


# --------------------------------------------------------------------------- addresses

class AddressPool:
    """``ifconfig-pool`` / ``server``'s pool (IPv4) and ``ifconfig-ipv6-pool`` (IPv6).

    Addresses are handed out lowest-free-first and kept per peer id until the
    client leaves; ``ifconfig-push`` from a client-config-dir file overrides.
    """

    def __init__(self, cfg: configmod.Config) -> None:
        self.v4: list[ipaddress.IPv4Address] = []
        self.netmask: str | None = None
        if cfg.ifconfig_pool is not None:
            start = ipaddress.IPv4Address(cfg.ifconfig_pool.start)
            end = ipaddress.IPv4Address(cfg.ifconfig_pool.end)
            self.v4 = [ipaddress.IPv4Address(a) for a in range(int(start), int(end) + 1)]
            self.netmask = cfg.ifconfig_pool.netmask
        self.v6_base: ipaddress.IPv6Interface | None = None
        if cfg.ifconfig_ipv6_pool is not None:
            self.v6_base = ipaddress.IPv6Interface(cfg.ifconfig_ipv6_pool)
        self.v6_local = (ipaddress.IPv6Interface(cfg.ifconfig_ipv6[0])
                         if cfg.ifconfig_ipv6 is not None else None)
        self._v4_used: dict[int, ipaddress.IPv4Address] = {}
        self._v6_used: dict[int, ipaddress.IPv6Address] = {}
        # lowest-free-first in O(1) amortised (1000 clients at once): addresses in use
        # (as ints, counted: a ccd address may be shared) and an index below which
        # every pool address is in use
        self._taken: dict[int, int] = {}
        self._v4_hint = 0
        self._v6_hint = 0
        self._v6_size = 0
        if self.v6_base is not None:
            last = int(self.v6_base.network.broadcast_address)
            self._v6_size = max(0, min(65536, last - int(self.v6_base.ip) + 1))

    def _take(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        k = (ip.version << 128) | int(ip)
        self._taken[k] = self._taken.get(k, 0) + 1

    def _is_taken(self, version: int, ip: int) -> bool:
        return ((version << 128) | ip) in self._taken

    def _put_back(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        k = (ip.version << 128) | int(ip)
        n = self._taken.get(k, 0) - 1
        if n > 0:
            self._taken[k] = n
            return
        self._taken.pop(k, None)
        if ip.version == 4 and self.v4:
            i = int(ip) - int(self.v4[0])
            if 0 <= i < len(self.v4):
                self._v4_hint = min(self._v4_hint, i)
        elif ip.version == 6 and self.v6_base is not None:
            i = int(ip) - int(self.v6_base.ip)
            if 0 <= i < self._v6_size:
                self._v6_hint = min(self._v6_hint, i)

    def free_in_pool(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """``ip`` belongs to the pool and nobody has it (ifconfig-pool-persist's wish)."""
        if ip is None or self._is_taken(ip.version, int(ip)):
            return False
        if ip.version == 4:
            return bool(self.v4) and int(self.v4[0]) <= int(ip) <= int(self.v4[-1])
        if self.v6_base is None:
            return False
        return 0 <= int(ip) - int(self.v6_base.ip) < self._v6_size

    def allocate(self, peer_id: int, fixed4: ipaddress.IPv4Address | None = None,
                 fixed6: ipaddress.IPv6Address | None = None, *,
                 prefer4: ipaddress.IPv4Address | None = None,
                 prefer6: ipaddress.IPv6Address | None = None
                 ) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
        """``fixed*``: client-config-dir addresses; ``prefer*``: taken when still free
        in the pool (ifconfig-pool-persist), else the lowest free one."""
        if peer_id not in self._v4_used:
            ip4 = fixed4
            if ip4 is None and self.free_in_pool(prefer4):
                ip4 = prefer4
            if ip4 is None and self.v4:
                i, first = self._v4_hint, int(self.v4[0])
                while i < len(self.v4) and self._is_taken(4, first + i):
                    i += 1
                if i >= len(self.v4):
                    raise DaemonError(f"IPv4 address pool exhausted ({len(self.v4)} addresses)")
                self._v4_hint = i + 1
                ip4 = self.v4[i]
            if ip4 is not None:
                self._v4_used[peer_id] = ip4
                self._take(ip4)
        if peer_id not in self._v6_used:
            ip6 = fixed6
            if ip6 is None and self.free_in_pool(prefer6):
                ip6 = prefer6
            if ip6 is None and self.v6_base is not None:
                i, base = self._v6_hint, int(self.v6_base.ip)
                while i < self._v6_size and self._is_taken(6, base + i):
                    i += 1
                if i >= self._v6_size:
                    raise DaemonError("IPv6 address pool exhausted")
                self._v6_hint = i + 1
                ip6 = ipaddress.IPv6Address(base + i)
            if ip6 is not None:
                self._v6_used[peer_id] = ip6
                self._take(ip6)
        return self._v4_used.get(peer_id), self._v6_used.get(peer_id)

    def release(self, peer_id: int) -> None:
        for used in (self._v4_used, self._v6_used):
            ip = used.pop(peer_id, None)
            if ip is not None:
                self._put_back(ip)


# --------------------------------------------------------------------------- per client

@dataclass(slots=True)
class ClientRecord:
    """What the daemon knows about one client beyond its session (slots: a server
    keeps thousands)."""

    peer_id: int
    addr: Addr
    session: Session | None = None
    common_name: str | None = None
    username: str | None = None
    vpn_ipv4: ipaddress.IPv4Address | None = None
    vpn_ipv6: ipaddress.IPv6Address | None = None
    ccd: configmod.CCDConfig | None = None
    iroutes: list[tuple[Any, str]] = field(default_factory=list)   # (network, via)
    connected_since: float | None = None
    last_handshake: float | None = None
    key_id: int | None = None
    cipher: str | None = None
    pushed: tuple[str, ...] = ()


@functools.lru_cache(maxsize=8192)
def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str | None:
    """str() of a pool address, remembered: the status file lists every client every
    second, and IPv6Address.__str__ is slow enough to show in a 1000-client profile."""
    return str(ip) if ip else None


# --------------------------------------------------------------------------- the daemon

#: Longest a batch of datagrams is processed before the replies so far are sent (s).
PUMP_INTERVAL = 0.01

#: ConnectionTerminated reasons of a session that never finished its handshake.
_HANDSHAKE_FAILURES = frozenset({"tls-error", "hand-window"})


class ServerDaemon:
    """The glue of one server: endpoint events <-> if_ovpn, plus OpenVPN's server extras."""

    def __init__(self, cfg: configmod.Config, *, ifc: Interface, sock: Any,
                 send: Callable[[bytes, Addr], None], netcfg: Any = None,
                 engine: str = "kernel", clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 call_soon: Callable[[Callable[[], None]], None] | None = None,
                 cookie_jar: Any = None,
                 send_from: Callable[[bytes, Addr, Any], None] | None = None) -> None:
        check_server_config(cfg)
        self.cfg = cfg
        self.ifc = ifc
        self.sock = sock
        self.send = send
        #: multihome: send(data, addr) from a given local address (see pktinfo.py)
        self.send_from = send_from
        self.netcfg = netcfg if netcfg is not None else NetConfig()
        self.engine = engine
        self.clock = clock
        self.wall = wall
        self.call_soon = call_soon or (lambda fn: fn())
        #: new clients whose iroutes wait for their batch of if_ovpn steps (pump)
        self._iroutes_due: list[ClientRecord] = []
        self.dc = IfOvpnPeers(ifc, sock, clock=clock, drain_spacing=ENGINE_DRAIN_SPACING
                              if engine == "userspace" else 0.0)
        self.pool = AddressPool(cfg)
        pp = cfg.ifconfig_pool_persist
        self.heap = HeapTrimmer(release_free_heap)
        self.persist = PoolPersistence(pp.path if pp else None, pp.seconds if pp else 0)
        self.records: dict[int, ClientRecord] = {}
        # connected clients by common name (duplicate-cn checks without a walk)
        self._connected_by_cn: dict[str, set[int]] = {}
        self._indexed_cn: dict[int, str] = {}
        self.started = wall()
        self.stopping = False
        self.endpoint = ServerEndpoint(self._server_settings(cfg),
                                       wrap_factory=_wrap_factory(cfg),
                                       tls_crypt_v2=_v2_server(cfg), cookie_jar=cookie_jar)

    # ------------------------------------------------------------------ setup
    def setup_interface(self) -> None:
        """Address and MTU of the server's interface (the kernel keeps it down until START_VPN)."""
        c = self.cfg
        self.netcfg.set_mtu(self.ifc.name, c.tun_mtu)
        if c.ifconfig is not None:
            local, mask = c.ifconfig
            self.netcfg.add_address(self.ifc.name,
                                    ipaddress.IPv4Interface(f"{local}/{mask}"))
        if c.ifconfig_ipv6 is not None:
            self.netcfg.add_address(self.ifc.name, ipaddress.IPv6Interface(c.ifconfig_ipv6[0]))
        self._note_client_to_client()

    def _note_client_to_client(self) -> None:
        """Say what decides client<->client traffic; ovpnctl never forwards it itself.

        if_ovpn (like OpenVPN's DCO) hands every decrypted packet to the host's
        IP stack, which routes it back out of the interface to the other
        client.  So ``client-to-client`` is accepted for compatibility and the
        host's forwarding setting and firewall decide, with or without it.
        """
        fwd = getattr(self.netcfg, "ip_forwarding", lambda: None)()
        name = self.ifc.name
        if self.cfg.client_to_client:
            if fwd is False:
                log.warning("client-to-client: IP forwarding is off on this host, so clients "
                            "cannot reach each other through %s (if_ovpn hands packets to the "
                            "host's IP stack); enable net.ipv4.ip_forward / "
                            "net.inet.ip.forwarding", name)
        elif fwd is not False:
            log.info("note: no client-to-client, but this host's IP stack forwards traffic "
                     "between clients (IP forwarding is %s); block traffic that comes in on "
                     "%s and goes out on %s in the firewall if clients must not reach each "
                     "other", "on" if fwd else "unknown", name, name)

    def _server_settings(self, cfg: configmod.Config) -> ServerSettings:
        session = SessionSettings(
            server=True, tls=tls_config_from(cfg), data_ciphers=tuple(cfg.data_ciphers),
            data_ciphers_fallback=cfg.data_ciphers_fallback, hand_window=float(cfg.hand_window),
            reneg_sec=float(cfg.reneg_sec), tran_window=float(cfg.tran_window),
            tls_timeout=float(cfg.tls_timeout),
            tls_auth_keydir=(cfg.tls_auth.direction if cfg.tls_auth is not None else None),
            push_options=(), client_push=self._client_push, auth_verify=self._auth_verify,
            ping=0.0, ping_restart=0.0)          # the kernel runs the keepalive
        force = bool(cfg.tls_crypt_v2 is not None and cfg.tls_crypt_v2.force_cookie)
        return ServerSettings(session, max_clients=cfg.max_clients or 1024, force_cookie=force)

    # ------------------------------------------------------------------ driving
    def datagram_received(self, data: bytes, addr: Addr, now: float, local: Any = None) -> None:
        self.datagrams_received([(data, addr, local)], now)

    def datagrams_received(self, batch: list[tuple[bytes, Addr, Any]], now: float) -> None:
        """A batch read in one wake-up: into the endpoint, pumping every PUMP_INTERVAL.

        Pumping per batch rather than per datagram keeps the work per datagram
        constant while 1000 clients handshake at once; but a batch of 256
        datagrams that each carry a TLS step is ~0.25 s of work, and holding
        every reply until its end added that to each round trip of every
        handshake.  So whatever is ready goes out every PUMP_INTERVAL of
        processing, and once more at the end.  ``local`` (may be None) is the
        server address each datagram was sent to (multihome).
        """
        clock = self.clock
        pump_at = clock() + PUMP_INTERVAL
        for data, addr, local in batch:
            if self.stopping:
                # shutting down: no new clients, and no new session from a known address
                # either (a client that got RESTART reconnects at once; answering it would
                # start a handshake that dies with us and waits out its hand-window)
                s = self.endpoint.session_for(addr)
                if s is None or (len(data) >= 9 and s.remote_sid is not None
                                 and bytes(data[1:9]) != s.remote_sid):
                    continue
            self.endpoint.receive_datagram(data, addr, now, local)
            if clock() >= pump_at:
                self.pump(now)
                pump_at = clock() + PUMP_INTERVAL
        # an acked RESTART/EXIT makes the session's get_timer() due now: wake() ends it
        self.pump(now)

    def deadline(self) -> float | None:
        times = [t for t in (self.endpoint.get_timer(), self.heap.deadline(),
                             self.dc.drain_deadline()) if t is not None]
        return min(times) if times else None

    def wake(self, now: float) -> None:
        """After every wake-up: due timers, then whatever the kernel queued."""
        t = self.endpoint.get_timer()
        if t is not None and t <= now:
            self.endpoint.handle_timer(now)
        self.handle_notifications(now)
        self.pump(now)
        self.persist.tick(now)
        self.heap.tick(now)

    def pump(self, now: float) -> None:
        """Events first (so the kernel knows a peer before its PUSH_REPLY leaves), then datagrams."""
        for _ in range(1000):
            batch: list[ClientEvent] = []
            while (ce := self.endpoint.next_event()) is not None:
                batch.append(ce)
            ending = {ce.peer_id for ce in batch if isinstance(ce.event, ev.ConnectionTerminated)}
            # every client's if_ovpn steps of this batch in one engine round trip
            # (the kernel runs them one by one); failures come back per client
            failures: list[PipelineFailure] = []
            with self.ifc.pipelined(collect=failures):
                for ce in batch:
                    try:
                        self._on_event(ce, now, ending)
                    except (OvpnError, OSError) as exc:
                        self._fail_client(ce.peer_id, f"{type(exc).__name__}: {exc}", now)
            for f in failures:
                if f.command is Command.OVPN_DEL_PEER and f.error.errno == _errno.ENOENT:
                    continue                    # already gone: what DEL_PEER wanted
                if f.peer_id is not None:
                    self._fail_client(f.peer_id, f"{type(f.error).__name__}: {f.error}", now)
            # iroutes go via the client's VPN address: only once START_VPN brought the
            # link up and only for clients whose steps all succeeded
            due, self._iroutes_due = self._iroutes_due, []
            for rec in due:
                if self.records.get(rec.peer_id) is rec and rec.peer_id in self.dc.peers:
                    self._add_iroutes(rec)
            out = self.endpoint.datagrams_to_send_from(now)
            for data, addr, local in out:
                if local is not None and self.send_from is not None:
                    self.send_from(data, addr, local)
                else:
                    self.send(data, addr)
            if not batch and not out:
                return

    # ------------------------------------------------------------------ events -> actions
    def _on_event(self, ce: ClientEvent, now: float, ending: set[int]) -> None:
        e, pid = ce.event, ce.peer_id
        rec = self.records.get(pid)
        if rec is None:
            if not isinstance(e, (ev.HandshakeComplete, ev.PeerAuthenticated, ev.AuthRequest,
                                  ev.KeysReady)):
                if isinstance(e, ev.ConnectionTerminated):
                    self.heap.note()
                if isinstance(e, ev.ConnectionTerminated) and e.reason in _HANDSHAKE_FAILURES:
                    # refused before it became a client (wrong CA, revoked, EKU...):
                    # the admin's only clue, as OpenVPN's "TLS Error" lines
                    log.info("client %s: TLS handshake failed: %s", format_addr(ce.addr),
                             e.message)
                return                          # the tail of a session we already dropped
            rec = self.records[pid] = ClientRecord(pid, ce.addr,
                                                   self.endpoint.session_by_peer_id(pid))
        rec.addr = ce.addr
        if isinstance(e, ev.HandshakeComplete):
            rec.common_name = e.peer_common_name
            self._index_cn(rec)
        elif isinstance(e, ev.PeerAuthenticated):
            rec.username = e.username or rec.username
            rec.common_name = self._effective_cn(e.peer_common_name, rec.username)
            self._index_cn(rec)
            if e.key_id == 0:
                self._enforce_unique_cn(rec, now)
        elif isinstance(e, ev.AuthRequest):
            self._start_auth_script(rec, e)
        elif isinstance(e, ev.KeysReady):
            new = pid not in self.dc.peers
            # held by pump()'s pipelined block: NEW_PEER, SET_PEER, NEW_KEY and START_VPN
            # leave with every other client's steps of the batch, in one round trip
            if new:
                self._add_peer(rec)
            self.dc.apply(pid, e)
            if new:
                self._iroutes_due.append(rec)   # step 5, once the link is up (pump)
            rec.last_handshake = self.wall()
            rec.cipher = e.keys.cipher
            self.heap.note()                    # its TLS handshake is over
            if rec.key_id is None:
                rec.key_id = e.key_id
                rec.connected_since = self.wall()
                self._index_cn(rec)
                log.info("peer %d %s (%s) connected: %s, vpn %s", pid, rec.common_name,
                         format_addr(rec.addr), e.keys.cipher, rec.vpn_ipv4)
        elif isinstance(e, ev.SwapKeys):
            if pid not in ending:
                self.dc.apply(pid, e)
            rec.key_id = e.key_id
        elif isinstance(e, ev.DeleteKey):
            if pid not in ending:            # DEL_PEER follows: no key dance needed
                self.dc.apply(pid, e)
        elif isinstance(e, ev.PushReplySent):
            rec.pushed = e.options
        elif isinstance(e, ev.AuthFailed):
            log.info("peer %d %s: authentication failed: %s", pid, rec.common_name, e.reason)
        elif isinstance(e, ev.ConnectionTerminated):
            self._remove_client(rec, f"{e.reason}: {e.message}")
            self.heap.note()

    def _add_peer(self, rec: ClientRecord) -> None:
        """NEW_PEER + SET_PEER (dco spec §4.2 steps 2-3)."""
        self._allocate(rec)
        self.dc.new_peer(rec.peer_id, rec.addr, vpn_ipv4=rec.vpn_ipv4, vpn_ipv6=rec.vpn_ipv6,
                         local=self._peer_local(rec.peer_id))
        self.dc.set_keepalive(rec.peer_id, self.cfg.ping, self.cfg.ping_restart)

    def _peer_local(self, peer_id: int) -> Any:
        """multihome: NEW_PEER's ``local`` = the address the client talks to (port 0: the
        socket's), so the data channel answers from it too, as OpenVPN does."""
        if not self.cfg.multihome:
            return None
        local = self.endpoint.local_for(peer_id)
        to_sockaddr = getattr(local, "sockaddr_for", None)
        if to_sockaddr is None:
            return None
        return to_sockaddr(getattr(self.sock, "family", socket.AF_INET))

    def _add_iroutes(self, rec: ClientRecord) -> None:
        """iroutes become routes via the client's VPN address (dco spec §4.2 step 5)."""
        for net, via in self._iroutes(rec):
            try:
                self.netcfg.add_route(self.ifc.name, net, via, metric=IROUTE_METRIC)
                rec.iroutes.append((net, via))
            except OvpnError as exc:
                log.warning("peer %d: iroute %s: %s", rec.peer_id, net, exc)

    def _remove_client(self, rec: ClientRecord, why: str) -> None:
        log.info("peer %d %s (%s) disconnected: %s", rec.peer_id, rec.common_name,
                 format_addr(rec.addr), why)
        for net, via in rec.iroutes:
            try:
                self.netcfg.del_route(self.ifc.name, net, via, metric=IROUTE_METRIC)
            except OvpnError as exc:
                log.warning("peer %d: removing iroute %s: %s", rec.peer_id, net, exc)
        rec.iroutes.clear()
        try:
            self.dc.del_peer(rec.peer_id)
        except OvpnError as exc:
            log.warning("peer %d: DEL_PEER: %s", rec.peer_id, exc)
        self.pool.release(rec.peer_id)
        self._unindex_cn(rec.peer_id)
        self.records.pop(rec.peer_id, None)

    def _fail_client(self, peer_id: int, why: str, now: float) -> None:
        """An if_ovpn call for this client failed: drop the client, keep the server."""
        log.error("peer %d: %s; disconnecting it", peer_id, why)
        s = self.endpoint.session_by_peer_id(peer_id)
        if s is not None and s.terminated is None:
            s.close(now, linger=0.0)
            self.endpoint.handle_timer(now)
        rec = self.records.get(peer_id)
        if rec is not None and (s is None or s.terminated is not None):
            self._remove_client(rec, why)

    # ------------------------------------------------------------------ kernel -> sessions
    def handle_notifications(self, now: float) -> None:
        for n in self.dc.drain():
            rec = self.records.get(n.peer_id)
            if isinstance(n, PeerDeleted):
                if n.reason == DelReason.REQUESTED or rec is None:
                    continue                 # our own DEL_PEER / destroy
                self.dc.forget(n.peer_id)
                log.info("peer %d %s: keepalive timeout (ping-restart), dropping it",
                         n.peer_id, rec.common_name)
                # the client is gone (or cut off): nobody to say goodbye to
                s = rec.session
                if s is not None and s.terminated is None:
                    try:
                        self.endpoint.drop_client(n.peer_id, "ping-restart",
                                                  "keepalive timeout (DEL_PEER TIMEOUT)")
                    except LocalProtocolError:   # the endpoint had already let it go
                        self._remove_client(rec, "keepalive timeout (DEL_PEER TIMEOUT)")
            elif isinstance(n, RotateKey):
                s = rec.session if rec is not None else None
                if s is not None and s.terminated is None:
                    try:
                        s.renegotiate(now)
                    except LocalProtocolError as exc:
                        log.debug("peer %d: ROTATE_KEY ignored: %s", n.peer_id, exc)
                    self.endpoint.touch(n.peer_id)
            elif isinstance(n, Float):
                if rec is not None:
                    self._float(rec, n)
        self.pump(now)

    def _float(self, rec: ClientRecord, n: Float) -> None:
        new = (str(n.address.address), n.address.port)
        if self.sock.family == socket.AF_INET6 and n.address.address.version == 4:
            new = (f"::ffff:{n.address.address}", n.address.port, 0, 0)
        elif n.address.address.version == 6:
            new = (str(n.address.address), n.address.port, 0, n.address.scope_id)
        log.info("peer %d %s floated from %s to %s", rec.peer_id, rec.common_name,
                 format_addr(rec.addr), format_addr(new))
        try:
            self.endpoint.float_client(rec.peer_id, new)
        except LocalProtocolError as exc:
            log.debug("FLOAT for peer %d ignored: %s", rec.peer_id, exc)
            return
        rec.addr = new

    # ------------------------------------------------------------------ per-client config
    def _ccd(self, rec: ClientRecord) -> configmod.CCDConfig | None:
        d, cn = self.cfg.client_config_dir, rec.common_name
        if d is None or not cn:
            return None
        if rec.ccd is not None:
            return rec.ccd
        if "/" in cn or cn in (".", ".."):
            return None
        path = os.path.join(d, cn)
        if not os.path.isfile(path):
            path = os.path.join(d, "DEFAULT")
            if not os.path.isfile(path):
                return None
        rec.ccd = configmod.load_ccd(path)
        return rec.ccd

    def _allocate(self, rec: ClientRecord) -> None:
        ccd = self._ccd(rec)
        fixed4 = fixed6 = None
        if ccd is not None and ccd.ifconfig_push is not None:
            fixed4 = ipaddress.IPv4Address(ccd.ifconfig_push[0])
        if ccd is not None and ccd.ifconfig_ipv6_push is not None:
            fixed6 = ipaddress.IPv6Interface(ccd.ifconfig_ipv6_push[0]).ip
        p4, p6 = self.persist.preferred(rec.common_name)
        rec.vpn_ipv4, rec.vpn_ipv6 = self.pool.allocate(rec.peer_id, fixed4, fixed6,
                                                        prefer4=p4, prefer6=p6)
        if fixed4 is None and fixed6 is None:
            self.persist.note(rec.common_name, rec.vpn_ipv4, rec.vpn_ipv6)

    def _iroutes(self, rec: ClientRecord) -> list[tuple[Any, str]]:
        ccd = self._ccd(rec)
        out: list[tuple[Any, str]] = []
        if ccd is None:
            return out
        if rec.vpn_ipv4 is not None:
            for r in ccd.iroutes:
                spec = r.network if r.netmask is None else f"{r.network}/{r.netmask}"
                out.append((ipaddress.ip_network(spec, strict=False), str(rec.vpn_ipv4)))
        if rec.vpn_ipv6 is not None:
            for r in ccd.iroutes_ipv6:
                out.append((ipaddress.ip_network(r.network, strict=False), str(rec.vpn_ipv6)))
        return out

    def _client_push(self, session: Session) -> list[str]:
        """The PUSH_REPLY body (the session appends peer-id, cipher, protocol-flags)."""
        pid = session.peer_id if session.peer_id is not None else -1
        rec = self.records.get(pid)
        if rec is None:
            addr = self.endpoint.client_addr(pid)
            rec = self.records[pid] = ClientRecord(pid, addr, session,
                                                   session.peer_common_name)
        if self.cfg.username_as_common_name and session.username \
                and rec.common_name != session.username:
            rec.common_name, rec.ccd = session.username, None
            self._index_cn(rec)
        self._allocate(rec)
        ccd = self._ccd(rec)
        opts = [] if ccd is not None and ccd.push_reset else list(self.cfg.push)
        if ccd is not None:
            opts = [o for o in opts if not any(o.split()[0] == r or o.startswith(r)
                                               for r in ccd.push_remove)]
            opts += ccd.push
        if rec.vpn_ipv4 is not None:
            if ccd is not None and ccd.ifconfig_push is not None:
                mask = ccd.ifconfig_push[1]
            elif self.pool.netmask is not None:
                mask = self.pool.netmask
            else:
                assert self.cfg.ifconfig is not None     # topology subnet: (local, netmask)
                mask = self.cfg.ifconfig[1]
            opts.append(f"ifconfig {rec.vpn_ipv4} {mask}")
        if rec.vpn_ipv6 is not None:
            bits = self.pool.v6_base.network.prefixlen if self.pool.v6_base else 64
            local = self.pool.v6_local.ip if self.pool.v6_local is not None else ""
            opts.append(f"ifconfig-ipv6 {rec.vpn_ipv6}/{bits} {local}".rstrip())
        return opts

    def _auth_verify(self, req: ev.AuthRequest) -> object:
        """Session hook: DATA_V2, ccd rules now; a configured script decides later (deferred)."""
        try:
            proto = int(req.peer_info.get("IV_PROTO", "0"))
        except ValueError:
            proto = 0
        if not proto & IVProto.DATA_V2:
            return (False, "client does not support the P_DATA_V2 packet format, which "
                    "if_ovpn needs (upgrade the client to OpenVPN 2.4 or later)")
        cn = self._effective_cn(req.peer_common_name, req.username)
        if self.cfg.client_config_dir is not None and cn:
            tmp = ClientRecord(-1, None, None, cn)
            try:
                ccd = self._ccd(tmp)
            except ConfigError as exc:
                return (False, f"bad client-config-dir file: {exc}")
            if ccd is None and self.cfg.ccd_exclusive:
                return (False, "no client-config-dir file (ccd-exclusive)")
            if ccd is not None and ccd.disable:
                return (False, "client disabled in client-config-dir")
        if self.cfg.auth_user_pass_verify is not None:
            return None
        if req.key_id == 0:
            self._replace_same_cn(cn)
        return True

    def _effective_cn(self, cert_cn: str | None, username: str | None) -> str | None:
        """``username-as-common-name``: the username stands for the certificate's CN
        everywhere a common name is used (ccd, duplicate-cn, status, kill)."""
        if self.cfg.username_as_common_name and username:
            return username
        return cert_cn

    def _start_auth_script(self, rec: ClientRecord, req: ev.AuthRequest) -> None:
        """auth-user-pass-verify, run on a worker thread; the answer comes back on the loop."""
        v = self.cfg.auth_user_pass_verify
        assert v is not None
        session = rec.session
        env = dict(os.environ, script_type="user-pass-verify",
                   common_name=req.peer_common_name or "", username=req.username or "")
        if rec.addr is not None:
            env.update(untrusted_ip=str(rec.addr[0]), untrusted_port=str(rec.addr[1]))
        env.update(self.cfg.setenv)
        user, pw = req.username or "", req.password or ""

        def work() -> None:
            ok, reason = run_auth_script(v.command, v.method, user, pw, env)
            self.call_soon(lambda: self._auth_done(rec.peer_id, session, req.key_id, ok, reason))

        from bsd_ovpn.daemon.loop import thread
        thread(work, f"auth-{rec.peer_id}")

    def _auth_done(self, peer_id: int, session: Session | None, key_id: int, ok: bool,
                   reason: str) -> None:
        if session is None or session.terminated is not None:
            return
        now = self.clock()
        try:
            session.set_auth_result(key_id, ok, reason, now=now)
        except LocalProtocolError as exc:
            log.debug("peer %d: late auth result ignored: %s", peer_id, exc)
        self.endpoint.touch(peer_id)
        self.pump(now)

    def _replace_same_cn(self, cn: str | None, keep: ClientRecord | None = None) -> None:
        """Without duplicate-cn a common name has one session: a reconnecting client
        replaces its old one at once (so it gets its old address back).

        Called for every new client, so it looks the name up in an index of the
        connected clients instead of walking them all."""
        if self.cfg.duplicate_cn or not cn:
            return
        now = self.clock()
        for pid in sorted(self._connected_by_cn.get(cn, ())):
            other = self.records.get(pid)
            if other is None:
                continue
            if other is not keep and other.common_name == cn and other.connected_since is not None:
                log.info("peer %d: common name %s connected again; dropping the old session",
                         other.peer_id, cn)
                self.kill_peer(other.peer_id, now)
                if other.peer_id in self.records:
                    self._remove_client(other, "replaced by a new connection")

    def _index_cn(self, rec: ClientRecord) -> None:
        """(Re)file a connected client under its current common name."""
        self._unindex_cn(rec.peer_id)
        if rec.connected_since is not None and rec.common_name:
            self._connected_by_cn.setdefault(rec.common_name, set()).add(rec.peer_id)
            self._indexed_cn[rec.peer_id] = rec.common_name

    def _unindex_cn(self, peer_id: int) -> None:
        cn = self._indexed_cn.pop(peer_id, None)
        if cn is not None:
            ids = self._connected_by_cn.get(cn)
            if ids is not None:
                ids.discard(peer_id)
                if not ids:
                    del self._connected_by_cn[cn]

    def _enforce_unique_cn(self, rec: ClientRecord, now: float) -> None:
        self._replace_same_cn(rec.common_name, keep=rec)

    # ------------------------------------------------------------------ control
    def kill(self, target: str, now: float) -> list[int]:
        """``ovpnctl kill CN|PEER_ID``: RESTART to the client(s), then drop them."""
        ids = [r.peer_id for r in self.records.values()
               if r.common_name == target or str(r.peer_id) == target]
        if not ids:
            raise DaemonError(f"no client with common name or peer id {target!r}")
        for pid in ids:
            self.kill_peer(pid, now)
        self.pump(now)
        return ids

    def kill_peer(self, peer_id: int, now: float) -> None:
        try:
            self.endpoint.disconnect(peer_id, now, restart=True)
        except LocalProtocolError:
            rec = self.records.get(peer_id)
            if rec is not None:
                self._remove_client(rec, "killed")

    def status(self) -> DaemonStatus:
        stats = self.dc.stats() if self.records else {}
        clients = []
        for rec in sorted(self.records.values(), key=lambda r: r.peer_id):
            if rec.connected_since is None:
                continue
            st = stats.get(rec.peer_id)
            clients.append(ClientStatus(
                peer_id=rec.peer_id, common_name=rec.common_name, username=rec.username,
                real_address=format_addr(rec.addr),
                vpn_ipv4=_ip_text(rec.vpn_ipv4), vpn_ipv6=_ip_text(rec.vpn_ipv6),
                cipher=rec.cipher, key_id=rec.key_id, connected_since=rec.connected_since,
                last_handshake=rec.last_handshake,
                bytes_in=st.bytes_in if st else 0, bytes_out=st.bytes_out if st else 0,
                packets_in=st.packets_in if st else 0, packets_out=st.packets_out if st else 0,
                iroutes=[str(n) for n, _ in rec.iroutes]))
        local = None
        try:
            local = format_addr(self.sock.getsockname())
        except (OSError, AttributeError):
            pass
        return DaemonStatus(role="server", config=self.cfg.path, pid=os.getpid(),
                            engine=self.engine, interface=self.ifc.name, started=self.started,
                            state="stopping" if self.stopping else "running", clients=clients,
                            local=local, max_clients=self.endpoint.settings.max_clients)

    # ------------------------------------------------------------------ lifecycle
    def reload(self, cfg: configmod.Config) -> list[str]:
        """SIGHUP: take the new config for new sessions; connected clients stay.

        Returns the directives that need a restart to change (logged, kept old).
        """
        check_server_config(cfg)
        kept = [d for d, a, b in (
            ("port", self.cfg.lport or self.cfg.port, cfg.lport or cfg.port),
            ("proto", self.cfg.proto, cfg.proto), ("local", self.cfg.local, cfg.local),
            ("dev", self.cfg.dev, cfg.dev), ("server", self.cfg.server, cfg.server),
            ("server-ipv6", self.cfg.server_ipv6, cfg.server_ipv6),
            ("tun-mtu", self.cfg.tun_mtu, cfg.tun_mtu)) if a != b]
        new_settings = self._server_settings(cfg)
        self.cfg = cfg
        self.endpoint.settings = new_settings
        self.endpoint.wrap_factory = _wrap_factory(cfg)
        self.endpoint.tls_crypt_v2 = _v2_server(cfg)
        for rec in self.records.values():
            rec.ccd = None if rec.connected_since is None else rec.ccd
        for d in kept:
            log.warning("reload: %s changed; that needs a restart (keeping the old value)", d)
        log.info("reloaded %s (%d clients kept)", cfg.path, len(self.records))
        return kept

    def reload_from_disk(self) -> list[str]:
        return self.reload(configmod.load(self.cfg.path))

    def finished(self) -> bool:
        return False                          # a server runs until a signal

    def exit_status(self) -> int:
        return 0

    def begin_shutdown(self, now: float) -> None:
        """SIGTERM: RESTART (and EXIT, if negotiated) to every client."""
        self.stopping = True
        for pid, _addr, s in self.endpoint.clients():
            if s.terminated is None:
                try:
                    self.endpoint.disconnect(pid, now, restart=True)
                except LocalProtocolError:
                    pass
        self.pump(now)

    def shutdown_done(self) -> bool:
        return not any(s.terminated is None for _p, _a, s in self.endpoint.clients())

    def close(self) -> None:
        """Destroy the interface (the kernel deletes every peer) and remove our routes."""
        self.persist.write()                  # ifconfig-pool-persist: at exit too
        if self.records:
            log.info("dropping %d clients: %s", len(self.records),
                     ", ".join(f"{r.peer_id} {r.common_name}" for r in self.records.values()))
        for rec in list(self.records.values()):
            for net, via in rec.iroutes:
                try:
                    self.netcfg.del_route(self.ifc.name, net, via, metric=IROUTE_METRIC)
                except OvpnError as exc:
                    log.warning("removing iroute %s: %s", net, exc)
            rec.iroutes.clear()
        self.records.clear()
        self._connected_by_cn.clear()
        self._indexed_cn.clear()
        self.netcfg.undo_all()
        try:
            self.ifc.close()
        except OvpnError as exc:                 # e.g. the engine already died with it
            log.warning("destroying %s: %s", self.ifc.name, exc)


# --------------------------------------------------------------------------- helpers

def check_server_config(cfg: configmod.Config) -> None:
    """What a DCO server needs beyond a valid OpenVPN config, as ConfigErrors."""
    def err(directive: str, msg: str) -> ConfigError:
        path, line = cfg.origins.get(directive, (cfg.path, None))
        return ConfigError(msg, path, line, directive)

    if not cfg.is_server or cfg.mode != "server":
        raise err("server", "ovpnctl server needs a server config ('server NET MASK' or "
                  "'mode server' + 'tls-server')")
    if cfg.topology != "subnet":
        raise err("topology", f"topology {cfg.topology}: if_ovpn servers need "
                  "'topology subnet' (as OpenVPN's DCO does)")
    if not cfg.proto.startswith("udp"):
        raise err("proto", f"proto {cfg.proto}: if_ovpn carries UDP only")
    if cfg.dev_type != "tun":
        raise err("dev", f"dev {cfg.dev}: if_ovpn is a tun (layer 3) device")
    if cfg.allow_compression not in ("no",):
        raise err("allow-compression", "if_ovpn cannot compress; use 'allow-compression no'")
    if cfg.auth_user_pass_verify is not None and cfg.script_security < 2:
        raise err("auth-user-pass-verify", "running the verify script needs "
                  "'script-security 2'")
    bad = [c for c in cfg.data_ciphers if c.upper() not in
           ("AES-128-GCM", "AES-192-GCM", "AES-256-GCM", "CHACHA20-POLY1305")]
    if bad:
        raise err("data-ciphers", f"data-ciphers {':'.join(bad)}: if_ovpn offers only AES-GCM "
                  "and CHACHA20-POLY1305")


def _wrap_factory(cfg: configmod.Config) -> Callable[[], Any] | None:
    if cfg.tls_crypt_v2 is not None and cfg.tls_auth is None and cfg.tls_crypt is None:
        return None
    return cfg.new_control_wrap


def _v2_server(cfg: configmod.Config) -> Any:
    if cfg.tls_crypt_v2 is None:
        return None
    from bsd_ovpn.proto.wrap import TLSCryptV2Server
    return TLSCryptV2Server(cfg.tls_crypt_v2.key)


def run_auth_script(command: str, method: str, username: str, password: str,
                    env: dict[str, str]) -> tuple[bool, str]:
    """Run an auth-user-pass-verify command: exit status 0 accepts.

    via-file: the last argument is a 0600 file with the username and password
    lines (deleted afterwards); via-env: ``username``/``password`` variables.
    """
    import shlex

    argv = shlex.split(command)
    tmp = None
    try:
        if method == "via-file":
            fd, tmp = tempfile.mkstemp(prefix="ovpnctl-auth-")
            with os.fdopen(fd, "w") as f:
                f.write(f"{username}\n{password}\n")
            argv.append(tmp)
        else:
            env = dict(env, password=password)
        res = subprocess.run(argv, env=env, capture_output=True, timeout=AUTH_SCRIPT_TIMEOUT)
        if res.returncode == 0:
            return True, ""
        return False, f"auth-user-pass-verify exited with {res.returncode}"
    except subprocess.TimeoutExpired:
        return False, f"auth-user-pass-verify did not finish in {AUTH_SCRIPT_TIMEOUT:g} s"
    except OSError as exc:
        return False, f"auth-user-pass-verify could not run: {exc.strerror}"
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------- real I/O

def bind_address(cfg: configmod.Config) -> tuple:
    """Where the server listens: ``local``/``lport``/``port``; udp6 binds dual-stack ``::``.

    A scoped link-local ``local fe80::a%eth0`` becomes ``(ip, port, 0, scope_id)``:
    bind() does not read the ``%scope`` text, getaddrinfo() does.
    """
    port = cfg.lport or cfg.port
    if cfg.local:
        if "%" in cfg.local:
            try:
                info = socket.getaddrinfo(cfg.local, port, socket.AF_INET6, socket.SOCK_DGRAM)
            except socket.gaierror as exc:
                raise DaemonError(f"local {cfg.local}: cannot resolve the scoped address "
                                  f"({exc.strerror})") from exc
            host, _port, flow, scope = info[0][4][:4]
            return (host.split("%", 1)[0], port, flow, scope)
        return (cfg.local, port)
    return ("::", port) if cfg.proto == "udp6" else ("0.0.0.0", port)


def socket_v6only(cfg: configmod.Config) -> bool | None:
    """IPV6_V6ONLY for the server socket: udp6 is dual-stack unless ``bind ipv6only``
    (None: leave an IPv4 socket alone)."""
    if cfg.proto == "udp6" or cfg.bind_ipv6only:
        return bool(cfg.bind_ipv6only)
    return None


#: the control socket's receive buffer: a burst of ~2500 small datagrams (1000 clients'
#: resets at once) while the loop is busy in TLS.  Linux's 208 KiB default holds ~250, and
#: each one dropped costs its client a 2-4-8 s retransmission back-off.
CONTROL_RCVBUF = 2 << 20


def _size_receive_buffer(sock: socket.socket) -> None:
    """Ask for CONTROL_RCVBUF; as root beyond net.core.rmem_max (SO_RCVBUFFORCE, Linux)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= CONTROL_RCVBUF:
            return
        force = getattr(socket, "SO_RCVBUFFORCE", 33 if os.uname().sysname == "Linux" else None)
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, CONTROL_RCVBUF)
                return
            except OSError:
                pass                         # not root: the capped one below
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CONTROL_RCVBUF)
    except OSError as exc:
        log.debug("SO_RCVBUF %d: %s", CONTROL_RCVBUF, exc)


def run_server(config_path: str, *, engine: str = "auto", engine_socket: str | None = None,
               control_socket: str | None = None) -> int:
    """``ovpnctl server``: set everything up, serve until SIGTERM, remove everything."""
    from bsd_ovpn.daemon.control import ControlServer, default_socket_path
    from bsd_ovpn.daemon.loop import Loop, create_interface, serve, tune_gc_for_server
    from bsd_ovpn.daemon.stale import InterfaceLedger
    from bsd_ovpn.engine.steering import make_udp_socket
    from bsd_ovpn.engines import engine_kind, open_transport

    cfg = configmod.load(config_path)
    check_server_config(cfg)
    transport = open_transport(engine, socket_path=engine_socket)
    loop = Loop()
    ifc = sock = control = daemon = ledger = None
    try:
        # a crashed daemon of this config left its interface in the kernel/engine
        ledger = InterfaceLedger(transport, config=config_path,
                                 control=control_socket or default_socket_path(config_path))
        ledger.sweep(cfg.dev or "tun")
        ifc = create_interface(transport, cfg.dev or "tun", ifmode="subnet")
        ledger.record(ifc.name)
        local = bind_address(cfg)
        try:
            sock = make_udp_socket(local, v6only=socket_v6only(cfg))
        except OSError as exc:
            raise DaemonError(f"cannot bind UDP {local[0]}:{local[1]}: {exc.strerror}") from exc
        sock.setblocking(False)
        _size_receive_buffer(sock)
        multihome = bool(cfg.multihome)
        if multihome:
            from bsd_ovpn.daemon import pktinfo
            try:
                pktinfo.enable(sock)
            except OSError as exc:
                raise DaemonError(f"multihome: cannot ask for packet info: {exc}") from exc

        def send(data: bytes, addr: Addr) -> None:
            try:
                sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                log.debug("UDP send buffer full; control packet to %s dropped", addr)
            except OSError as exc:
                log.debug("sendto %s: %s", addr, exc)

        def send_from(data: bytes, addr: Addr, local: Any) -> None:
            try:
                pktinfo.send(sock, data, addr, local)
            except (BlockingIOError, InterruptedError):
                log.debug("UDP send buffer full; control packet to %s dropped", addr)
            except OSError as exc:
                log.debug("sendmsg %s from %s: %s", addr, local, exc)

        daemon = ServerDaemon(cfg, ifc=ifc, sock=sock, send=send, engine=engine_kind(transport),
                              call_soon=loop.call_soon_threadsafe,
                              send_from=send_from if multihome else None)
        daemon.setup_interface()
        control = ControlServer(control_socket or default_socket_path(config_path),
                                lambda req: {})

        def on_udp() -> None:
            from bsd_ovpn.daemon.loop import read_datagrams_from
            now = loop.clock()
            # the whole batch, then one pump: O(1) work per datagram at any client count;
            # notifications are read by on_wake, which runs after every wake-up (the
            # kernel's EAGAIN wake-up that announces one included)
            daemon.datagrams_received(read_datagrams_from(sock, pktinfo=multihome), now)

        loop.add_reader(sock, on_udp)
        if cfg.writepid:
            with open(cfg.writepid, "w") as f:
                f.write(f"{os.getpid()}\n")
        log.info("server %s: interface %s, listening on %s, engine %s", cfg.path, ifc.name,
                 format_addr(sock.getsockname()), daemon.engine)
        tune_gc_for_server()
        return serve(daemon, loop, control=control, status_file=cfg.status,
                     status_version=cfg.status_version, user=cfg.user, group=cfg.group,
                     shutdown_linger=SHUTDOWN_LINGER)
    finally:
        if daemon is not None:
            daemon.pump(loop.clock())
            daemon.close()
        elif ifc is not None:
            ifc.close()
        if ledger is not None:
            ledger.release()
        if control is not None:
            control.close()
        if sock is not None:
            sock.close()
        loop.close()
        transport.close()
        if cfg.writepid:
            try:
                os.unlink(cfg.writepid)
            except OSError:
                pass
