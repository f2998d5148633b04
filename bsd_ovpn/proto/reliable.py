"""The OpenVPN control-channel reliability layer (spec §4), sans-IO.

Control packets travel over UDP, so OpenVPN numbers them (a "message packet-id"
per key_state, starting at 0), acknowledges them and retransmits what was not
acknowledged.  Stock peers are strict about the windows: a receiver neither
stores nor acknowledges an id outside ``[next_expected, next_expected + 12)``,
so a sender that ran ahead of 6 unacknowledged packets would make the peer
silently drop data.  Everything here is pure bookkeeping with the time passed
in, so the session and the tests can drive it with function calls.

Three pieces, one per key_state:

* :class:`SendWindow` hands out message ids (at most 6 in flight), knows when
  each packet is due again (2 s, doubling), and does fast retransmit after 3
  ACKs for higher ids.
* :class:`ReceiveWindow` stores out-of-order packets and releases payloads in
  id order; it tells the caller whether an id must be acknowledged.
* :class:`AckQueue` holds ids to acknowledge plus the 2.6 "MRU" list of ids
  already acknowledged, which are re-sent to fill free ACK slots because the
  first ACK may have been lost.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError

#: TLS_RELIABLE_N_SEND_BUFFERS: packets in flight per key_state.
SEND_WINDOW = 6
#: TLS_RELIABLE_N_REC_BUFFERS: receive reorder window.
RECEIVE_WINDOW = 12
#: RELIABLE_ACK_SIZE: ids in one ACK array (P_ACK_V1); a parser rejects more.
MAX_ACKS = 8
#: CONTROL_SEND_ACK_MAX: ids piggybacked on a P_CONTROL_*/reset packet.
CONTROL_SEND_ACK_MAX = 4
#: N_ACK_RETRANSMIT: ACKs for higher ids that trigger a fast retransmit.
FAST_RETRANSMIT_ACKS = 3
#: --tls-timeout: first retransmit interval, doubled on each resend.
INITIAL_TIMEOUT = 2.0
#: --max-packet-size default and the clamp OpenVPN applies.
DEFAULT_MAX_PACKET_SIZE = 1250
MIN_MAX_PACKET_SIZE = 154
MAX_MAX_PACKET_SIZE = 2048
#: IP + UDP header sizes included in the max-packet-size budget.
IPV4_UDP_OVERHEAD = 28
IPV6_UDP_OVERHEAD = 48
#: message packet-ids are u32 on the wire.
MAX_MESSAGE_ID = 0xFFFFFFFF


def ack_size(n: int) -> int:
    """Bytes an ACK array of ``n`` ids takes: count, ids, remote session id if any."""
    return 1 + 4 * n + (8 if n else 0)


def control_payload_room(*, wrap_overhead: int, n_acks: int,
                         max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                         ipv6: bool = False, extra: int = 0) -> int:
    """Bytes of TLS ciphertext that fit into one P_CONTROL_V1 (spec §4.1).

    OpenVPN budgets the whole datagram including IP/UDP headers; mirroring
    its formula exactly keeps our packets no larger than a stock peer's, which
    matters on paths where 1250 was chosen to avoid fragmentation.  ``extra``
    is subtracted as well (the tls-crypt-v2 WKc on P_CONTROL_WKC_V1).
    """
    if not MIN_MAX_PACKET_SIZE <= max_packet_size <= MAX_MAX_PACKET_SIZE:
        max_packet_size = max(MIN_MAX_PACKET_SIZE, min(max_packet_size, MAX_MAX_PACKET_SIZE))
    overhead = (1 + 8 + ack_size(min(n_acks, CONTROL_SEND_ACK_MAX)) + 4 + wrap_overhead
                + (IPV6_UDP_OVERHEAD if ipv6 else IPV4_UDP_OVERHEAD) + extra)
    room = max_packet_size - overhead
    if room <= 0:
        raise LocalProtocolError(
            f"max-packet-size {max_packet_size} leaves no room for control payload "
            f"(overhead {overhead} bytes)")
    return room


@dataclass(slots=True)
class _Outgoing:
    """One packet in the send window, waiting for its ACK."""

    message_id: int
    opcode: int
    payload: bytes
    next_try: float | None = None      # None: not sent yet, due now
    timeout: float = INITIAL_TIMEOUT
    higher_acks: int = 0
    sends: int = 0


class SendWindow:
    """Outgoing half of one key_state's reliability layer.

    The caller queues payloads with :meth:`add`, which refuses (returns None)
    when 6 packets are unacknowledged, and asks :meth:`due` which packets to
    put on the wire now; :meth:`mark_sent` starts their timers.  ACKs arriving
    from the peer go to :meth:`acknowledge`.
    """

    # A server keeps two of these per connected client for hours: slots, and the
    # dict of packets in flight is replaced by a fresh (table-less) one once empty.
    __slots__ = ("window", "next_id", "initial_timeout", "_out")

    def __init__(self, *, window: int = SEND_WINDOW, first_id: int = 0,
                 initial_timeout: float = INITIAL_TIMEOUT) -> None:
        self.window = window
        self.next_id = first_id
        self.initial_timeout = initial_timeout
        self._out: dict[int, _Outgoing] = {}

    # -- queueing ---------------------------------------------------------------
    @property
    def lowest_unacked(self) -> int:
        return min(self._out) if self._out else self.next_id

    def can_send(self) -> bool:
        """True if a new message id may be assigned (next - lowest_unacked < window)."""
        return self.next_id - self.lowest_unacked < self.window and self.next_id <= MAX_MESSAGE_ID

    def add(self, opcode: int, payload: bytes) -> int | None:
        """Assign the next message id to ``payload``; None if the window is full."""
        if not self.can_send():
            return None
        mid = self.next_id
        self._out[mid] = _Outgoing(mid, opcode, bytes(payload), timeout=self.initial_timeout)
        self.next_id += 1
        return mid

    def empty(self) -> bool:
        return not self._out

    def pending(self) -> list[tuple[int, int, bytes]]:
        """All unacknowledged packets as (message_id, opcode, payload), id order."""
        return [(o.message_id, o.opcode, o.payload) for _, o in sorted(self._out.items())]

    def packet(self, message_id: int) -> tuple[int, bytes]:
        o = self._out[message_id]
        return o.opcode, o.payload

    def sends(self, message_id: int) -> int:
        return self._out[message_id].sends if message_id in self._out else 0

    # -- timing -----------------------------------------------------------------
    def due(self, now: float) -> list[int]:
        """Message ids to (re)transmit now, lowest first."""
        out = []
        for mid, o in sorted(self._out.items()):
            if o.next_try is None or o.next_try <= now or o.higher_acks >= FAST_RETRANSMIT_ACKS:
                out.append(mid)
        return out

    def mark_sent(self, message_id: int, now: float) -> None:
        """Start/refresh the retransmit timer: next try after ``timeout``, then double it."""
        o = self._out.get(message_id)
        if o is None:
            return
        o.next_try = now + o.timeout
        o.timeout *= 2
        o.higher_acks = 0
        o.sends += 1

    def next_deadline(self) -> float | None:
        """Earliest time some packet is due (may be in the past); None if idle."""
        times = [o.next_try if o.next_try is not None else float("-inf")
                 for o in self._out.values()]
        if any(o.higher_acks >= FAST_RETRANSMIT_ACKS for o in self._out.values()):
            times.append(float("-inf"))
        return min(times) if times else None

    def schedule_now(self) -> None:
        """The "burst": resend everything now with the initial timeout.

        Used when the first packet of the peer arrives: until then the peer may
        not have existed, so the doubled timeouts say nothing about the path.
        """
        for o in self._out.values():
            o.next_try = None
            o.timeout = self.initial_timeout

    # -- acknowledgements --------------------------------------------------------
    def acknowledge(self, ids: list[int] | tuple[int, ...]) -> list[int]:
        """Drop acknowledged packets; count higher ACKs for fast retransmit.

        ACKs for ids not in flight are normal (MRU re-ACKs) and ignored.
        Returns the ids that this call removed from the window.
        """
        removed = []
        for aid in ids:
            if self._out.pop(aid, None) is not None:
                removed.append(aid)
                for o in self._out.values():
                    # only packets we already sent can be "overtaken"
                    if o.message_id < aid and o.next_try is not None:
                        o.higher_acks += 1
        if removed and not self._out:
            self._out = {}          # an emptied dict keeps its hash table
        return removed


class Verdict(enum.Enum):
    """What the receive window did with an incoming message id."""

    NEW = "new"              # stored; acknowledge
    DUPLICATE = "duplicate"  # already seen; acknowledge again, do not deliver twice
    OUTSIDE = "outside"      # beyond the window: neither stored nor acknowledged


class ReceiveWindow:
    """Incoming half: reorder up to 12 packets, deliver in message-id order."""

    __slots__ = ("window", "next_expected", "_stored")

    def __init__(self, *, window: int = RECEIVE_WINDOW, first_id: int = 0) -> None:
        self.window = window
        self.next_expected = first_id
        self._stored: dict[int, tuple[int, bytes]] = {}

    def receive(self, message_id: int, opcode: int, payload: bytes) -> Verdict:
        if message_id < self.next_expected:
            return Verdict.DUPLICATE
        if message_id >= self.next_expected + self.window:
            return Verdict.OUTSIDE
        if message_id in self._stored:
            return Verdict.DUPLICATE
        self._stored[message_id] = (opcode, bytes(payload))
        return Verdict.NEW

    def pop_ready(self) -> list[tuple[int, int, bytes]]:
        """Payloads that are now in order: [(message_id, opcode, payload)]."""
        out = []
        while self.next_expected in self._stored:
            opcode, payload = self._stored.pop(self.next_expected)
            out.append((self.next_expected, opcode, payload))
            self.next_expected += 1
        if out and not self._stored:
            self._stored = {}       # an emptied dict keeps its hash table
        return out

    def buffered(self) -> int:
        return len(self._stored)


@dataclass(slots=True)
class AckQueue:
    """Ids to acknowledge plus the MRU list of ids acknowledged before (2.6)."""

    pending: list[int] = field(default_factory=list)   # newest first
    mru: list[int] = field(default_factory=list)       # most recent first, ≤ MAX_ACKS

    def add(self, message_id: int) -> None:
        if message_id in self.pending:
            self.pending.remove(message_id)
        self.pending.insert(0, message_id)
        if len(self.pending) > 4 * MAX_ACKS:
            # A peer cannot legitimately have more than its window outstanding;
            # keep the newest so a flood cannot grow this list without bound.
            del self.pending[4 * MAX_ACKS:]

    def has_pending(self) -> bool:
        return bool(self.pending)

    def take(self, limit: int, *, mru: bool = True) -> list[int]:
        """Ids for one outgoing packet: pending first, then MRU fill, ≤ ``limit``.

        Taken pending ids move to the front of the MRU list so they are
        repeated in later packets (the peer may have lost this one).
        """
        if limit < 0 or limit > MAX_ACKS:
            raise LocalProtocolError(f"ACK limit {limit} outside 0..{MAX_ACKS}")
        taken = self.pending[:limit]
        del self.pending[:limit]
        out = list(taken)
        if mru:
            for mid in self.mru:
                if len(out) >= limit:
                    break
                if mid not in out:
                    out.append(mid)
        for mid in reversed(taken):
            if mid in self.mru:
                self.mru.remove(mid)
            self.mru.insert(0, mid)
        del self.mru[MAX_ACKS:]
        return out


def check_ack_count(n: int) -> None:
    """Reject ACK arrays longer than a stock peer accepts."""
    if n > MAX_ACKS:
        raise RemoteProtocolError(f"ACK array with {n} entries (maximum {MAX_ACKS})")
