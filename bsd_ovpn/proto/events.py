"""Events a :class:`~bsd_ovpn.proto.session.Session` hands to its driver.

Small frozen dataclasses, aioquic style: the daemon pulls them with
``next_event()`` and turns them into if_ovpn calls (NEW_KEY, SWAP_KEYS,
DEL_KEY), log lines or a restart.  The key events say *exactly* which kernel
slot to touch so the daemon never re-derives the slot dance of dco spec §4.4.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bsd_ovpn.ifovpn import KeySlot
from bsd_ovpn.proto.keys import DataKeys
from bsd_ovpn.proto.push import PushReply


class Event:
    """Base class of every session event."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    """TLS handshake of a key_state finished (before the key-method-2 exchange)."""

    key_id: int
    peer_common_name: str | None
    tls_version: str | None
    tls_cipher: str | None


@dataclass(frozen=True)
class PeerAuthenticated(Event):
    """Key-method-2 exchange done and (server) the credentials were accepted.

    ``peer_info`` is the client's peer-info as a dict (empty on the client side:
    a 2.6 server sends none).
    """

    key_id: int
    peer_common_name: str | None
    username: str | None
    peer_info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthRequest(Event):
    """Server: the verification hook deferred its decision.

    The driver later calls ``Session.set_auth_result(key_id, ok, reason)``.
    """

    key_id: int
    peer_common_name: str | None
    username: str | None
    password: str | None = field(repr=False, default=None)
    peer_info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KeysReady(Event):
    """Install data-channel keys: OVPN_NEW_KEY {slot, key_id, keys}.

    ``slot`` is PRIMARY for the first key of a session, SECONDARY for keys
    from renegotiations (TX stays on the old key until :class:`SwapKeys`).
    ``key_derivation`` is ``"prf"`` or ``"tls-ekm"``; ``peer_id`` is the
    session's peer id (None for a client that was not pushed one).
    """

    key_id: int
    keys: DataKeys
    slot: KeySlot
    peer_id: int | None
    key_derivation: str


@dataclass(frozen=True)
class SwapKeys(Event):
    """OVPN_SWAP_KEYS: the SECONDARY key (``key_id``) becomes the TX/PRIMARY key."""

    key_id: int


@dataclass(frozen=True)
class DeleteKey(Event):
    """OVPN_DEL_KEY {slot}: the key in ``slot`` (``key_id``) is no longer usable."""

    slot: KeySlot
    key_id: int


@dataclass(frozen=True)
class PushReplyReceived(Event):
    """Client: the server's (reassembled) PUSH_REPLY, parsed and applied.

    ``reply`` has the typed options (ifconfig, routes, ping, peer-id, ...);
    ``raw`` the option strings as received.
    """

    reply: PushReply = field(compare=False)
    raw: tuple[str, ...]


@dataclass(frozen=True)
class PushReplySent(Event):
    """Server: the PUSH_REPLY options sent to this client."""

    options: tuple[str, ...]


@dataclass(frozen=True)
class AuthFailed(Event):
    """Client: server sent AUTH_FAILED; server: our hook rejected the client."""

    reason: str


@dataclass(frozen=True)
class RestartReceived(Event):
    message: str


@dataclass(frozen=True)
class HaltReceived(Event):
    message: str


@dataclass(frozen=True)
class ExitReceived(Event):
    """Peer announced it is going away (cc-exit ``EXIT``)."""


@dataclass(frozen=True)
class InfoReceived(Event):
    """INFO / INFO_PRE / AUTH_PENDING text from the server."""

    kind: str
    text: str


@dataclass(frozen=True)
class SendPing(Event):
    """Userspace keepalive: nothing was sent for ``ping`` seconds; send a ping."""


@dataclass(frozen=True)
class ConnectionTerminated(Event):
    """The session is over; ``reason`` is a short keyword, ``message`` says why.

    reasons: ``hand-window``, ``tls-error``, ``auth-failed``, ``restart``,
    ``halt``, ``exit``, ``ping-restart``, ``closed``, ``protocol-error``,
    ``renegotiation-failed``, ``no-push-reply``.
    """

    reason: str
    message: str
