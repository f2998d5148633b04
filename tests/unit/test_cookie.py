"""Stateless HMAC cookie: validity slots, binding to address and sid, no state."""
from __future__ import annotations

import pytest

from bsd_ovpn.errors import LocalProtocolError
from bsd_ovpn.proto.cookie import CookieJar

SID = bytes.fromhex("0102030405060708")
ADDR = ("192.0.2.10", 40000)
SECRET = b"s" * 32


def test_make_is_deterministic_and_8_bytes():
    jar = CookieJar(SECRET)
    c = jar.make(1000.0, ADDR, SID)
    assert len(c) == 8 and any(c)
    assert jar.make(1000.9, ADDR, SID) == c
    assert CookieJar(SECRET).make(1000.0, ADDR, SID) == c      # pure: same secret, same cookie
    assert CookieJar().make(1000.0, ADDR, SID) != c            # random secret by default


def test_slots_current_minus_one_minus_two():
    jar = CookieJar(SECRET, hand_window=60)
    assert jar.slot_seconds == 30
    t = 30 * 1000 + 29.5                          # end of a slot
    c = jar.make(t, ADDR, SID)
    assert jar.check(t, ADDR, SID, c)
    assert jar.check(t + 1, ADDR, SID, c)         # next slot (-1)
    assert jar.check(t + 31, ADDR, SID, c)        # -2
    assert not jar.check(t + 61, ADDR, SID, c)    # -3: expired
    assert not jar.check(t - 30, ADDR, SID, c)    # from the future


def test_bound_to_address_port_and_sid():
    jar = CookieJar(SECRET)
    c = jar.make(500.0, ADDR, SID)
    assert not jar.check(500.0, ("192.0.2.11", 40000), SID, c)
    assert not jar.check(500.0, ("192.0.2.10", 40001), SID, c)
    assert not jar.check(500.0, ADDR, bytes.fromhex("0102030405060709"), c)
    assert not jar.check(500.0, ADDR, SID, c[:7] + bytes([c[7] ^ 1]))
    assert not jar.check(500.0, ADDR, SID, c[:7])
    assert not CookieJar(b"t" * 32).check(500.0, ADDR, SID, c)


def test_ipv6_and_v4_mapped():
    jar = CookieJar(SECRET)
    c6 = jar.make(10.0, ("2001:db8::1", 1194, 0, 0), SID)
    assert jar.check(10.0, ("2001:db8::1", 1194, 0, 0), SID, c6)
    assert not jar.check(10.0, ("2001:db8::2", 1194, 0, 0), SID, c6)
    c4 = jar.make(10.0, ADDR, SID)
    assert jar.check(10.0, ("::ffff:192.0.2.10", 40000, 0, 0), SID, c4)


def test_hand_window_changes_slot_length():
    jar = CookieJar(SECRET, hand_window=10)
    assert jar.slot_seconds == 5
    c = jar.make(100.0, ADDR, SID)
    assert jar.check(110.0, ADDR, SID, c)
    assert not jar.check(115.0, ADDR, SID, c)


@pytest.mark.parametrize("call", [
    lambda j: j.make(0, ADDR, b"short"),
    lambda j: j.make(0, ("not-an-ip", 1), SID),
    lambda j: j.make(0, ("192.0.2.1", 70000), SID),
    lambda j: j.make(0, "192.0.2.1", SID),
    lambda j: j.check(0, ADDR, b"", b"12345678"),
])
def test_bad_input(call):
    with pytest.raises(LocalProtocolError):
        call(CookieJar(SECRET))


def test_bad_construction():
    with pytest.raises(LocalProtocolError):
        CookieJar(b"short")
    with pytest.raises(LocalProtocolError):
        CookieJar(SECRET, hand_window=0)


@pytest.mark.parametrize("host", [
    "192.0.2.1", "0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3", "1.2.3.256", " 1.2.3.4",
    "::1", "::ffff:192.0.2.1", "::FFFF:192.0.2.1", "::ffff:c000:201", "2001:db8::1",
    "2001:DB8::1", "2001:0db8::1", "fe80::1%eth0", "::", "::192.0.2.1", "64:ff9b::1.2.3.4",
    "1:2:3:4:5:6:7:8", "1::2:3:4:5:6:7", "", "not-an-ip", "1.2.3.4\x00",
])
def test_fast_host_parse_agrees_with_ipaddress(host):
    """The inet_pton fast path must give what ipaddress gives (or the same error)."""
    from bsd_ovpn.proto.cookie import _host_bytes, _ip_bytes

    def outcome(f):
        try:
            return f(host)
        except LocalProtocolError as exc:
            return str(exc)

    assert outcome(_host_bytes) == outcome(_ip_bytes)


def test_mapped_and_plain_ipv4_sources_share_cookies():
    jar = CookieJar(SECRET)
    c = jar.make(10.0, ("192.0.2.77", 5000), SID)
    assert jar.check(10.0, ("::ffff:192.0.2.77", 5000, 0, 0), SID, c)
    assert not jar.check(10.0, ("192.0.2.78", 5000), SID, c)
