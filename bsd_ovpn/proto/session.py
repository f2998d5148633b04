"""One OpenVPN ``tls_session``, client or server role, sans-IO (spec §3, §4, §6–§13).

A :class:`Session` owns the session ids, up to two key_states (the primary
and the lame duck of the previous negotiation), their reliability windows
and TLS objects, and the timers of the control channel.  It is driven the way
aioquic drives a QuicConnection::

    session.receive_datagram(data, now)
    for dgram in session.datagrams_to_send(now): sock.send(dgram)
    deadline = session.get_timer(); ...; session.handle_timer(now)
    while (ev := session.next_event()) is not None: ...

Nothing here touches sockets, clocks or the kernel.  What the data channel
must do is said by events (:mod:`bsd_ovpn.proto.events`): which key to
install in which if_ovpn slot, when to swap, when to delete.

Errors follow h11: a bad packet from the peer raises (internally)
:class:`~bsd_ovpn.errors.RemoteProtocolError` and is dropped and counted, the
session lives on; our own caller misusing the API gets
:class:`~bsd_ovpn.errors.LocalProtocolError`.
"""
from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bsd_ovpn.errors import LocalProtocolError, OvpnError, RemoteProtocolError
from bsd_ovpn.ifovpn import KeySlot
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto import push as pushmod
from bsd_ovpn.proto.keymethod import (
    CipherNegotiationError, IVProto, KeyMethod2, KeyMethodError, PeerInfo, choose_cipher,
    options_cipher, options_string,
)
from bsd_ovpn.proto.keys import EKM_LABEL, KEY2_SIZE, DataKeys, KeySource, derive_key2_prf, split_key2
from bsd_ovpn.proto.packet import (
    EARLY_NEG_FLAG_RESEND_WKC, ControlPacket, Opcode, PacketError, early_neg_flags,
)
from bsd_ovpn.proto.reliable import (
    CONTROL_SEND_ACK_MAX, INITIAL_TIMEOUT, MAX_ACKS, AckQueue, ReceiveWindow, SendWindow,
    Verdict, control_payload_room,
)
from bsd_ovpn.proto.states import KSState, Trigger, transition
from bsd_ovpn.proto.tls import TLSChannel, TLSConfig, TLSError
from bsd_ovpn.proto.wrap import TLSCryptV2Client, dynamic_tls_crypt

log = logging.getLogger(__name__)

DEFAULT_CIPHERS = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")
PUSH_REQUEST_INTERVAL = 5.0
PUSH_REPLY_MAX = 1024          # PUSH_BUNDLE_SIZE: stock servers split longer replies
AUTH_FAILED_LINGER = 2.0       # server keeps the session to deliver AUTH_FAILED
EXIT_LINGER = 5.0              # wait for ACKs of our EXIT before giving up
RESTART_LINGER = 2.5           # server: wait this long for the ACK of RESTART (one resend)
#: After a TLS failure: keep the session this long so the alert OpenSSL wrote
#: (e.g. "bad certificate") reaches the peer, which then fails at once instead
#: of retransmitting until its hand-window.  Ends earlier once the alert is acked.
TLS_ALERT_LINGER = 1.0
_DATA_OPCODES = (Opcode.P_DATA_V1, Opcode.P_DATA_V2)
DYN_TLS_CRYPT_LABEL = b"EXPORTER-OpenVPN-dynamic-tls-crypt"
_MAX_PLAIN_BUFFER = 16384      # unparsed TLS plaintext we are willing to hold
# IV_PROTO bits as plain ints for the per-handshake tests (IntFlag operators are slow)
_IV_TLS_KEY_EXPORT = int(IVProto.TLS_KEY_EXPORT)
_IV_CC_EXIT_NOTIFY = int(IVProto.CC_EXIT_NOTIFY)
_IV_DYN_TLS_CRYPT = int(IVProto.DYN_TLS_CRYPT)
_IV_REQUEST_PUSH = int(IVProto.REQUEST_PUSH)
_IV_DATA_V2 = int(IVProto.DATA_V2)


class SessionError(RemoteProtocolError):
    """A control packet that cannot belong to this session (dropped, counted)."""


@dataclass
class SessionSettings:
    """Everything a :class:`Session` needs to know about its configuration.

    The daemon/probe fills this from a parsed config file; tests build it
    directly.  Times are seconds.  ``reneg_sec`` 0 disables time-based
    renegotiation; ``ping``/``ping_restart`` 0 disable the userspace
    keepalive timers (with if_ovpn the kernel runs them).
    """

    server: bool
    tls: TLSConfig
    data_ciphers: tuple[str, ...] = DEFAULT_CIPHERS
    data_ciphers_fallback: str | None = None
    hand_window: float = 60.0
    reneg_sec: float = 3600.0
    tran_window: float = 3600.0
    tls_timeout: float = INITIAL_TIMEOUT
    max_packet_size: int = 1250
    ipv6: bool = False
    options_string: str | None = None
    tls_auth_keydir: int | None = None
    # -- client
    username: str | None = None
    password: str | None = None
    peer_info: str | None = None        # None: a 2.6-like default
    iv_version: str = "2.6.0"
    iv_mtu: int | None = None
    ekm: bool = True                    # announce / accept TLS-EKM key derivation
    push_request_interval: float = PUSH_REQUEST_INTERVAL
    pull: bool = True
    dyn_tls_crypt: bool = True          # announce / push dynamic tls-crypt (needs EKM)
    # -- server
    push_options: tuple[str, ...] = ()
    client_push: Callable[[Session], list[str]] | None = None
    auth_verify: Callable[[ev.AuthRequest], object] | None = None
    push_peer_id: bool = True
    # -- userspace keepalive (no kernel data channel)
    ping: float = 0.0
    ping_restart: float = 0.0


def _platform() -> str:
    if sys.platform.startswith("freebsd"):
        return "freebsd"
    if sys.platform.startswith("linux"):
        return "linux"
    return sys.platform


def _new_sid() -> bytes:
    while True:
        sid = os.urandom(8)
        if any(sid):
            return sid


