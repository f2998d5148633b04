"""The server's control-channel demultiplexer, sans-IO (spec §6.2, §6.3, §15.1).

One UDP socket serves every client.  :class:`ServerEndpoint` routes each
control datagram to the :class:`~bsd_ovpn.proto.session.Session` of its
source address, and -- like a stock 2.6 UDP server -- keeps **no state at
all** for an address until it proves it can receive our packets: a client
reset is answered with a reset whose session id is an HMAC cookie
(:class:`~bsd_ovpn.proto.cookie.CookieJar`), and only a later packet that
acknowledges that reset with a valid cookie creates a session.  Spoofed
resets therefore cost one HMAC and one reply, never memory.

Driving is the aioquic shape with addresses: ``receive_datagram(data, addr,
now)``, ``datagrams_to_send(now) -> [(bytes, addr)]``, ``get_timer()``,
``handle_timer(now)``, ``next_event() -> ClientEvent | None``.

Work per call is independent of the number of clients: only sessions that
something happened to since the last call ("touched": a datagram, a due
timer, ``disconnect``/``drop_client``, a session handed out by
``session_for``/``session_by_peer_id``, or :meth:`ServerEndpoint.touch` after
driving a session directly) are visited, and deadlines live in a heap.
"""
from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bsd_ovpn.errors import LocalProtocolError, OvpnError, RemoteProtocolError
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.cookie import CookieJar
from bsd_ovpn.proto.packet import (
    EARLY_NEG_FLAG_RESEND_WKC, TLV_EARLY_NEG_FLAGS, ControlPacket, Opcode, PacketError,
    encode_tlvs, peek,
)
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.proto.states import KSState
from bsd_ovpn.proto.wrap import TLSCryptV2Server, early_negotiation_marker

log = logging.getLogger(__name__)

Addr = Any   # a socket address tuple as the I/O layer gives it


@dataclass(frozen=True)
class ClientEvent:
    """A session event tagged with the client it belongs to."""

    peer_id: int
    addr: Addr
    event: ev.Event


@dataclass
class ServerSettings:
    """Endpoint-wide settings; ``session`` is the per-client session template.

    ``pool`` (``server NET MASK``) makes the endpoint push ``route-gateway``,
    ``topology subnet`` and a per-client ``ifconfig`` (NET+2+peer_id); leave
    it None when the daemon pushes addresses through ``session.client_push``.
    """

    session: SessionSettings
    max_clients: int = 1024
    pool: ipaddress.IPv4Network | None = None
    force_cookie: bool = False


@dataclass(eq=False)
class _Client:
    addr: Addr
    peer_id: int
    session: Session
    metadata: bytes | None = None
    events: deque[ev.Event] = field(default_factory=deque)
    #: the server address the client's last datagram was sent to (multihome), opaque here
    local: Any = None
    #: the deadline this client's live timer-heap entry carries (None: no entry)
    deadline: float | None = None
    timer_seq: int = -1


