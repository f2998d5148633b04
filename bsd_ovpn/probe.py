"""``ovpnctl probe``: one client handshake against a server, no interface, no root.

The probe answers "would a client with this config get a tunnel?" by running
the real control channel (reset, TLS, key-method 2, PUSH_REPLY, key
derivation) over a plain UDP socket and reporting what was negotiated, then
saying goodbye with EXIT.  The protocol is all in
:class:`~bsd_ovpn.proto.session.Session`; this module is the thin I/O glue
(a ``selectors`` loop, as small as aioquic's asyncio glue); the mapping from
a parsed config to session settings is :mod:`bsd_ovpn.settings`.
"""
from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from bsd_ovpn.errors import ConfigError, OvpnError
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.keys import DataKeys
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.settings import client_settings_from

DEFAULT_TIMEOUT = 30.0
_RECV_SIZE = 65535


class ProbeError(OvpnError):
    """The probe did not get a working data channel; the message says why."""

    def __init__(self, message: str, reason: str = "failed") -> None:
        self.reason = reason
        super().__init__(message)


@dataclass
class ProbeResult:
    """What the server negotiated with us."""

    remote: tuple[str, int]
    cipher: str
    key_derivation: str
    peer_id: int | None
    key_id: int
    tls_version: str | None
    tls_cipher: str | None
    peer_common_name: str | None
    pushed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    keys: DataKeys | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "remote": f"{self.remote[0]}:{self.remote[1]}",
            "cipher": self.cipher,
            "key_derivation": self.key_derivation,
            "peer_id": self.peer_id,
            "key_id": self.key_id,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "server_common_name": self.peer_common_name,
            "pushed": list(self.pushed),
            "seconds": round(self.seconds, 3),
        }


def run_probe(settings: SessionSettings, wrap: Any, remote: tuple[str, int], *,
              timeout: float = DEFAULT_TIMEOUT, clock: Any = time.monotonic) -> ProbeResult:
    """Handshake with ``remote`` and return what was negotiated; raise ProbeError otherwise."""
    infos = socket.getaddrinfo(remote[0], remote[1], type=socket.SOCK_DGRAM)
    if not infos:
        raise ProbeError(f"cannot resolve {remote[0]}")
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sel = selectors.DefaultSelector()
    try:
        sock.connect(sockaddr)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        settings.ipv6 = family == socket.AF_INET6     # IP header size in the packet budget
        start = clock()
        session = Session.connect(settings, wrap, start)
        loop = _Loop(sock, sel, session, clock)
        keys_ev = loop.run_until(lambda e: isinstance(e, ev.KeysReady), start + timeout)
        if keys_ev is None:
            raise ProbeError(loop.failure(timeout), loop.reason)
        assert isinstance(keys_ev, ev.KeysReady)
        pushed = loop.pushed
        result = ProbeResult(
            remote=(sockaddr[0], sockaddr[1]), cipher=keys_ev.keys.cipher,
            key_derivation=keys_ev.key_derivation, peer_id=session.peer_id,
            key_id=keys_ev.key_id, tls_version=loop.tls_version, tls_cipher=loop.tls_cipher,
            peer_common_name=session.peer_common_name, pushed=pushed,
            seconds=clock() - start, keys=keys_ev.keys)
        # say goodbye so the server frees the slot at once
        session.close(clock(), linger=3.0)
        loop.run_until(lambda e: False, clock() + 3.5)
        return result
    except OSError as exc:
        raise ProbeError(f"socket error talking to {remote[0]}:{remote[1]}: {exc}") from exc
    finally:
        sel.close()
        sock.close()


class _Loop:
    """Feed datagrams and time into the session until an event matches."""

    def __init__(self, sock: socket.socket, sel: selectors.BaseSelector, session: Session,
                 clock: Any) -> None:
        self.sock, self.sel, self.session, self.clock = sock, sel, session, clock
        self.terminated: ev.ConnectionTerminated | None = None
        self.auth_failed: str | None = None
        self.pushed: list[str] = []
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        self.reason = "failed"
        self.icmp_error: str | None = None

    def run_until(self, match: Any, deadline: float) -> ev.Event | None:
        s = self.session
        while True:
            now = self.clock()
            for d in s.datagrams_to_send(now):
                try:
                    self.sock.send(d)
                except OSError as exc:        # ICMP port unreachable from an earlier send
                    self.icmp_error = str(exc)
            while (e := s.next_event()) is not None:
                self._note(e)
                if match(e):
                    return e
            if s.terminated is not None or now >= deadline:
                return None
            timer = s.get_timer()
            wait = deadline - now if timer is None else min(deadline, timer) - now
            for _key, _mask in self.sel.select(max(0.0, min(wait, 1.0))):
                while True:
                    try:
                        data = self.sock.recv(_RECV_SIZE)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        self.icmp_error = str(exc)
                        break
                    s.receive_datagram(data, self.clock())
            now = self.clock()
            t = s.get_timer()
            if t is not None and t <= now:
                s.handle_timer(now)

    def _note(self, e: ev.Event) -> None:
        if isinstance(e, ev.HandshakeComplete) and e.key_id == 0:
            self.tls_version, self.tls_cipher = e.tls_version, e.tls_cipher
        elif isinstance(e, ev.PushReplyReceived):
            self.pushed = list(e.raw)
        elif isinstance(e, ev.AuthFailed):
            self.auth_failed = e.reason
        elif isinstance(e, ev.ConnectionTerminated):
            self.terminated = e

    def failure(self, timeout: float) -> str:
        s = self.session
        if self.auth_failed is not None:
            self.reason = "auth-failed"
            return f"AUTH_FAILED: {self.auth_failed}"
        t = self.terminated
        if t is not None and t.reason != "hand-window":
            self.reason = t.reason
            return t.message
        p = s.primary
        if p is not None and s.remote_sid is None:
            self.reason = "no-answer"
            sends = p.send.sends(0)
            extra = f" ({self.icmp_error})" if self.icmp_error else ""
            return (f"no answer from server after {max(sends - 1, 0)} retransmits of the "
                    f"hard reset in {timeout:g} s{extra}")
        if s.dropped and s.last_error:
            self.reason = "timeout"
            return (f"handshake did not finish within {timeout:g} s; last dropped packet: "
                    f"{s.last_error}")
        self.reason = "timeout"
        if p is not None and p.state.name == "SENT_KEY":
            self.reason = "rejected"
            return (f"TLS handshake finished but the server never answered our key exchange "
                    f"within {timeout:g} s: it most likely rejected our certificate (expired, "
                    "revoked, wrong EKU) or credentials; the server log says which")
        if t is not None:
            return t.message
        state = p.state.name if p is not None else "?"
        return f"handshake did not finish within {timeout:g} s (key state {state})"


def probe_config(path: str, *, timeout: float = DEFAULT_TIMEOUT, ekm: bool = True) -> ProbeResult:
    """Read an OpenVPN client config and probe its first UDP remote."""
    from bsd_ovpn import config as configmod

    cfg = configmod.load(path)
    if not cfg.remotes:
        raise ConfigError("no remote given", cfg.path)
    remote = cfg.remotes[0]
    if not remote.proto.startswith("udp"):
        raise ConfigError(f"probe speaks UDP only; remote uses {remote.proto}", cfg.path)
    port = cfg.rport or remote.port
    settings = client_settings_from(cfg)
    settings.ekm = ekm
    return run_probe(settings, cfg.new_control_wrap(), (remote.host, port), timeout=timeout)
