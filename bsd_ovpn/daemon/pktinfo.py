"""``multihome``: learn which local address a datagram was sent to, and reply from it.

A server bound to the wildcard address may be reached on any of the host's
addresses.  Without help the kernel picks the reply's source address from the
routing table, and a client drops replies from an address it did not talk to
(as OpenVPN does).  So, like OpenVPN's ``--multihome``, we ask for the
destination of every datagram (IP_PKTINFO / IPV6_RECVPKTINFO), send the replies
with that address as the source (``sendmsg`` with a PKTINFO control message),
and give it to the data channel as the peer's ``local`` address (OVPN_NEW_PEER,
port 0: the kernel substitutes the socket's port).

:class:`Local` is what the I/O layer hands the (sans-IO) server endpoint with
each datagram; the endpoint keeps it per client without looking inside.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import sys
from typing import Any, NamedTuple

log = logging.getLogger("bsd_ovpn.daemon")

_BSD = sys.platform.startswith("freebsd")
#: Python 3.11's socket module lacks IP_PKTINFO (Linux: 8); FreeBSD has no
#: IP_PKTINFO but IP_RECVDSTADDR / IP_SENDSRCADDR (both 7 there).
IP_PKTINFO: int | None = getattr(socket, "IP_PKTINFO", None if _BSD else 8)
IP_RECVDSTADDR: int | None = getattr(socket, "IP_RECVDSTADDR", 7 if _BSD else None)
IP_SENDSRCADDR: int | None = getattr(socket, "IP_SENDSRCADDR", IP_RECVDSTADDR)
_IN_PKTINFO = struct.Struct("=I4s4s")       # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")       # addr, ifindex
_CMSG_SPACE = socket.CMSG_SPACE(_IN6_PKTINFO.size) + socket.CMSG_SPACE(_IN_PKTINFO.size)


class Local(NamedTuple):
    """The server address a datagram was sent to: ``ip`` (text) and the arrival interface."""

    ip: str
    ifindex: int = 0

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version

    def sockaddr_for(self, sock_family: int) -> tuple:
        """OVPN_NEW_PEER's ``local`` (port 0): in the socket's family (v4-mapped on a
        dual-stack IPv6 socket, so it matches the remote's family)."""
        ip = ipaddress.ip_address(self.ip)
        if sock_family == socket.AF_INET6:
            if ip.version == 4:
                return (f"::ffff:{ip}", 0, 0, 0)
            return (str(ip), 0, 0, self.ifindex if ip.is_link_local else 0)
        return (str(ip), 0)


def enable(sock: socket.socket) -> None:
    """Ask the kernel for every datagram's destination address (before reading)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if IP_PKTINFO is not None:
            try:                             # v4-mapped clients on a dual-stack socket
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            except OSError:
                pass
    elif IP_PKTINFO is not None:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    elif IP_RECVDSTADDR is not None:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVDSTADDR, 1)
    else:
        raise OSError("multihome: this platform offers neither IP_PKTINFO nor IP_RECVDSTADDR")


def parse(ancdata: list[tuple[int, int, bytes]]) -> Local | None:
    """The destination address in a ``recvmsg`` control-message list (None: absent)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO \
                and len(data) >= _IN6_PKTINFO.size:
            addr, ifindex = _IN6_PKTINFO.unpack_from(data)
            ip = ipaddress.IPv6Address(addr)
            if ip.ipv4_mapped is not None:
                return Local(str(ip.ipv4_mapped), ifindex)
            return Local(str(ip), ifindex)
        if level == socket.IPPROTO_IP and IP_PKTINFO is not None and kind == IP_PKTINFO \
                and len(data) >= _IN_PKTINFO.size:
            # ipi_spec_dst: the local address (for a broadcast, the interface's own,
            # not the header's destination), which is what a reply must come from
            ifindex, spec_dst, _header_dst = _IN_PKTINFO.unpack_from(data)
            return Local(socket.inet_ntop(socket.AF_INET, spec_dst), ifindex)
        if level == socket.IPPROTO_IP and IP_RECVDSTADDR is not None and kind == IP_RECVDSTADDR \
                and len(data) >= 4:
            return Local(socket.inet_ntop(socket.AF_INET, data[:4]), 0)
    return None


def cmsg_for(local: Local) -> tuple[int, int, bytes]:
    """The control message that makes ``sendmsg`` use ``local`` as the source.

    An IPv4 source uses IP_PKTINFO even on a dual-stack IPv6 socket: Linux sends
    to a v4-mapped destination through its IPv4 path, which reads that one.
    The interface index is left 0 (routing picks it) except for link-local
    IPv6 sources, which only exist on their own link.
    """
    ip = ipaddress.ip_address(local.ip)
    if ip.version == 6:
        ifindex = local.ifindex if ip.is_link_local else 0
        return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(ip.packed, ifindex)
    if IP_PKTINFO is None and IP_SENDSRCADDR is not None:
        return socket.IPPROTO_IP, IP_SENDSRCADDR, ip.packed
    assert IP_PKTINFO is not None
    return socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, ip.packed, bytes(4))


def recv(sock: socket.socket, bufsize: int) -> tuple[bytes, Any, Local | None]:
    """One datagram with its destination address (``recvmsg``); raises like ``recvfrom``."""
    data, ancdata, _flags, addr = sock.recvmsg(bufsize, _CMSG_SPACE)
    return data, addr, parse(ancdata)


def send(sock: socket.socket, data: bytes, addr: Any, local: Local) -> None:
    """``sendto`` with ``local`` as the source address; raises like ``sendto``."""
    if sock.family == socket.AF_INET6 and local.version == 4 and ":" not in str(addr[0]):
        addr = (f"::ffff:{addr[0]}", addr[1], 0, 0)
    sock.sendmsg([data], [cmsg_for(local)], 0, addr)