class ServerEndpoint:
    """All clients of one server socket.

    ``wrap_factory`` returns a fresh per-session :class:`ControlWrap`
    (NoWrap / TLSAuth / TLSCrypt) or is None when only tls-crypt-v2 is
    configured; ``tls_crypt_v2`` holds the v2 server key if any.
    """

    def __init__(self, settings: ServerSettings, *,
                 wrap_factory: Callable[[], Any] | None,
                 tls_crypt_v2: TLSCryptV2Server | None = None,
                 cookie_jar: CookieJar | None = None) -> None:
        if not settings.session.server:
            raise LocalProtocolError("ServerEndpoint needs server-role session settings")
        if wrap_factory is None and tls_crypt_v2 is None:
            raise LocalProtocolError("ServerEndpoint needs a wrap factory or a tls-crypt-v2 key")
        self.settings = settings
        self.wrap_factory = wrap_factory
        self.tls_crypt_v2 = tls_crypt_v2
        self.cookies = cookie_jar or CookieJar(None, max(1, int(settings.session.hand_window)))
        self._clients: dict[Addr, _Client] = {}
        self._by_peer_id: dict[int, _Client] = {}
        self._stateless_out: list[tuple[bytes, Addr, Any]] = []
        self._events: deque[ClientEvent] = deque()
        # Per-datagram work must not grow with the number of clients (1000 clients
        # handshaking at once): only clients something happened to are visited for
        # output ("touched"), and deadlines sit in a heap with lazy deletion -- an
        # entry is live only while its seq is its client's timer_seq.
        self._touched: dict[_Client, None] = {}
        self._timers: list[tuple[float, int, _Client]] = []
        self._seq = itertools.count()
        # stateful sessions of legacy tls-crypt-v2 resets, oldest first: evictable while
        # the sender has not acknowledged our reset (a spoofed source never does)
        self._unproven: dict[_Client, None] = {}
        self.dropped = 0
        self.last_error: str | None = None
        self.cookie_resets_sent = 0
        # peer ids: the lowest free one is handed out.  Ids below _fresh_peer_id that
        # were freed sit in a min-heap, so allocating is O(log N), not a scan.
        self._free_peer_ids: list[int] = []
        self._fresh_peer_id = 0
        # (session template, pool) -> per-client settings with the pool push hook
        self._settings_cache: tuple[Any, Any, SessionSettings] | None = None
        self._pool_cache: tuple[Any, int, int, str, str] | None = None

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._clients)

    def session_for(self, addr: Addr) -> Session | None:
        """The session at ``addr``; it counts as touched (the caller may drive it)."""
        c = self._clients.get(addr)
        if c is None:
            return None
        self._touched[c] = None
        return c.session

    def session_by_peer_id(self, peer_id: int) -> Session | None:
        """The session of ``peer_id``; it counts as touched (the caller may drive it)."""
        c = self._by_peer_id.get(peer_id)
        if c is None:
            return None
        self._touched[c] = None
        return c.session

    def clients(self) -> list[tuple[int, Addr, Session]]:
        """Every client (O(N): status and shutdown only; all count as touched)."""
        for c in self._clients.values():
            self._touched[c] = None
        return [(c.peer_id, c.addr, c.session) for c in self._clients.values()]

    def client_addr(self, peer_id: int) -> Addr | None:
        """Where ``peer_id``'s control packets come from (None: no such client)."""
        c = self._by_peer_id.get(peer_id)
        return c.addr if c is not None else None

    def local_for(self, peer_id: int) -> Any:
        """The server address ``peer_id`` last sent to (``receive_datagram``'s ``local``)."""
        c = self._by_peer_id.get(peer_id)
        return c.local if c is not None else None

    def touch(self, peer_id: int) -> None:
        """Say that a session was driven directly (``set_auth_result``, ``renegotiate``,
        ``abort`` ...): its output and new deadline are picked up on the next call.
        Unknown peer ids are ignored (the session may have ended meanwhile)."""
        c = self._by_peer_id.get(peer_id)
        if c is not None:
            self._touched[c] = None

    # ------------------------------------------------------------------ driving
    def receive_datagram(self, data: bytes, addr: Addr, now: float, local: Any = None) -> bool:
        """Handle one datagram; False if it was dropped or is a data packet.

        ``local``: the address the datagram was sent to (multihome: the I/O layer
        read it with IP_PKTINFO); replies to ``addr`` carry it back (see
        :meth:`datagrams_to_send_from`).  Opaque here; None when not known.
        """
        data = bytes(data)
        try:
            opcode, key_id = peek(data)
        except PacketError as exc:
            return self._drop(str(exc))
        if opcode in (Opcode.P_DATA_V1, Opcode.P_DATA_V2):
            return False            # data channel: kernel / engine business
        client = self._clients.get(addr)
        if client is not None:
            if self._is_new_attempt(client, data, opcode):
                return self._stateless(data, addr, opcode, key_id, now, replaces=client,
                                       local=local)
            if local is not None:
                client.local = local
            ok = client.session.receive_datagram(data, now)
            if not ok:
                self.dropped += 1
                self.last_error = client.session.last_error
            self._touched[client] = None
            self._collect(client)
            return ok
        return self._stateless(data, addr, opcode, key_id, now, replaces=None, local=local)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        return [(d, a) for d, a, _local in self.datagrams_to_send_from(now)]

    def datagrams_to_send_from(self, now: float) -> list[tuple[bytes, Addr, Any]]:
        """Like :meth:`datagrams_to_send`, each with the ``local`` address to send from.

        Visits only the clients touched since the last call and those whose
        deadline has passed (a retransmission may be due), never all of them.
        """
        out = self._stateless_out
        self._stateless_out = []
        visit = self._touched
        self._touched = {}
        for c in self._pop_due(now):
            visit[c] = None
        for c in visit:
            if self._by_peer_id.get(c.peer_id) is not c:
                continue                    # ended meanwhile: nothing more leaves for it
            out.extend((d, c.addr, c.local) for d in c.session.datagrams_to_send(now))
            self._collect(c)
            self._reschedule(c)
        return out

    def get_timer(self) -> float | None:
        self._reschedule_touched()
        timers = self._timers
        while timers and timers[0][1] != timers[0][2].timer_seq:
            heapq.heappop(timers)           # stale entry (lazy deletion)
        return timers[0][0] if timers else None

    def handle_timer(self, now: float) -> None:
        """Run the timers of the sessions that are due (not of every session)."""
        self._reschedule_touched()
        for c in self._pop_due(now):
            c.session.handle_timer(now)
            self._touched[c] = None         # a retransmission or goodbye may be due now
            self._collect(c)
            self._reschedule(c)

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def disconnect(self, peer_id: int, now: float, *, restart: bool = False) -> None:
        """Say goodbye to one client and end its session.

        ``restart``: RESTART only, ended once acked or after RESTART_LINGER
        (``ovpnctl kill``, shutdown); otherwise EXIT if the client negotiated
        cc-exit (ended once acked or after EXIT_LINGER), else at once.
        """
        c = self._by_peer_id.get(peer_id)
        if c is None:
            raise LocalProtocolError(f"no client with peer_id {peer_id}")
        if restart:
            c.session.restart(now)
        else:
            c.session.close(now)
        self._touched[c] = None
        self._collect(c)

    def drop_client(self, peer_id: int, reason: str = "dropped",
                    message: str = "dropped by the server") -> None:
        """Forget one client at once (no goodbye), e.g. after if_ovpn's DEL_PEER TIMEOUT."""
        c = self._by_peer_id.get(peer_id)
        if c is None:
            raise LocalProtocolError(f"no client with peer_id {peer_id}")
        c.session.abort(reason, message)
        self._touched[c] = None
        self._collect(c)

    def float_client(self, peer_id: int, new_addr: Addr) -> None:
        """Move a client's control channel to ``new_addr`` (if_ovpn reported FLOAT).

        The data channel already authenticated packets from there, so the
        control packets will come from the new address too.  A stale client
        sitting at ``new_addr`` is ended as ``replaced``.
        """
        c = self._by_peer_id.get(peer_id)
        if c is None:
            raise LocalProtocolError(f"no client with peer_id {peer_id}")
        if c.addr == new_addr:
            return
        stale = self._clients.get(new_addr)
        if stale is not None:
            self._remove(stale, f"peer_id {peer_id} floated to its address")
        self._clients.pop(c.addr, None)
        c.addr = new_addr
        self._clients[new_addr] = c

    # ------------------------------------------------------------------ stateless part
    def _is_new_attempt(self, client: _Client, data: bytes, opcode: int) -> bool:
        """A packet from a known address that belongs to a different (new) session."""
        if len(data) < 9:
            return False
        sid = data[1:9]
        return client.session.remote_sid is not None and sid != client.session.remote_sid

    def _stateless(self, data: bytes, addr: Addr, opcode: int, key_id: int, now: float, *,
                   replaces: _Client | None, local: Any = None) -> bool:
        try:
            if opcode in (Opcode.P_CONTROL_HARD_RESET_CLIENT_V2,
                          Opcode.P_CONTROL_HARD_RESET_CLIENT_V3):
                return self._client_reset(data, addr, opcode, now, replaces, local)
            if opcode in (Opcode.P_CONTROL_V1, Opcode.P_ACK_V1, Opcode.P_CONTROL_WKC_V1) \
                    and key_id == 0:
                return self._cookie_packet(data, addr, opcode, now, replaces, local)
        except (RemoteProtocolError, OvpnError, ValueError) as exc:
            return self._drop(f"from {addr}: {exc}")
        return self._drop(f"from {addr}: opcode {opcode} key_id {key_id} without a session")

    def _client_reset(self, data: bytes, addr: Addr, opcode: int, now: float,
                      replaces: _Client | None, local: Any = None) -> bool:
        early_neg = False
        v2_wrap = v1_wrap = None
        if opcode == Opcode.P_CONTROL_HARD_RESET_CLIENT_V3:
            if self.tls_crypt_v2 is None:
                return self._drop(f"from {addr}: tls-crypt-v2 reset but no tls-crypt-v2 key")
            plain, v2_wrap, _meta = self.tls_crypt_v2.unwrap_client(data, now)
            early_neg = early_negotiation_marker(data)
        else:
            if self.wrap_factory is None:
                return self._drop(f"from {addr}: reset not wrapped with tls-crypt-v2")
            v1_wrap = self.wrap_factory()
            plain = v1_wrap.unwrap_stateless(data, now)     # replay state untouched
        pkt = ControlPacket.decode(plain)
        if pkt.message_id != 0:
            return self._drop(f"from {addr}: client reset with message id {pkt.message_id}")
        if opcode == Opcode.P_CONTROL_HARD_RESET_CLIENT_V3 and not early_neg:
            if self.settings.force_cookie:
                return self._drop(f"from {addr}: tls-crypt-v2 reset without early negotiation "
                                  "(force-cookie)")
            # a client that cannot resend its WKc: keep state now (spec §6.3)
            return self._create_stateful(pkt, addr, v2_wrap, now, replaces, local)
        cookie = self.cookies.make(now, addr, pkt.session_id)
        payload = b""
        if early_neg:
            payload = encode_tlvs([(TLV_EARLY_NEG_FLAGS,
                                    EARLY_NEG_FLAG_RESEND_WKC.to_bytes(2, "big"))])
        reply = ControlPacket(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, 0, cookie, (0,),
                              pkt.session_id, 0, payload)
        wrap = v2_wrap if v2_wrap is not None else v1_wrap
        wrap.send_packet_id = 0
        self._stateless_out.append((wrap.wrap(reply.encode(), now), addr, local))
        self.cookie_resets_sent += 1
        return True

    def _cookie_packet(self, data: bytes, addr: Addr, opcode: int, now: float,
                       replaces: _Client | None, local: Any = None) -> bool:
        metadata = None
        if opcode == Opcode.P_CONTROL_WKC_V1:
            if self.tls_crypt_v2 is None:
                return self._drop(f"from {addr}: WKC_V1 but no tls-crypt-v2 key")
            plain, wrap, metadata = self.tls_crypt_v2.unwrap_client(data, now)
        else:
            if self.wrap_factory is None:
                return self._drop(f"from {addr}: packet not wrapped with tls-crypt-v2")
            wrap = self.wrap_factory()
            plain = wrap.unwrap(data, now)
        pkt = ControlPacket.decode(plain)
        if not pkt.acks or any(a > 1 for a in pkt.acks):
            return self._drop(f"from {addr}: {pkt.opcode.name} without a session and without "
                              "an ACK of our reset")
        if pkt.message_id is not None and pkt.message_id > 1:
            return self._drop(f"from {addr}: message id {pkt.message_id} without a session")
        assert pkt.remote_session_id is not None
        if not self.cookies.check(now, addr, pkt.session_id, pkt.remote_session_id):
            return self._drop(f"from {addr}: invalid or expired HMAC cookie")
        if replaces is not None:
            self._remove(replaces, "replaced by a new session from the same address")
        peer_id = self._allocate_peer_id(evict=True)
        if peer_id is None:
            return self._drop(f"from {addr}: max-clients {self.settings.max_clients} reached")
        wrap.send_packet_id = 1           # our stateless reset used replay packet-id 1
        session = Session.accept_cookie(self._session_settings(), wrap, now,
                                        cookie=pkt.remote_session_id,
                                        client_sid=pkt.session_id, peer_id=peer_id)
        client = _Client(addr, peer_id, session, metadata, local=local)
        self._add(client)
        ok = session.receive_packet(pkt, now)
        self._collect(client)
        return ok

    def _create_stateful(self, pkt: ControlPacket, addr: Addr, wrap: Any, now: float,
                         replaces: _Client | None, local: Any = None) -> bool:
        """A legacy tls-crypt-v2 reset (no early negotiation): state at once, unproven.

        Nothing proves yet that the sender receives our packets (anyone holding a
        v2 client key can send these from spoofed sources), so such a session
        never replaces an established one at the same address (OpenVPN keeps the
        active session until a new one authenticates; the real client retries),
        and an unproven one is evicted, oldest first, when max-clients is reached.
        """
        if replaces is not None:
            if replaces.session.established and replaces.session.terminated is None:
                return self._drop(f"from {addr}: legacy tls-crypt-v2 reset while a session "
                                  "is established there (kept the established one)")
            self._remove(replaces, "replaced by a new session from the same address")
        peer_id = self._allocate_peer_id(evict=True)
        if peer_id is None:
            return self._drop(f"from {addr}: max-clients {self.settings.max_clients} reached")
        session = Session.accept_reset(self._session_settings(), wrap, now,
                                       client_sid=pkt.session_id, peer_id=peer_id)
        client = _Client(addr, peer_id, session, getattr(wrap, "metadata", None), local=local)
        self._add(client)
        self._unproven[client] = None       # left when it leaves: bounded by max-clients
        ok = session.receive_packet(pkt, now)
        self._collect(client)
        return ok

    # ------------------------------------------------------------------ bookkeeping
    def _session_settings(self) -> SessionSettings:
        """Per-client session settings; read at session creation so a reload applies."""
        st = self.settings
        if st.pool is not None and st.session.client_push is None:
            cached = self._settings_cache
            if cached is not None and cached[0] is st.session and cached[1] is st.pool:
                return cached[2]
            made = dataclasses.replace(st.session, client_push=self._pool_push)
            self._settings_cache = (st.session, st.pool, made)
            return made
        return st.session

    def _allocate_peer_id(self, *, evict: bool = False) -> int | None:
        if len(self._clients) >= self.settings.max_clients:
            if not evict or not self._evict_unproven():
                return None
        limit = self.settings.max_clients
        free = self._free_peer_ids
        while free and free[0] in self._by_peer_id:
            heapq.heappop(free)                 # defensive: taken meanwhile
        if free and free[0] < limit:
            return heapq.heappop(free)
        while self._fresh_peer_id in self._by_peer_id:
            self._fresh_peer_id += 1            # defensive: never happens via _add
        if self._fresh_peer_id < limit:
            pid = self._fresh_peer_id
            self._fresh_peer_id += 1
            return pid
        return None

    def _forget_peer_id(self, client: _Client) -> None:
        """Drop ``client`` from the peer-id index; its id becomes free again."""
        if self._by_peer_id.get(client.peer_id) is client:
            del self._by_peer_id[client.peer_id]
            if client.peer_id < self._fresh_peer_id:
                heapq.heappush(self._free_peer_ids, client.peer_id)

    def _evict_unproven(self) -> bool:
        """Drop the oldest stateful session whose sender never acknowledged our reset."""
        while self._unproven:
            c = next(iter(self._unproven))
            del self._unproven[c]
            p = c.session.primary
            if self._by_peer_id.get(c.peer_id) is not c or p is None \
                    or p.state != KSState.PRE_START:
                continue                        # gone, or proven meanwhile
            self._remove(c, "max-clients reached: evicted a session whose sender never "
                         "acknowledged our reset")
            return True
        return False

    def _add(self, client: _Client) -> None:
        self._clients[client.addr] = client
        self._by_peer_id[client.peer_id] = client
        self._touched[client] = None

    # ------------------------------------------------------------------ timers
    def _reschedule(self, c: _Client) -> None:
        """Give ``c`` a heap entry for its session's current deadline (if it changed)."""
        if self._by_peer_id.get(c.peer_id) is not c:
            c.timer_seq = -1
            return
        t = c.session.get_timer()
        if t == c.deadline and (t is None or c.timer_seq >= 0):
            return
        c.deadline = t
        if t is None:
            c.timer_seq = -1
            return
        c.timer_seq = next(self._seq)
        heapq.heappush(self._timers, (t, c.timer_seq, c))
        if len(self._timers) > 64 + 4 * len(self._by_peer_id):
            # many stale entries: rebuild from the live ones (amortised O(1) per push)
            self._timers = [e for e in self._timers if e[1] == e[2].timer_seq]
            heapq.heapify(self._timers)

    def _reschedule_touched(self) -> None:
        for c in self._touched:
            self._reschedule(c)

    def _pop_due(self, now: float) -> list[_Client]:
        """Take the live heap entries due at ``now`` (their clients get new ones later)."""
        due: list[_Client] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _t, seq, c = heapq.heappop(timers)
            if seq != c.timer_seq:
                continue                    # stale
            c.timer_seq = -1
            c.deadline = None
            due.append(c)
        return due

    def _remove(self, client: _Client, why: str) -> None:
        if client.session.terminated is None:
            client.session.abort("replaced", why)
        self._collect(client, remove=False)
        if self._clients.get(client.addr) is client:
            del self._clients[client.addr]
        self._forget_peer_id(client)
        self._unproven.pop(client, None)
        client.timer_seq = -1

    def _collect(self, client: _Client, *, remove: bool = True) -> None:
        s = client.session
        while (e := s.next_event()) is not None:
            self._events.append(ClientEvent(client.peer_id, client.addr, e))
        if remove and s.terminated is not None and self._clients.get(client.addr) is client:
            # keep nothing of a finished client (hand-window expiry included)
            del self._clients[client.addr]
            self._forget_peer_id(client)
            self._unproven.pop(client, None)
            client.timer_seq = -1

    def _drop(self, why: str) -> bool:
        self.dropped += 1
        self.last_error = why
        log.debug("dropped: %s", why)
        return False

    def _pool_push(self, session: Session) -> list[str]:
        pool = self.settings.pool
        assert pool is not None
        if pool.version != 4:
            return self._pool_push_any(pool, session)
        cached = self._pool_cache
        if cached is None or cached[0] is not pool:
            # the pool's arithmetic once per pool, not per client (ipaddress is slow)
            cached = (pool, int(pool.network_address), int(pool.broadcast_address),
                      f"route-gateway {pool.network_address + 1}", f" {pool.netmask}")
            self._pool_cache = cached
        _pool, net, broadcast, gw_line, mask = cached
        ip = net + 2 + (session.peer_id or 0)
        if ip >= broadcast:                     # past the pool, or its broadcast address
            raise LocalProtocolError(f"address pool {pool} exhausted for peer_id {session.peer_id}")
        return [gw_line, "topology subnet",
                f"ifconfig {ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}{mask}"]

    @staticmethod
    def _pool_push_any(pool: Any, session: Session) -> list[str]:
        gw = pool.network_address + 1
        ip = pool.network_address + 2 + (session.peer_id or 0)
        if ip not in pool or ip == pool.broadcast_address:
            raise LocalProtocolError(f"address pool {pool} exhausted for peer_id {session.peer_id}")
        return [f"route-gateway {gw}", "topology subnet", f"ifconfig {ip} {pool.netmask}"]