@dataclass(slots=True)
class KeyState:
    """One negotiation (key_id): windows, TLS object, KM2 data and key slot.

    Slots: a server keeps one or two per connected client for hours.  The KM2
    data (``local_source``, ``remote_km``) is dropped once the data-channel
    keys are derived: it is needed for nothing else, and it is key material.
    """

    key_id: int
    server: bool
    started: float
    must_negotiate: float
    state: KSState = KSState.INITIAL
    send: SendWindow = field(default_factory=SendWindow)
    recv: ReceiveWindow = field(default_factory=ReceiveWindow)
    acks: AckQueue = field(default_factory=AckQueue)
    tls: TLSChannel | None = None
    tls_out: bytearray = field(default_factory=bytearray)
    early_tls: bytearray = field(default_factory=bytearray)
    plain: bytearray = field(default_factory=bytearray)
    local_source: KeySource | None = None
    remote_km: KeyMethod2 | None = None
    keys: DataKeys | None = None
    slot: KeySlot | None = None
    auth_deferred_expire: float = 0.0
    must_die: float | None = None
    authenticated: bool = False
    auth_pending: bool = False
    handshake_reported: bool = False
    heard_peer: bool = False
    established: float | None = None
    reneg_at: float | None = None

    def step(self, trigger: Trigger) -> None:
        self.state = transition(self.state, trigger, server=self.server)


