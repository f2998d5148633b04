"""The UDP socket ``ovpnctl peer add`` binds and hands to if_ovpn.

NEW_PEER takes a bound UDP socket; the kernel (or the engine, which receives
it by SCM_RIGHTS) keeps a reference, so ovpnctl can exit right after.  The
socket's family follows the addresses:

* IPv4 remote, no --local or an IPv4 --local: an AF_INET socket;
* IPv6 remote: AF_INET6 (IPV6_V6ONLY on, unless the remote is v4-mapped);
* IPv4 remote with an IPv6 --local of ``[::]`` or a v4-mapped address: a
  dual-stack AF_INET6 socket (V6ONLY off) and the remote given to if_ovpn
  as ``::ffff:a.b.c.d``, which it converts back to IPv4 (if_ovpn.md §3 NEW_PEER 6).

Without --local the socket binds the wildcard address on the remote's port
(both ends of a static tunnel then use one port, like ``openvpn --port``);
``--local :0`` picks a free port.

For the userspace engine the socket needs SO_REUSEPORT (the engine joins its
port, see engine/steering.py).  SO_REUSEPORT would also let this bind join a
port that another socket of ours already holds -- another interface, or the
socket this interface kept after its last peer was deleted -- which breaks
that port's steering, so make_udp_socket first probes the port with a plain bind.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from bsd_ovpn.cli.args import BadInput, HostPort
from bsd_ovpn.engine.steering import make_udp_socket
from bsd_ovpn.errors import OvpnError


class SocketSetupError(OvpnError):
    """The UDP socket for a peer could not be bound; the message says why."""


@dataclass
class PeerSocket:
    sock: socket.socket
    remote: tuple            # (host, port[, flowinfo, scope]) as if_ovpn is to get it
    local: tuple | None      # only when a specific local address was given

    def close(self) -> None:
        self.sock.close()


def _explain_bind(exc: OSError, where: str) -> SocketSetupError:
    if exc.errno == errno.EADDRINUSE:
        return SocketSetupError(
            f"UDP {where} is in use (by another program, another interface, or the socket "
            "this interface kept after its last peer was deleted: if_ovpn holds it until "
            "the interface is destroyed); choose another --local port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return SocketSetupError(f"cannot bind UDP {where}: not an address of this host")
    if exc.errno == errno.EACCES:
        return SocketSetupError(f"cannot bind UDP {where}: ports below 1024 need root")
    return SocketSetupError(f"cannot bind UDP {where}: {exc.strerror or exc}")


def _sockaddr(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
              scope: int = 0) -> tuple:
    if addr.version == 6:
        return (str(addr), port, 0, scope)
    return (str(addr), port)


def open_peer_socket(remote: HostPort, local: HostPort | None, *,
                     reuseport: bool) -> PeerSocket:
    """Bind the socket for ``remote`` (see the module doc for the family rules)."""
    assert remote.address is not None
    r_addr = remote.address
    l_addr = local.address if local is not None else None
    port = local.port if local is not None else remote.port
    mapped_remote = r_addr.version == 6 and r_addr.ipv4_mapped is not None
    if r_addr.version == 4 and l_addr is not None and l_addr.version == 6:
        if not (l_addr.is_unspecified or l_addr.ipv4_mapped is not None):
            raise BadInput(f"--local {local} is IPv6 and --remote {remote} is IPv4: use an "
                           "IPv4 --local, [::] or a v4-mapped [::ffff:a.b.c.d] (dual-stack)")
        r_addr = ipaddress.IPv6Address(f"::ffff:{r_addr}")
        mapped_remote = True
    elif r_addr.version == 6 and l_addr is not None and l_addr.version == 4:
        raise BadInput(f"--local {local} is IPv4 and --remote {remote} is IPv6")
    if r_addr.version == 6 and l_addr is not None and not l_addr.is_unspecified:
        if (l_addr.ipv4_mapped is not None) != mapped_remote:
            raise BadInput(f"--local {local} and --remote {remote}: both or neither must be "
                           "v4-mapped addresses")
    family = socket.AF_INET6 if r_addr.version == 6 else socket.AF_INET
    if l_addr is None:
        l_addr = ipaddress.ip_address("::" if family == socket.AF_INET6 else "0.0.0.0")
    scope = local.scope_id if local is not None else 0
    bind_to = _sockaddr(l_addr, port, scope)
    v6only = (not mapped_remote) if family == socket.AF_INET6 else None
    where = str(HostPort(l_addr, port, scope))
    try:
        sock = make_udp_socket(bind_to, reuseport=reuseport, v6only=v6only)
    except OSError as exc:
        raise _explain_bind(exc, where) from None
    remote_sa = _sockaddr(r_addr, remote.port, remote.scope_id)
    bound_port = sock.getsockname()[1]          # the one picked for port 0
    local_sa = None if l_addr.is_unspecified else _sockaddr(l_addr, bound_port, scope)
    return PeerSocket(sock, remote_sa, local_sa)
