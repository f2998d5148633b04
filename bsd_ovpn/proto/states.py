"""Per-key_state negotiation states and every legal transition, in one table.

As in h11's ``_state.py``, the table is the single place that says what may
follow what; the session asks :func:`transition` and gets a
:class:`~bsd_ovpn.errors.LocalProtocolError` if its own code tries an illegal
step (a bug), instead of silently drifting into a state OpenVPN never has.
Names follow spec §6.5 (OpenVPN's S_* constants).
"""
from __future__ import annotations

import enum

from bsd_ovpn.errors import LocalProtocolError


class KSState(enum.IntEnum):
    """OpenVPN's key_state states; ordered so ``>=`` comparisons mean "at least"."""

    ERROR = -1
    INITIAL = 1
    PRE_START = 2       # our reset / soft reset (message id 0) queued, not acked
    START = 3           # our reset acked: TLS handshake runs
    SENT_KEY = 4        # we wrote our key-method-2 message
    GOT_KEY = 5         # we read the peer's key-method-2 message
    ACTIVE = 6          # both KM2 done and our last control packet acked
    GENERATED_KEYS = 7  # data-channel keys derived and handed out


class Trigger(enum.Enum):
    RESET_QUEUED = "reset queued"
    RESET_ACKED = "reset acked"
    KEY_SENT = "key-method-2 sent"
    KEY_RECEIVED = "key-method-2 received"
    SEND_WINDOW_EMPTY = "own control packets acked"
    KEYS_GENERATED = "keys generated"
    FAIL = "error"


S = KSState
T = Trigger

#: (state, trigger, is_server) -> next state.  is_server None = both roles.
_TABLE: dict[tuple[KSState, Trigger, bool | None], KSState] = {
    (S.INITIAL, T.RESET_QUEUED, None): S.PRE_START,
    (S.PRE_START, T.RESET_ACKED, None): S.START,
    # client writes its KM2 first, then reads the server's
    (S.START, T.KEY_SENT, False): S.SENT_KEY,
    (S.SENT_KEY, T.KEY_RECEIVED, False): S.GOT_KEY,
    (S.GOT_KEY, T.SEND_WINDOW_EMPTY, False): S.ACTIVE,
    # server reads the client's KM2, then writes its own
    (S.START, T.KEY_RECEIVED, True): S.GOT_KEY,
    (S.GOT_KEY, T.KEY_SENT, True): S.SENT_KEY,
    (S.SENT_KEY, T.SEND_WINDOW_EMPTY, True): S.ACTIVE,
    (S.ACTIVE, T.KEYS_GENERATED, None): S.GENERATED_KEYS,
}


#: _TABLE keyed by the trigger's value: a plain Enum hashes in Python, a str in C
_BY_VALUE: dict[tuple[KSState, str, bool | None], KSState] = {
    (state, trigger._value_, role): nxt for (state, trigger, role), nxt in _TABLE.items()
}


def transition(state: KSState, trigger: Trigger, *, server: bool) -> KSState:
    """Next state, or LocalProtocolError if ``trigger`` is illegal in ``state``."""
    if trigger is T.FAIL:
        return S.ERROR
    if trigger.__class__ is Trigger:
        value = trigger._value_
        nxt = _BY_VALUE.get((state, value, server))
        if nxt is None:
            nxt = _BY_VALUE.get((state, value, None))
        if nxt is not None:
            return nxt
    else:
        for key in ((state, trigger, server), (state, trigger, None)):
            if key in _TABLE:
                return _TABLE[key]
    role = "server" if server else "client"
    raise LocalProtocolError(f"{role} key_state cannot go from {state.name} on {trigger.value}")


def can(state: KSState, trigger: Trigger, *, server: bool) -> bool:
    return (state, trigger, server) in _TABLE or (state, trigger, None) in _TABLE
