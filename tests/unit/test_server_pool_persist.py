"""``ifconfig-pool-persist``: OpenVPN's CN,IPv4[,IPv6] file, read at start, a returning
CN gets its old address while it is free, rewritten every SECONDS and at exit."""
from __future__ import annotations

import ipaddress
import time

from bsd_ovpn.daemon import poolpersist as pp
from bsd_ovpn.ifovpn import Command as C
from bsd_ovpn.proto import events as ev

from tests.unit.test_daemon_glue import ServerNet, files, last  # noqa: F401 - fixture
from tests.unit.test_server_scale import _pool

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


def test_parse_and_render_openvpn_format() -> None:
    text = ("alice,198.51.100.7,2001:db8:100::1007\nbob,198.51.100.8\ncarol,,2001:db8:100::9\n"
            "broken line\ndave,not-an-ip\n\n")
    got = pp.parse(text)
    assert got == {"alice": (V4("198.51.100.7"), V6("2001:db8:100::1007")),
                   "bob": (V4("198.51.100.8"), None), "carol": (None, V6("2001:db8:100::9"))}
    assert pp.parse(pp.render(got)) == got
    assert pp.render(got).splitlines()[1] == "bob,198.51.100.8"


def test_pool_gives_the_preferred_address_only_when_free() -> None:
    p = _pool("198.51.100.2", "198.51.100.20", "2001:db8:100::1000/64")
    a = p.allocate(0, prefer4=V4("198.51.100.9"), prefer6=V6("2001:db8:100::1005"))
    assert a == (V4("198.51.100.9"), V6("2001:db8:100::1005"))
    # taken, or outside the pool: the lowest free one instead
    assert p.allocate(1, prefer4=V4("198.51.100.9"))[0] == V4("198.51.100.2")
    assert p.allocate(2, prefer4=V4("192.0.2.9"), prefer6=V6("2001:db8:200::1"))[0] == \
        V4("198.51.100.3")
    assert str(p.allocate(2)[1]) == "2001:db8:100::1001"


def test_seconds_zero_is_read_only(tmp_path) -> None:
    f = tmp_path / "ipp.txt"
    f.write_text("alice,198.51.100.7\n")
    p = pp.PoolPersistence(str(f), 0)
    p.note("bob", V4("198.51.100.8"), None)
    p.tick(1e9)
    p.write()
    assert f.read_text() == "alice,198.51.100.7\n"
    q = pp.PoolPersistence(str(tmp_path / "new.txt"), 600)       # missing file: empty
    q.note("bob", V4("198.51.100.8"), None)
    q.note("x,y", V4("198.51.100.9"), None)                      # not representable: skipped
    q.tick(0.0)
    assert (tmp_path / "new.txt").read_text() == "bob,198.51.100.8\n"


def test_returning_client_gets_its_persisted_address(files) -> None:  # noqa: F811
    ipp = files["dir"] / "ipp-test.txt"
    ipp.write_text("alice,198.51.100.77\nsomeone,198.51.100.2\n")
    n = ServerNet(files, f"ifconfig-pool-persist {ipp} 1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(isinstance(e, ev.KeysReady)
                                                  for e in n.c_events):
        n.advance(0.5)
    assert bytes(last(n.tr, C.OVPN_NEW_PEER)["vpn_ipv4"]) == bytes([198, 51, 100, 77])
    n.d.close()
    assert sorted(ipp.read_text().splitlines()) == ["alice,198.51.100.77",
                                                    "someone,198.51.100.2"]
