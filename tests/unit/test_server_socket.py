"""The server's UDP socket: multihome (reply from the address used), scoped link-local
binds, ``bind ipv6only``.  Real sockets on loopback (127.0.0.0/8 is all local on
Linux, so 127.0.0.2 stands in for a secondary address); no root needed."""
from __future__ import annotations

import socket
import sys
import time
from types import SimpleNamespace

import pytest

from bsd_ovpn.daemon import pktinfo
from bsd_ovpn.daemon.loop import read_datagrams_from
from bsd_ovpn.daemon.server import bind_address, socket_v6only
from bsd_ovpn.engine.steering import make_udp_socket

linux_only = pytest.mark.skipif(sys.platform != "linux",
                                reason="127.0.0.2 is a local address only on Linux")


def _cfg(**kw: object) -> SimpleNamespace:
    base = dict(local=None, lport=None, port=1194, proto="udp", bind_ipv6only=False)
    base.update(kw)
    return SimpleNamespace(**base)


def _client(family: int = socket.AF_INET) -> socket.socket:
    c = socket.socket(family, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    c.settimeout(2)
    return c


@linux_only
def test_multihome_v4_replies_from_the_address_the_client_used() -> None:
    srv = make_udp_socket(("0.0.0.0", 0))
    srv.setblocking(False)
    pktinfo.enable(srv)
    port = srv.getsockname()[1]
    c = _client()
    try:
        c.sendto(b"hello", ("127.0.0.2", port))
        c.sendto(b"again", ("127.0.0.1", port))
        time.sleep(0.05)                     # let both arrive
        got = read_datagrams_from(srv, pktinfo=True)
        assert [(d, a, l.ip) for d, a, l in got] == [
            (b"hello", c.getsockname(), "127.0.0.2"), (b"again", c.getsockname(), "127.0.0.1")]
        for d, addr, local in got:
            pktinfo.send(srv, d.upper(), addr, local)
        assert c.recvfrom(100) == (b"HELLO", ("127.0.0.2", port))
        assert c.recvfrom(100) == (b"AGAIN", ("127.0.0.1", port))
        # NEW_PEER's local: the address, port 0 (the kernel uses the socket's port)
        assert got[0][2].sockaddr_for(socket.AF_INET) == ("127.0.0.2", 0)
        assert got[0][2].sockaddr_for(socket.AF_INET6) == ("::ffff:127.0.0.2", 0, 0, 0)
    finally:
        c.close()
        srv.close()


@linux_only
def test_multihome_dual_stack_socket_with_an_ipv4_client() -> None:
    """udp6 on "::" (dual-stack) reached over IPv4: the v4-mapped destination is read and
    the reply leaves from it (IP_PKTINFO on the IPv6 socket)."""
    srv = make_udp_socket(("::", 0), v6only=False)
    srv.setblocking(False)
    pktinfo.enable(srv)
    port = srv.getsockname()[1]
    c = _client()
    try:
        c.sendto(b"x", ("127.0.0.2", port))
        time.sleep(0.05)
        [(data, addr, local)] = read_datagrams_from(srv, pktinfo=True)
        assert local.ip == "127.0.0.2" and addr[0] == "::ffff:127.0.0.1"
        pktinfo.send(srv, b"y", addr, local)
        assert c.recvfrom(10) == (b"y", ("127.0.0.2", port))
    finally:
        c.close()
        srv.close()


def test_pktinfo_control_messages_round_trip() -> None:
    cm = pktinfo.cmsg_for(pktinfo.Local("192.0.2.3", 7))
    assert cm[:2] == (socket.IPPROTO_IP, pktinfo.IP_PKTINFO)
    assert pktinfo.parse([cm]) == pktinfo.Local("192.0.2.3", 0)    # ifindex not forced
    cm6 = pktinfo.cmsg_for(pktinfo.Local("2001:db8::3", 4))
    assert cm6[:2] == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO)
    assert pktinfo.parse([cm6]) == pktinfo.Local("2001:db8::3", 0)
    ll = pktinfo.cmsg_for(pktinfo.Local("fe80::a", 4))               # link-local keeps its link
    assert pktinfo.parse([ll]) == pktinfo.Local("fe80::a", 4)
    assert pktinfo.Local("fe80::a", 4).sockaddr_for(socket.AF_INET6) == ("fe80::a", 0, 0, 4)
    assert pktinfo.parse([]) is None
    assert pktinfo.parse([(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, b"short")]) is None


def test_bind_address_resolves_a_scoped_link_local_address() -> None:
    """bind() does not read "%lo"; the daemon resolves it into the 4-tuple's scope id."""
    lo = socket.if_nameindex()[0]
    host, port, _flow, scope = bind_address(_cfg(local=f"fe80::a%{lo[1]}", proto="udp6"))
    assert (host, port, scope) == ("fe80::a", 1194, lo[0])
    assert bind_address(_cfg(local="192.0.2.1", lport=1195)) == ("192.0.2.1", 1195)
    assert bind_address(_cfg(proto="udp6")) == ("::", 1194)
    assert bind_address(_cfg()) == ("0.0.0.0", 1194)
    from bsd_ovpn.daemon.loop import DaemonError
    with pytest.raises(DaemonError, match="fe80::a%nosuchif0"):
        bind_address(_cfg(local="fe80::a%nosuchif0", proto="udp6"))


def test_link_local_peer_addresses_carry_the_scope_once() -> None:
    """Python reports a link-local peer as ("fe80::b%lo", port, 0, 1); if_ovpn refuses a
    scope given twice, so the reader keeps it only in the scope id."""
    srv = make_udp_socket(("::1", 0))
    srv.setblocking(False)
    c = _client(socket.AF_INET6)
    try:
        c.sendto(b"x", srv.getsockname()[:2])
        time.sleep(0.05)
        [(_d, addr, local)] = read_datagrams_from(srv)
        assert local is None and "%" not in addr[0] and len(addr) == 4
    finally:
        c.close()
        srv.close()


def test_bind_ipv6only() -> None:
    assert socket_v6only(_cfg(proto="udp6")) is False                 # dual-stack
    assert socket_v6only(_cfg(proto="udp6", bind_ipv6only=True)) is True
    assert socket_v6only(_cfg(proto="udp4")) is None
    s = make_udp_socket(("::", 0), v6only=socket_v6only(_cfg(proto="udp6", bind_ipv6only=True)))
    try:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        s.close()