class Session:
    """One tls_session.  Use :meth:`connect` (client) or the ``accept_*`` constructors."""

    # A server holds one per connected client: no per-instance dict.
    __slots__ = ("settings", "server", "wrap", "local_sid", "remote_sid", "peer_id", "created",
                 "primary", "lame_duck", "_next_key_id", "_events", "terminated", "_closing",
                 "_now", "dropped", "data_ignored", "last_error", "cipher", "key_derivation",
                 "cc_exit", "peer_info", "peer_common_name", "username", "resend_wkc", "pushed",
                 "_push_assembler", "_auth_token", "_push_request_due", "_push_sent_at",
                 "_push_wanted", "auth_failed", "ping", "ping_restart", "_last_sent",
                 "_last_received", "_exit_sent", "dyn_tls_crypt", "_dyn_wrap", "_dyn_source",
                 "__weakref__")

    def __init__(self, settings: SessionSettings, wrap: object, now: float, *,
                 local_sid: bytes | None = None, remote_sid: bytes | None = None,
                 peer_id: int | None = None) -> None:
        self.settings = settings
        self.server = settings.server
        self.wrap = wrap
        self.local_sid = local_sid or _new_sid()
        self.remote_sid = remote_sid
        self.peer_id = peer_id
        self.created = now
        self.primary: KeyState | None = None
        self.lame_duck: KeyState | None = None
        self._next_key_id = 0
        # a list: an empty deque costs ~600 bytes, and rarely holds more than a few
        self._events: list[ev.Event] = []
        self.terminated: ev.ConnectionTerminated | None = None
        self._closing: tuple[float, str, str] | None = None   # deadline, reason, message
        self._now = now                     # latest time seen (for _tls_failed's linger)
        self.dropped = 0                 # packets dropped as RemoteProtocolError
        self.data_ignored = 0            # P_DATA_V1/V2 handed to us: data channel business
        self.last_error: str | None = None
        # negotiated parameters
        self.cipher: str | None = None
        self.key_derivation = "prf"
        self.cc_exit = False
        self.peer_info: PeerInfo = PeerInfo()
        self.peer_common_name: str | None = None
        self.username: str | None = None
        self.resend_wkc = False
        self.pushed: pushmod.PushReply | None = None
        self._push_assembler: pushmod.PushReplyAssembler | None = None   # client, on demand
        self._auth_token: str | None = None
        self._push_request_due: float | None = None
        self._push_sent_at: float | None = None
        self._push_wanted = False
        self.auth_failed = False
        # userspace keepalive
        self.ping = settings.ping
        self.ping_restart = settings.ping_restart
        self._last_sent = now
        self._last_received = now
        self._exit_sent = False
        self.dyn_tls_crypt = False
        self._dyn_wrap: object | None = None
        #: the key_id 0 TLS session the dynamic tls-crypt key is exported from, kept
        #: until the first renegotiation needs the wrap (most sessions never do)
        self._dyn_source: Any = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def connect(cls, settings: SessionSettings, wrap: object, now: float) -> Session:
        """Client: start a session by queueing the hard reset (§6.1)."""
        if settings.server:
            raise LocalProtocolError("Session.connect is for the client role")
        s = cls(settings, wrap, now)
        ks = s._new_key_state(now)
        opcode = (Opcode.P_CONTROL_HARD_RESET_CLIENT_V3 if isinstance(wrap, TLSCryptV2Client)
                  else Opcode.P_CONTROL_HARD_RESET_CLIENT_V2)
        ks.send.add(opcode, b"")
        ks.step(Trigger.RESET_QUEUED)
        s.primary = ks
        return s

    @classmethod
    def accept_cookie(cls, settings: SessionSettings, wrap: object, now: float, *,
                      cookie: bytes, client_sid: bytes, peer_id: int | None = None) -> Session:
        """Server: the client returned a valid cookie (§6.3).

        The session starts as if our reset (message id 0, acked) and the
        client's reset (id 0, acked) were already exchanged; the caller then
        feeds the packet that carried the cookie through :meth:`receive_packet`.
        """
        if not settings.server:
            raise LocalProtocolError("Session.accept_cookie is for the server role")
        s = cls(settings, wrap, now, local_sid=cookie, remote_sid=client_sid, peer_id=peer_id)
        ks = s._new_key_state(now, first_send_id=1, first_recv_id=1)
        ks.step(Trigger.RESET_QUEUED)
        ks.step(Trigger.RESET_ACKED)
        ks.heard_peer = True
        ks.acks.mru.append(0)
        s.primary = ks
        s._start_tls(ks)
        return s

    @classmethod
    def accept_reset(cls, settings: SessionSettings, wrap: object, now: float, *,
                     client_sid: bytes, peer_id: int | None = None,
                     local_sid: bytes | None = None) -> Session:
        """Server, stateful (§6.2): create state on a client reset and answer it.

        The caller feeds the client's reset through :meth:`receive_packet`
        afterwards so it is acknowledged like any other packet.
        """
        if not settings.server:
            raise LocalProtocolError("Session.accept_reset is for the server role")
        s = cls(settings, wrap, now, local_sid=local_sid, remote_sid=client_sid, peer_id=peer_id)
        ks = s._new_key_state(now)
        ks.send.add(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, b"")
        ks.step(Trigger.RESET_QUEUED)
        s.primary = ks
        return s

    # ------------------------------------------------------------------ public API
    def next_event(self) -> ev.Event | None:
        return self._events.pop(0) if self._events else None

    @property
    def established(self) -> bool:
        """True once the first data-channel keys were handed out."""
        return any(k is not None and k.keys is not None for k in (self.primary, self.lame_duck))

    def receive_datagram(self, data: bytes, now: float) -> bool:
        """Unwrap, parse and process one control datagram; False if it was dropped."""
        if self.terminated is not None:
            return False
        if data and (data[0] >> 3) in _DATA_OPCODES:
            # The kernel/engine owns data packets; one may still reach the control
            # socket (e.g. the peer's keepalive before NEW_PEER).  Not an error, so
            # counted apart from ``dropped`` and never logged (a flood would be).
            self.data_ignored += 1
            return False
        try:
            plain = self._wrap_for(data[0] & 0x07 if data else 0).unwrap(data, now)
            pkt = ControlPacket.decode(plain)
        except (RemoteProtocolError, OvpnError, ValueError) as exc:
            self._drop(f"{type(exc).__name__}: {exc}")
            return False
        return self.receive_packet(pkt, now)

    def receive_packet(self, pkt: ControlPacket, now: float) -> bool:
        """Process an already unwrapped control packet (the server endpoint uses this)."""
        if self.terminated is not None:
            return False
        self._now = max(self._now, now)
        try:
            self._receive(pkt, now)
        except RemoteProtocolError as exc:
            self._drop(str(exc))
            return False
        return True

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Wrapped control datagrams due now (new, retransmitted, ACK-only)."""
        out: list[bytes] = []
        for ks in self._key_states():
            self._fill_send_window(ks)
            for mid in ks.send.due(now):
                opcode, payload = ks.send.packet(mid)
                acks = ks.acks.take(CONTROL_SEND_ACK_MAX) if self.remote_sid else []
                pkt = ControlPacket(opcode, ks.key_id, self.local_sid, tuple(acks),
                                    self.remote_sid if acks else None, mid, payload)
                out.append(self._wrap_for(ks.key_id).wrap(pkt.encode(), now))
                ks.send.mark_sent(mid, now)
            if ks.acks.has_pending() and self.remote_sid is not None:
                acks = ks.acks.take(MAX_ACKS)
                pkt = ControlPacket(Opcode.P_ACK_V1, ks.key_id, self.local_sid, tuple(acks),
                                    self.remote_sid)
                out.append(self._wrap_for(ks.key_id).wrap(pkt.encode(), now))
        if out:
            self._last_sent = max(self._last_sent, now)
        return out

    def get_timer(self) -> float | None:
        """The next time :meth:`handle_timer` must run (None: nothing scheduled)."""
        if self.terminated is not None:
            return None
        times: list[float] = []
        for ks in self._key_states():
            d = ks.send.next_deadline()
            if d is not None:
                times.append(d)
            if ks.tls_out and ks.send.can_send():
                times.append(float("-inf"))
            if ks.state < KSState.GENERATED_KEYS and ks.state != KSState.ERROR:
                times.append(ks.must_negotiate)
            if ks.slot is KeySlot.SECONDARY and ks is self.primary:
                times.append(ks.auth_deferred_expire)
            if ks.must_die is not None:
                times.append(ks.must_die)
        if self._closing is not None:
            times.append(self._closing[0])
            if self._flushed():
                times.append(float("-inf"))       # goodbye acknowledged: end now
        if self._push_request_due is not None:
            times.append(self._push_request_due)
        p = self.primary
        if p is not None and p.state == KSState.GENERATED_KEYS and p.reneg_at is not None:
            times.append(p.reneg_at)
        if self.established:
            if self.ping > 0:
                times.append(self._last_sent + self.ping)
            if self.ping_restart > 0:
                times.append(self._last_received + self.ping_restart)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run everything that is due: timeouts, key swaps, renegotiation, keepalive."""
        if self.terminated is not None:
            return
        self._now = max(self._now, now)
        if self._closing is not None:
            deadline, reason, message = self._closing
            if now >= deadline or self._flushed():
                self._terminate(reason, message)
                return
        for ks in self._key_states():
            if ks.state < KSState.GENERATED_KEYS and ks.state != KSState.ERROR \
                    and now >= ks.must_negotiate:
                if ks.key_id == 0 and ks is self.primary:
                    what = ("TLS key negotiation failed to occur within "
                            f"{self.settings.hand_window:g} seconds (check your network "
                            "connectivity)")
                    if ks.state >= KSState.ACTIVE and not self.server:
                        what = "no reply from server to push requests"
                    self._terminate("hand-window", what)
                else:
                    self._terminate("renegotiation-failed",
                                    f"renegotiation of key_id {ks.key_id} did not finish "
                                    f"within {self.settings.hand_window:g} seconds")
                return
        p = self.primary
        if p is not None and p.slot is KeySlot.SECONDARY and now >= p.auth_deferred_expire:
            self._swap_to(p)
        ld = self.lame_duck
        if ld is not None and ld.must_die is not None and now >= ld.must_die:
            self._drop_lame_duck()
        if self._push_request_due is not None and now >= self._push_request_due:
            self._send_control_message(self.primary, "PUSH_REQUEST")
            self._push_request_due = now + self.settings.push_request_interval
        if p is not None and p.state == KSState.GENERATED_KEYS and p.reneg_at is not None \
                and now >= p.reneg_at and self._closing is None:
            self._soft_reset(now)
        if self.established:
            if self.ping_restart > 0 and now >= self._last_received + self.ping_restart:
                self._terminate("ping-restart", f"no packet from peer for {self.ping_restart:g} s "
                                "(ping-restart)")
                return
            if self.ping > 0 and now >= self._last_sent + self.ping:
                self._events.append(ev.SendPing())
                self._last_sent = now

    def _flushed(self) -> bool:
        """Nothing left to send or acknowledge on the primary key (closing may end)."""
        p = self.primary
        return p is None or (p.send.empty() and not p.tls_out and not p.acks.has_pending())

    def renegotiate(self, now: float) -> None:
        """Start a soft reset now (reneg-sec, or if_ovpn's ROTATE_KEY notification)."""
        p = self.primary
        if p is None or p.state != KSState.GENERATED_KEYS:
            raise LocalProtocolError("renegotiation needs an established primary key")
        self._soft_reset(now)

    def close(self, now: float, *, linger: float = EXIT_LINGER) -> None:
        """Tell the peer we leave (cc-exit ``EXIT``) and end once it is acked."""
        if self.terminated is not None or self._closing is not None:
            return
        p = self.primary
        if self.cc_exit and p is not None and p.tls is not None and p.tls.handshake_complete \
                and not self._exit_sent:
            self._send_control_message(p, "EXIT")
            self._exit_sent = True
            self._closing = (now + linger, "closed", "session closed locally (EXIT sent)")
        else:
            self._terminate("closed", "session closed locally")

    def restart(self, now: float, *, linger: float = RESTART_LINGER,
                message: str = "RESTART") -> None:
        """Server: tell the client to reconnect and end once that is acked (or after ``linger``).

        No EXIT follows: a client that got RESTART tears its session down at
        once (stock OpenVPN never acks anything after it), so waiting for more
        would only keep a dead session -- and its if_ovpn peer -- around.
        Like OpenVPN, the instance is forgotten after a short delay at most.
        Without a finished TLS handshake there is nobody to tell: ends now.
        """
        if message != "RESTART" and not message.startswith("RESTART,"):
            raise LocalProtocolError(f"restart() sends RESTART[,...], not {message!r}")
        if self.terminated is not None:
            return
        p = self.primary
        if p is None or p.tls is None or not p.tls.handshake_complete:
            self._terminate("closed", "session closed locally")
            return
        if self._closing is not None:     # already saying goodbye: just do not wait longer
            deadline, reason, text = self._closing
            self._closing = (min(deadline, now + linger), reason, text)
            return
        self._send_control_message(p, message)
        self._closing = (now + linger, "restart", f"session closed locally ({message} sent)")

    def abort(self, reason: str, message: str) -> None:
        """End the session now without telling the peer (e.g. if_ovpn expired it).

        Emits DeleteKey for the installed keys and ConnectionTerminated.
        """
        self._terminate(reason, message)

    def send_control_message(self, text: str) -> None:
        """Send one NUL-terminated control message (e.g. ``RESTART``) on the primary key."""
        p = self.primary
        if p is None or p.tls is None or not p.tls.handshake_complete:
            raise LocalProtocolError("control messages need a finished TLS handshake")
        self._send_control_message(p, text)

    def set_auth_result(self, key_id: int, ok: bool, reason: str = "", *,
                        now: float) -> None:
        """Server: complete a deferred authentication (see :class:`events.AuthRequest`)."""
        ks = self._key_state_by_id(key_id)
        if ks is None or not ks.auth_pending:
            raise LocalProtocolError(f"no authentication pending for key_id {key_id}")
        ks.auth_pending = False
        self._auth_decided(ks, ok, reason, now)

    def data_received(self, now: float) -> None:
        """Userspace data path: an authenticated data packet arrived (resets ping-restart)."""
        self._last_received = max(self._last_received, now)

    def data_sent(self, now: float) -> None:
        """Userspace data path: a data packet was sent (resets the ping timer)."""
        self._last_sent = max(self._last_sent, now)

    def data_keys(self) -> list[DataKeys]:
        """Keys currently usable for receiving (primary first)."""
        return [k.keys for k in (self.primary, self.lame_duck) if k is not None and k.keys]

    def tx_keys(self) -> DataKeys | None:
        """The key the data channel should encrypt with right now."""
        for k in (self.primary, self.lame_duck):
            if k is not None and k.keys is not None and k.slot is KeySlot.PRIMARY:
                return k.keys
        return None

    def tls_info(self) -> dict[str, str | None]:
        p = self.primary
        t = p.tls if p is not None else None
        return {"version": _tls_attr(t, "version"), "cipher": _tls_attr(t, "cipher_name")}

    # ------------------------------------------------------------------ key states
    def _key_states(self) -> list[KeyState]:
        return [k for k in (self.primary, self.lame_duck) if k is not None]

    def _key_state_by_id(self, key_id: int) -> KeyState | None:
        # no list of key states: this runs for every control packet
        k = self.primary
        if k is not None and k.key_id == key_id:
            return k
        k = self.lame_duck
        if k is not None and k.key_id == key_id:
            return k
        return None

    def _new_key_state(self, now: float, *, first_send_id: int = 0,
                       first_recv_id: int = 0) -> KeyState:
        kid = self._next_key_id
        self._next_key_id = kid + 1 if kid < 7 else 1
        st = self.settings
        ks = KeyState(key_id=kid, server=self.server, started=now,
                      must_negotiate=now + st.hand_window,
                      send=SendWindow(first_id=first_send_id, initial_timeout=st.tls_timeout),
                      recv=ReceiveWindow(first_id=first_recv_id))
        deferred = st.hand_window
        if st.reneg_sec > 0:
            deferred = min(deferred, st.reneg_sec / 2)
        ks.auth_deferred_expire = now + deferred
        return ks

    def _start_tls(self, ks: KeyState) -> None:
        ks.tls = TLSChannel(self.settings.tls, server=self.server)
        if ks.early_tls:
            early, ks.early_tls = bytes(ks.early_tls), bytearray()
            try:
                ks.tls.receive(early)
            except TLSError as exc:
                self._tls_failed(ks, exc)
                return
        self._pump_tls(ks)

    # ------------------------------------------------------------------ receive path
    def _receive(self, pkt: ControlPacket, now: float) -> None:
        op = pkt.opcode
        # direction check (§3.6 rule 2)
        if self.server and op is Opcode.P_CONTROL_HARD_RESET_SERVER_V2:
            raise SessionError("server->server connection attempted (got a server reset)")
        if not self.server and op in (Opcode.P_CONTROL_HARD_RESET_CLIENT_V2,
                                      Opcode.P_CONTROL_HARD_RESET_CLIENT_V3):
            raise SessionError("client->client connection attempted (got a client reset)")
        if self.remote_sid is None:
            if op is not Opcode.P_CONTROL_HARD_RESET_SERVER_V2:
                raise SessionError(f"{op.name} before the server's reset")
        elif pkt.session_id != self.remote_sid:
            raise SessionError(f"{op.name} from unknown session id {pkt.session_id.hex()} "
                               f"(expected {self.remote_sid.hex()})")
        if pkt.acks and pkt.remote_session_id != self.local_sid:
            assert pkt.remote_session_id is not None
            raise SessionError(f"{op.name} acknowledges for session "
                               f"{pkt.remote_session_id.hex()}, ours is {self.local_sid.hex()}")
        if self.remote_sid is None:
            self.remote_sid = pkt.session_id
        ks = self._key_state_by_id(pkt.key_id)
        if op is Opcode.P_CONTROL_SOFT_RESET_V1 and (ks is None or ks is self.lame_duck):
            p = self.primary
            if p is None or p.state != KSState.GENERATED_KEYS:
                raise SessionError("soft reset while the current key is not established")
            if pkt.key_id != self._next_key_id:
                raise SessionError(f"soft reset for key_id {pkt.key_id}, expected "
                                   f"{self._next_key_id} (key IDs out of sync)")
            self._soft_reset(now)
            ks = self.primary
        if ks is None:
            raise SessionError(f"key_id {pkt.key_id} does not match any key_state "
                               "(local/remote key IDs out of sync)")
        if ks.state == KSState.ERROR:
            ks.send.acknowledge(pkt.acks)       # the ACK of our alert ends the linger
            raise SessionError(f"key_id {pkt.key_id} is in error state")
        self._last_received = max(self._last_received, now)
        ks.send.acknowledge(pkt.acks)
        if op is not Opcode.P_ACK_V1:
            assert pkt.message_id is not None
            if op in (Opcode.P_CONTROL_HARD_RESET_SERVER_V2, Opcode.P_CONTROL_HARD_RESET_CLIENT_V2,
                      Opcode.P_CONTROL_HARD_RESET_CLIENT_V3) and pkt.message_id != 0:
                raise SessionError(f"{op.name} with message id {pkt.message_id} (must be 0)")
            verdict = ks.recv.receive(pkt.message_id, op, pkt.payload)
            if verdict is not Verdict.OUTSIDE:
                ks.acks.add(pkt.message_id)
            for _mid, rop, payload in ks.recv.pop_ready():
                self._deliver(ks, rop, payload, now)
        if not ks.heard_peer:
            ks.heard_peer = True
            ks.send.schedule_now()
        self._progress(ks, now)

    def _deliver(self, ks: KeyState, opcode: Opcode, payload: bytes, now: float) -> None:
        if opcode in (Opcode.P_CONTROL_V1, Opcode.P_CONTROL_WKC_V1):
            if ks.state == KSState.ERROR:
                return
            if ks.tls is None:
                # our own reset is not acked yet: keep the bytes for the TLS object
                ks.early_tls += payload
                if len(ks.early_tls) > _MAX_PLAIN_BUFFER:
                    raise SessionError("too much TLS data before the reset exchange finished")
                return
            try:
                ks.tls.receive(payload)
            except TLSError as exc:
                self._tls_failed(ks, exc)
        elif opcode is Opcode.P_CONTROL_HARD_RESET_SERVER_V2 and payload:
            try:
                flags = early_neg_flags(payload)
            except PacketError as exc:
                raise SessionError(f"server reset payload: {exc}") from None
            self.resend_wkc = bool(flags & EARLY_NEG_FLAG_RESEND_WKC)
        # other resets carry nothing for us

    # ------------------------------------------------------------------ progress
    def _progress(self, ks: KeyState, now: float) -> None:
        if self.terminated is not None or ks.state == KSState.ERROR:
            return
        if ks.state == KSState.PRE_START and ks.send.lowest_unacked > 0 and ks.recv.next_expected > 0:
            ks.step(Trigger.RESET_ACKED)
            self._start_tls(ks)
        if ks.tls is None:
            return
        self._pump_tls(ks)
        if self.terminated is not None or ks.state == KSState.ERROR:
            return
        if ks.tls.handshake_complete and not ks.handshake_reported:
            ks.handshake_reported = True
            cn = _tls_attr(ks.tls, "peer_common_name")
            if ks.key_id == 0 or self.peer_common_name is None:
                self.peer_common_name = cn
            self._events.append(ev.HandshakeComplete(ks.key_id, cn, _tls_attr(ks.tls, "version"),
                                                     _tls_attr(ks.tls, "cipher_name")))
            if not self.server and ks.state == KSState.START:
                self._client_send_km2(ks)
        self._read_plaintext(ks, now)
        if self.terminated is not None or ks.state == KSState.ERROR:
            return
        self._pump_tls(ks)
        self._fill_send_window(ks)
        self._check_active(ks, now)

    def _check_active(self, ks: KeyState, now: float) -> None:
        done = ks.send.empty() and not ks.tls_out
        if done and ((not self.server and ks.state == KSState.GOT_KEY)
                     or (self.server and ks.state == KSState.SENT_KEY)):
            ks.step(Trigger.SEND_WINDOW_EMPTY)
            if not self.server:
                if ks.key_id == 0 and ks is self.primary and self.settings.pull \
                        and self.pushed is None and self._push_request_due is None:
                    self._push_request_due = now + 1.0
                elif ks.key_id != 0 or not self.settings.pull:
                    self._generate_keys(ks, now)
        if ks.state == KSState.ACTIVE and ks.keys is not None:
            ks.step(Trigger.KEYS_GENERATED)
            self._established(ks, now)

    def _pump_tls(self, ks: KeyState) -> None:
        if ks.tls is None:
            return
        try:
            data = ks.tls.outgoing()
        except TLSError as exc:
            self._tls_failed(ks, exc)
            return
        if data:
            ks.tls_out += data

    def _fill_send_window(self, ks: KeyState) -> None:
        """Cut pending TLS ciphertext into P_CONTROL_V1 packets while the window allows."""
        room0 = 0                           # the room without a WKc, computed on first use
        while ks.tls_out and ks.send.can_send():
            opcode = Opcode.P_CONTROL_V1
            if ks.send.next_id == 1 and ks.key_id == 0 and not self.server and self.resend_wkc:
                opcode = Opcode.P_CONTROL_WKC_V1
                room = self._control_room(ks, len(getattr(self.wrap, "wkc", b"") or b""))
            else:
                room = room0 = room0 or self._control_room(ks, 0)
            chunk = bytes(ks.tls_out[:room])
            del ks.tls_out[:room]
            ks.send.add(opcode, chunk)

    def _control_room(self, ks: KeyState, extra: int) -> int:
        return control_payload_room(
            wrap_overhead=int(getattr(self._wrap_for(ks.key_id), "overhead", 0)),
            n_acks=CONTROL_SEND_ACK_MAX, max_packet_size=self.settings.max_packet_size,
            ipv6=self.settings.ipv6, extra=extra)

    def _tls_failed(self, ks: KeyState, exc: Exception) -> None:
        # flush what the TLS engine wants to say (an alert) before giving up
        try:
            if ks.tls is not None:
                ks.tls_out += ks.tls.outgoing() or b""
        except Exception:  # noqa: BLE001 - the engine is already broken
            pass
        ks.state = transition(ks.state, Trigger.FAIL, server=self.server)
        message = f"TLS error: {exc}"
        if ks.tls_out and self.terminated is None and self._closing is None:
            # the alert leaves with the next datagrams_to_send(); end once it is
            # acked or after TLS_ALERT_LINGER (a failed peer rarely acks)
            self._closing = (self._now + TLS_ALERT_LINGER, "tls-error", message)
            return
        self._terminate("tls-error", message)

    # ------------------------------------------------------------------ plaintext
    def _expects_km2(self, ks: KeyState) -> bool:
        return ks.remote_km is None and (
            (self.server and ks.state == KSState.START)
            or (not self.server and ks.state == KSState.SENT_KEY))

    def _read_plaintext(self, ks: KeyState, now: float) -> None:
        assert ks.tls is not None
        if not ks.tls.handshake_complete:
            return
        while True:
            try:
                data = ks.tls.read()
            except TLSError as exc:
                self._tls_failed(ks, exc)
                return
            if not data:
                break
            ks.plain += data
            if len(ks.plain) > _MAX_PLAIN_BUFFER:
                self._terminate("protocol-error", "peer sent more than "
                                f"{_MAX_PLAIN_BUFFER} bytes of unterminated control data")
                return
        while ks.plain and self.terminated is None:
            if self._expects_km2(ks):
                try:
                    km, used = KeyMethod2.decode_prefix(bytes(ks.plain), client_sent=self.server)
                except KeyMethodError as exc:
                    if "truncated" in str(exc):
                        return           # wait for the rest of the record stream
                    self._terminate("protocol-error", f"bad key-method 2 message: {exc}")
                    return
                del ks.plain[:used]
                self._got_km2(ks, km, now)
                continue
            nul = ks.plain.find(b"\x00")
            if nul < 0:
                return
            raw = bytes(ks.plain[:nul])
            del ks.plain[:nul + 1]
            text = raw.decode("ascii", "replace").rstrip("\r\n")
            if text and text.isascii() and text.isprintable():   # 0x20..0x7E only
                self._control_message(ks, text, now)

    def _client_send_km2(self, ks: KeyState) -> None:
        st = self.settings
        ks.local_source = KeySource.generate(client=True)
        password = st.password
        if self._auth_token is not None:
            password = self._auth_token
        km = KeyMethod2(ks.local_source, self._options_string(), st.username, password,
                        self._client_peer_info())
        self._tls_write(ks, km.encode(client=True))
        ks.step(Trigger.KEY_SENT)

    def _options_string(self) -> str:
        if self.settings.options_string:
            return self.settings.options_string
        return options_string(server=self.server, tls_auth_keydir=self.settings.tls_auth_keydir)

    def _client_peer_info(self) -> str:
        st = self.settings
        if st.peer_info is not None:
            return st.peer_info
        proto = IVProto.DATA_V2 | IVProto.REQUEST_PUSH | IVProto.CC_EXIT_NOTIFY
        if st.ekm and _ekm_capable():
            proto |= IVProto.TLS_KEY_EXPORT
            if st.dyn_tls_crypt:
                proto |= IVProto.DYN_TLS_CRYPT
        return PeerInfo.for_client(version=st.iv_version, platform=_platform(),
                                   ciphers=st.data_ciphers, proto=proto, mtu=st.iv_mtu).build()

    def _tls_write(self, ks: KeyState, data: bytes) -> None:
        assert ks.tls is not None
        try:
            ks.tls.write(data)
        except TLSError as exc:
            self._tls_failed(ks, exc)
            return
        self._pump_tls(ks)

    def _send_control_message(self, ks: KeyState | None, text: str) -> None:
        if ks is None or ks.tls is None:
            raise LocalProtocolError("no key_state to carry a control message")
        raw = text.encode("ascii") + b"\x00"
        if len(raw) > 2048:
            raise LocalProtocolError(f"control message of {len(raw)} bytes exceeds 2048")
        self._tls_write(ks, raw)
        self._fill_send_window(ks)

    # ------------------------------------------------------------------ KM2
    def _got_km2(self, ks: KeyState, km: KeyMethod2, now: float) -> None:
        ks.remote_km = km
        ks.step(Trigger.KEY_RECEIVED)
        if self.server:
            self._server_got_km2(ks, km, now)
        else:
            ks.authenticated = True
            self._events.append(ev.PeerAuthenticated(ks.key_id, self.peer_common_name, None, {}))
            self._check_active(ks, now)

    def _server_got_km2(self, ks: KeyState, km: KeyMethod2, now: float) -> None:
        st = self.settings
        try:
            pi = PeerInfo.parse(km.peer_info)
        except KeyMethodError as exc:
            self._terminate("protocol-error", str(exc))
            return
        if self.cipher is None:
            self.peer_info = pi
            self.username = km.username
        # our KM2 goes out regardless of the authentication outcome (as OpenVPN does)
        ks.local_source = KeySource.generate(client=False)
        reply = KeyMethod2(ks.local_source, self._options_string(), None, None, None)
        self._tls_write(ks, reply.encode(client=False))
        if ks.state == KSState.ERROR:
            return
        ks.step(Trigger.KEY_SENT)
        if self.cipher is None:
            try:
                self.cipher = choose_cipher(st.data_ciphers, pi, st.data_ciphers_fallback,
                                            remote_cipher=options_cipher(km.options))
            except CipherNegotiationError as exc:
                self._auth_decided(ks, False, str(exc), now)
                return
            proto = int(pi.proto)         # plain ints: an IntFlag & costs ~2 us
            want_ekm = st.ekm and bool(proto & _IV_TLS_KEY_EXPORT) and _ekm_capable()
            self.key_derivation = "tls-ekm" if want_ekm else "prf"
            self.cc_exit = bool(proto & _IV_CC_EXIT_NOTIFY)
            self.dyn_tls_crypt = (want_ekm and self.cc_exit and st.dyn_tls_crypt
                                  and bool(proto & _IV_DYN_TLS_CRYPT))
        verdict: object = True
        if st.auth_verify is not None:
            req = ev.AuthRequest(ks.key_id, self.peer_common_name, km.username, km.password,
                                 _pi_dict(pi))
            try:
                verdict = st.auth_verify(req)
            except Exception as exc:  # noqa: BLE001 - a hook bug must not kill the loop
                verdict = (False, f"authentication hook failed: {exc}")
            if verdict is None:
                ks.auth_pending = True
                self._events.append(req)
                return
        ok, reason = (verdict if isinstance(verdict, tuple) else (bool(verdict), ""))
        self._auth_decided(ks, bool(ok), str(reason), now)

    def _auth_decided(self, ks: KeyState, ok: bool, reason: str, now: float) -> None:
        if not ok:
            self.auth_failed = True
            self._events.append(ev.AuthFailed(reason or "authentication failed"))
            if ks.tls is not None and ks.tls.handshake_complete:
                msg = "AUTH_FAILED" + (f",{_printable(reason)}" if reason else "")
                self._send_control_message(ks, msg[:1000])
            self._closing = (now + AUTH_FAILED_LINGER, "auth-failed",
                             reason or "authentication failed")
            return
        ks.authenticated = True
        self._events.append(ev.PeerAuthenticated(ks.key_id, self.peer_common_name, self.username,
                                                 _pi_dict(self.peer_info)))
        self._generate_keys(ks, now)
        if ks.key_id == 0 and (int(self.peer_info.proto) & _IV_REQUEST_PUSH
                               or self._push_wanted):
            self._send_push_reply(now)
        self._check_active(ks, now)

    # ------------------------------------------------------------------ keys
    def _generate_keys(self, ks: KeyState, now: float) -> None:
        if ks.keys is not None:
            return
        if self.cipher is None:
            self._terminate("protocol-error", "no data cipher was negotiated")
            return
        try:
            if self.key_derivation == "tls-ekm":
                assert ks.tls is not None
                key2 = ks.tls.export_keying_material(EKM_LABEL, KEY2_SIZE)
            else:
                assert ks.remote_km is not None and ks.local_source is not None
                if self.server:
                    client_src, server_src = ks.remote_km.key_source, ks.local_source
                    csid, ssid = self.remote_sid, self.local_sid
                else:
                    client_src, server_src = ks.local_source, ks.remote_km.key_source
                    csid, ssid = self.local_sid, self.remote_sid
                assert csid is not None and ssid is not None
                key2 = derive_key2_prf(client_src, server_src, csid, ssid)
            ks.keys = split_key2(key2, self.cipher, server=self.server, key_id=ks.key_id)
            if ks.key_id == 0 and self.dyn_tls_crypt and self._dyn_wrap is None:
                self._dyn_source = ks.tls      # the export waits for its first use
            # the KM2 randoms served their purpose; do not keep key material around
            ks.local_source = ks.remote_km = None
        except (OvpnError, ValueError) as exc:
            self._terminate("protocol-error", f"data-channel key derivation failed: {exc}")
            return
        installed = [k for k in self._key_states() if k is not ks and k.slot is not None]
        ks.slot = KeySlot.SECONDARY if installed else KeySlot.PRIMARY
        self._events.append(ev.KeysReady(ks.key_id, ks.keys, ks.slot, self.peer_id,
                                         self.key_derivation))
        if ks.slot is KeySlot.SECONDARY and now >= ks.auth_deferred_expire:
            self._swap_to(ks)
        if ks.state == KSState.ACTIVE:
            ks.step(Trigger.KEYS_GENERATED)
            self._established(ks, now)

    def _wrap_for(self, key_id: int) -> Any:
        """Control wrapping for a key_id: dynamic tls-crypt for renegotiations (§5.5)."""
        if key_id > 0:
            if self._dyn_wrap is None and self._dyn_source is not None:
                self._dyn_wrap = self._make_dyn_wrap(self._dyn_source)
                self._dyn_source = None
            if self._dyn_wrap is not None:
                return self._dyn_wrap
        return self.wrap

    def _make_dyn_wrap(self, tls: Any) -> Any:
        """Exported when first needed, not at every handshake: the key_id 0 session
        is alive until a renegotiation completes, and that is the first use."""
        ekm = tls.export_keying_material(DYN_TLS_CRYPT_LABEL, 256)
        return dynamic_tls_crypt(ekm, self.wrap.base_key, self.server)

    def _established(self, ks: KeyState, now: float) -> None:
        """Keys are in use: schedule the reneg-sec renegotiation of this key_state.

        A server takes up to 10 % off at random (as OpenVPN does) so that
        clients connected at the same moment do not all rekey together.
        """
        ks.established = now
        sec = self.settings.reneg_sec
        if sec > 0:
            if self.server:
                sec -= random.uniform(0, sec / 10)
            ks.reneg_at = now + sec

    def _swap_to(self, ks: KeyState) -> None:
        if ks.slot is not KeySlot.SECONDARY:
            return
        ks.slot = KeySlot.PRIMARY
        for other in self._key_states():
            if other is not ks and other.slot is KeySlot.PRIMARY:
                other.slot = KeySlot.SECONDARY
        self._events.append(ev.SwapKeys(ks.key_id))

    def _drop_lame_duck(self) -> None:
        ld = self.lame_duck
        if ld is None:
            return
        if ld.slot is KeySlot.PRIMARY:
            # it still carries TX: the new key takes over first
            p = self.primary
            if p is not None and p.slot is KeySlot.SECONDARY:
                self._swap_to(p)
        if ld.slot is not None:
            self._events.append(ev.DeleteKey(ld.slot, ld.key_id))
        self.lame_duck = None

    def _soft_reset(self, now: float) -> None:
        """Retire the primary to lame duck and start a new key_state (§13)."""
        old = self.primary
        assert old is not None
        self._drop_lame_duck()
        if old.slot is KeySlot.SECONDARY:
            self._swap_to(old)
        old.must_die = now + self.settings.tran_window
        self.lame_duck = old
        ks = self._new_key_state(now)
        ks.send.add(Opcode.P_CONTROL_SOFT_RESET_V1, b"")
        ks.step(Trigger.RESET_QUEUED)
        # the responder has received the peer's soft reset by definition, the
        # initiator waits for it: both need id 0 from the peer before TLS starts
        self.primary = ks

    # ------------------------------------------------------------------ control messages
    def _control_message(self, ks: KeyState, text: str, now: float) -> None:
        if self.server:
            self._server_message(ks, text, now)
        else:
            self._client_message(ks, text, now)

    def _server_message(self, ks: KeyState, text: str, now: float) -> None:
        if text == "PUSH_REQUEST":
            if self.auth_failed:
                return
            if not any(k.authenticated for k in self._key_states()):
                self._push_wanted = True
                return
            if self._push_sent_at is not None and now - self._push_sent_at < 30:
                return
            self._send_push_reply(now)
        elif text == "EXIT":
            self._events.append(ev.ExitReceived())
            # acknowledge the EXIT before forgetting the client
            self._closing = (now + 1.0, "exit", "client sent EXIT")
        else:
            log.debug("ignoring control message from client: %r", text[:80])

    def _client_message(self, ks: KeyState, text: str, now: float) -> None:
        if text.startswith("AUTH_FAILED"):
            reason = text[len("AUTH_FAILED"):].lstrip(",") or "AUTH_FAILED"
            self._events.append(ev.AuthFailed(reason))
            self._terminate("auth-failed", f"server sent AUTH_FAILED: {reason}")
        elif text.startswith("PUSH_REPLY"):
            self._client_push_reply(text, now)
        elif text.startswith("RESTART"):
            msg = text[len("RESTART"):].lstrip(",")
            self._events.append(ev.RestartReceived(msg))
            self._terminate("restart", f"server requested restart {msg}".strip())
        elif text.startswith("HALT"):
            msg = text[len("HALT"):].lstrip(",")
            self._events.append(ev.HaltReceived(msg))
            self._terminate("halt", f"server requested halt {msg}".strip())
        elif text.startswith("INFO_PRE") or text.startswith("INFO") \
                or text.startswith("AUTH_PENDING"):
            kind, _, rest = text.partition(",")
            if kind == "AUTH_PENDING":
                extra = self.settings.hand_window
                if rest.startswith("timeout "):
                    try:
                        extra = float(rest.split()[1])
                    except (IndexError, ValueError):
                        pass
                ks.must_negotiate = max(ks.must_negotiate, now + extra)
            self._events.append(ev.InfoReceived(kind, rest))
        elif text == "EXIT":
            self._events.append(ev.ExitReceived())
            self._terminate("exit", "server sent EXIT")
        else:
            log.debug("ignoring control message from server: %r", text[:80])

    def _send_push_reply(self, now: float) -> None:
        st = self.settings
        opts = list(st.push_options)
        if st.client_push is not None:
            opts += list(st.client_push(self))
        pi = self.peer_info
        if self.peer_id is not None and st.push_peer_id and int(pi.proto) & _IV_DATA_V2:
            opts.append(f"peer-id {self.peer_id}")
        if self.cipher is not None and (pi.ciphers is not None or (pi.ncp or 0) >= 2):
            opts.append(f"cipher {self.cipher}")
        flags = []
        if self.cc_exit:
            flags.append("cc-exit")
        if self.key_derivation == "tls-ekm":
            if self.cc_exit:
                flags.append("tls-ekm")
                if self.dyn_tls_crypt:
                    flags.append("dyn-tls-crypt")
            else:
                opts.append("key-derivation tls-ekm")
        if flags:
            opts.append("protocol-flags " + " ".join(flags))
        if pi.mtu is not None:
            opts.append("tun-mtu 1500")
        for msg in pushmod.build_push_reply(opts, PUSH_REPLY_MAX):
            self._send_control_message(self.primary, msg)
        self._push_sent_at = now
        self._push_wanted = False
        self._events.append(ev.PushReplySent(tuple(opts)))

    def _client_push_reply(self, text: str, now: float) -> None:
        if self.pushed is not None:
            return                          # duplicate (answer to a repeated request)
        try:
            if self._push_assembler is None:
                self._push_assembler = pushmod.PushReplyAssembler()
            reply = self._push_assembler.feed(text)
        except (OvpnError, ValueError) as exc:
            self._terminate("protocol-error", f"bad PUSH_REPLY: {exc}")
            return
        if reply is None:
            return                          # push-continuation 2: more parts follow
        self._push_assembler = None
        self._push_request_due = None
        err = self._apply_push(reply)
        if err:
            self._terminate("protocol-error", err)
            return
        self.pushed = reply
        self._events.append(ev.PushReplyReceived(reply, tuple(reply.options)))
        p = self.primary
        if p is not None and p.key_id == 0 and p.state >= KSState.GOT_KEY:
            self._generate_keys(p, now)
            self._check_active(p, now)

    def _apply_push(self, reply: pushmod.PushReply) -> str | None:
        st = self.settings
        if reply.peer_id is not None:
            self.peer_id = reply.peer_id
        if "cc-exit" in reply.protocol_flags:
            self.cc_exit = True
        if "dyn-tls-crypt" in reply.protocol_flags:
            if not (st.ekm and st.dyn_tls_crypt and _ekm_capable()):
                return "server pushed dyn-tls-crypt, which this client did not announce"
            self.dyn_tls_crypt = True
        if reply.key_derivation is not None and reply.key_derivation != "tls-ekm":
            return f"unsupported pushed key-derivation {reply.key_derivation!r}"
        if reply.uses_ekm:
            if not (st.ekm and _ekm_capable()):
                return "server pushed tls-ekm but this client did not announce TLS-EKM"
            self.key_derivation = "tls-ekm"
        if reply.ping is not None:
            self.ping = float(reply.ping)
        if reply.ping_restart is not None:
            self.ping_restart = float(reply.ping_restart)
        if reply.auth_token is not None:
            self._auth_token = reply.auth_token
        cipher = reply.cipher or st.data_ciphers_fallback
        if cipher is None:
            return "server pushed no cipher and no data-ciphers-fallback is configured"
        allowed = {c.upper(): c for c in st.data_ciphers}
        if cipher.upper() not in allowed and cipher != st.data_ciphers_fallback:
            return (f"server pushed cipher {cipher!r}, which is not in data-ciphers "
                    f"{':'.join(st.data_ciphers)}")
        self.cipher = allowed.get(cipher.upper(), cipher)
        return None

    # ------------------------------------------------------------------ errors / end
    def _drop(self, why: str) -> None:
        self.dropped += 1
        self.last_error = why
        log.debug("dropped control packet: %s", why)

    def _terminate(self, reason: str, message: str) -> None:
        if self.terminated is not None:
            return
        self.terminated = ev.ConnectionTerminated(reason, message)
        for k in self._key_states():
            if k.slot is not None:
                self._events.append(ev.DeleteKey(k.slot, k.key_id))
                k.slot = None
        self._events.append(self.terminated)


def _tls_attr(tls: object, name: str) -> str | None:
    if tls is None:
        return None
    try:
        v = getattr(tls, name)
        v = v() if callable(v) else v
    except Exception:  # noqa: BLE001 - informational only
        return None
    return None if v is None else str(v)


def _ekm_capable() -> bool:
    return hasattr(TLSChannel, "export_keying_material")


def _pi_dict(pi: PeerInfo) -> dict[str, str]:
    d: dict[str, str] = {}
    if pi.version is not None:
        d["IV_VER"] = pi.version
    if pi.platform is not None:
        d["IV_PLAT"] = pi.platform
    if pi.ciphers is not None:
        d["IV_CIPHERS"] = ":".join(pi.ciphers)
    if pi.mtu is not None:
        d["IV_MTU"] = str(pi.mtu)
    if pi.ncp is not None:
        d["IV_NCP"] = str(pi.ncp)
    d["IV_PROTO"] = str(int(pi.proto))
    d.update(dict(pi.extra))
    return d


def _printable(text: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c != "," else " " for c in text)
