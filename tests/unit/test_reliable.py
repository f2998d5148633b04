"""Reliability layer: windows, ACK/MRU, retransmit timing, sizing (spec §4)."""
from __future__ import annotations

import pytest

from bsd_ovpn.errors import LocalProtocolError, RemoteProtocolError
from bsd_ovpn.proto import reliable as r


def test_send_window_stops_at_six_unacked() -> None:
    w = r.SendWindow()
    ids = [w.add(4, b"x%d" % i) for i in range(7)]
    assert ids == [0, 1, 2, 3, 4, 5, None]
    w.acknowledge([1])            # lowest unacked still 0: next - lowest = 6
    assert w.add(4, b"y") is None
    w.acknowledge([0])            # lowest now 2 -> 6 - 2 = 4 < 6
    assert w.add(4, b"y") == 6
    assert w.add(4, b"z") == 7
    assert w.add(4, b"w") is None


def test_retransmit_two_seconds_doubling() -> None:
    w = r.SendWindow()
    w.add(7, b"")
    sent_at = []
    t = 0.0
    while t < 31:
        for mid in w.due(t):
            sent_at.append(t)
            w.mark_sent(mid, t)
        t += 0.5
    assert sent_at == [0.0, 2.0, 6.0, 14.0, 30.0]
    assert w.next_deadline() == 62.0


def test_fast_retransmit_after_three_higher_acks() -> None:
    w = r.SendWindow()
    for i in range(5):
        w.add(4, bytes([i]))
    for mid in w.due(0):
        w.mark_sent(mid, 0)
    assert w.due(0.5) == []
    w.acknowledge([1])
    w.acknowledge([2])
    assert w.due(0.6) == []
    w.acknowledge([3])
    assert w.due(0.7) == [0]
    w.mark_sent(0, 0.7)
    assert w.due(0.8) == []


def test_acks_for_unknown_ids_are_harmless() -> None:
    w = r.SendWindow()
    w.add(4, b"a")
    assert w.acknowledge([5, 9, 0, 0]) == [0]
    assert w.empty()


def test_burst_resets_timers() -> None:
    w = r.SendWindow()
    w.add(4, b"a")
    for t in (0.0, 2.0, 6.0):
        w.mark_sent(0, t)
    assert w.next_deadline() == 14.0
    w.schedule_now()
    assert w.due(6.5) == [0]
    w.mark_sent(0, 6.5)
    assert w.next_deadline() == 8.5


def test_receive_window_reorders_and_classifies() -> None:
    rw = r.ReceiveWindow()
    assert rw.receive(2, 4, b"c") is r.Verdict.NEW
    assert rw.receive(1, 4, b"b") is r.Verdict.NEW
    assert rw.pop_ready() == []
    assert rw.receive(12, 4, b"late") is r.Verdict.OUTSIDE   # [0, 12)
    assert rw.receive(11, 4, b"l") is r.Verdict.NEW
    assert rw.receive(0, 4, b"a") is r.Verdict.NEW
    assert [p for _, _, p in rw.pop_ready()] == [b"a", b"b", b"c"]
    assert rw.receive(1, 4, b"b") is r.Verdict.DUPLICATE
    assert rw.receive(11, 4, b"l") is r.Verdict.DUPLICATE
    assert rw.receive(14, 4, b"o") is r.Verdict.NEW          # window moved to [3, 15)
    assert rw.receive(15, 4, b"o") is r.Verdict.OUTSIDE
    assert rw.buffered() == 2


def test_ack_queue_mru_refill() -> None:
    q = r.AckQueue()
    q.add(0)
    assert q.take(4) == [0]
    q.add(1)
    q.add(2)
    assert q.take(4) == [2, 1, 0]             # newest first, then MRU re-ACK
    assert q.take(8) == [2, 1, 0]             # nothing pending: pure MRU
    assert not q.has_pending()
    for i in range(3, 12):
        q.add(i)
    assert q.take(4) == [11, 10, 9, 8]
    assert q.take(8) == [7, 6, 5, 4, 3, 11, 10, 9]
    assert len(q.mru) == r.MAX_ACKS
    with pytest.raises(LocalProtocolError):
        q.take(9)


def test_payload_room_matches_observed_stock_sizes() -> None:
    # spec §4.1: observed full-size payloads of stock 2.6.14 (IPv4, 1250)
    assert r.control_payload_room(wrap_overhead=56, n_acks=1) == 1140
    assert r.control_payload_room(wrap_overhead=56, n_acks=3) == 1132
    assert r.control_payload_room(wrap_overhead=28, n_acks=1) == 1168
    assert r.control_payload_room(wrap_overhead=0, n_acks=1) == 1196
    assert r.control_payload_room(wrap_overhead=0, n_acks=7) == 1184  # capped at 4 acks
    assert r.control_payload_room(wrap_overhead=0, n_acks=0, ipv6=True) == 1250 - 14 - 48


def test_ack_count_limit() -> None:
    r.check_ack_count(8)
    with pytest.raises(RemoteProtocolError):
        r.check_ack_count(9)
