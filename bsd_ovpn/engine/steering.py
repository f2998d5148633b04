"""Split one UDP port between the control plane and the userspace engine (Linux).

if_ovpn hooks the control plane's own UDP socket and eats P_DATA_V2 datagrams
for known peer ids before they reach the socket buffer; everything else is
still read by the control plane as usual (spec if_ovpn.md §5).  A userspace
process cannot hook another process's socket, so the engine reproduces the
split with SO_REUSEPORT:

* the control plane binds its socket with SO_REUSEPORT set *before* bind
  (:func:`make_udp_socket` does this; it is the socket helper the library's
  daemons use), and does not connect() it (a connected member makes Linux
  bypass the group's program);
* at the first NEW_PEER the engine binds its own socket to exactly the same
  address (same family, IPV6_V6ONLY and SO_BINDTODEVICE, so both land in one
  reuseport group), and attaches a classic BPF reuseport program
  (SO_ATTACH_REUSEPORT_CBPF) to the group.  Its return value is an index into
  the group: the control plane's socket joined first (index 0), the engine's
  second (index 1);
* the program returns 1 (engine) when the payload is at least 8 bytes, its
  first byte >> 3 is 9 (P_DATA_V2) and the 24-bit peer id after it names a
  known peer; otherwise 0 (control plane).  Those are the kernel filter's
  three conditions, in its order.  The peer ids are a binary compare tree,
  regenerated and re-attached atomically on every peer add/delete.

For a reuseport program the packet data starts at the UDP payload, and a load
past the end makes the program return 0, so short datagrams go to the control
plane without a length test; the explicit ``len >= 8`` test keeps the 8-byte
rule the kernel has.

Measured here (Linux 6.18, loopback, 2 shared cores, 200 000 datagrams of
104 bytes from a forked Python sender; script in the engine's report):
plain socket 308 kpps; steered with 3 peers 294 kpps; steered with 1000
peers 294 kpps (another run: 248 vs 102 for plain, i.e. noise from the other
load on the machine dominates).  The sender/receiver loops are the
bottleneck, the program (about 30 instructions run per datagram for 1000
peers: a log2 tree) is not visible, and in every run no datagram reached the
wrong socket (tests/unit/test_engine_steering.py checks that exactly).
The fallback the design mentions (the engine owns
the socket and forwards control datagrams over a socketpair) would force the
control plane to read differently per backend, so it is not used; the price of
the chosen scheme is the SO_REUSEPORT requirement on the control socket, which
NEW_PEER reports as EADDRINUSE when it is not met.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable

from bsd_ovpn.errors import OvpnError
from bsd_ovpn.ifovpn import MAX_PEER_ID

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
SO_DETACH_REUSEPORT_BPF = getattr(socket, "SO_DETACH_REUSEPORT_BPF", 68)

CONTROL_INDEX = 0
ENGINE_INDEX = 1
P_DATA_V2 = 9

# classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_W_ABS = 0x20
_LD_B_ABS = 0x30
_LD_W_LEN = 0x80
_ALU_RSH_K = 0x74
_ALU_AND_K = 0x54
_JMP_JA = 0x05
_JMP_JEQ_K = 0x15
_JMP_JGT_K = 0x25
_JMP_JGE_K = 0x35
_RET_K = 0x06

BPF_MAXINSNS = 4096
#: Above this many peers the compare tree would not fit in BPF_MAXINSNS; the
#: program then steers on the opcode alone (see :func:`steering_program`).
MAX_TREE_PEERS = 1000

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)


class SteeringError(OvpnError):
    """The shared-port split could not be set up (says which step failed)."""


def _tree(peer_ids: list[int]) -> list[Insn]:
    """Instructions deciding on A = peer id: ret ENGINE if A is in ``peer_ids``.

    Balanced binary search; an inner node is ``jgt pivot`` followed by an
    unconditional ``ja`` over the left half, because conditional jump offsets
    are only 8 bits and the halves can be longer than 255 instructions.
    """
    if len(peer_ids) <= 2:
        out: list[Insn] = []
        for pid in peer_ids:
            out.append((_JMP_JEQ_K, 0, 1, pid))
            out.append((_RET_K, 0, 0, ENGINE_INDEX))
        out.append((_RET_K, 0, 0, CONTROL_INDEX))
        return out
    mid = len(peer_ids) // 2
    left = _tree(peer_ids[:mid])          # ids <= peer_ids[mid-1]
    right = _tree(peer_ids[mid:])
    return [(_JMP_JGT_K, 0, 1, peer_ids[mid - 1]),
            (_JMP_JA, 0, 0, len(left))] + left + right


def steering_program(peer_ids: Iterable[int] | None) -> list[Insn]:
    """The classic BPF reuseport program for a set of known peer ids.

    ``None`` (or more than :data:`MAX_TREE_PEERS` ids) gives the opcode-only
    program: every P_DATA_V2 of 8+ bytes goes to the engine, which then drops
    those of unknown peers (counted lost_data) instead of leaving them to the
    control plane.
    """
    head: list[Insn] = [
        (_LD_W_LEN, 0, 0, 0),
        (_JMP_JGE_K, 1, 0, 8),                       # len >= 8 ?
        (_RET_K, 0, 0, CONTROL_INDEX),
        (_LD_B_ABS, 0, 0, 0),
        (_ALU_RSH_K, 0, 0, 3),
        (_JMP_JEQ_K, 1, 0, P_DATA_V2),
        (_RET_K, 0, 0, CONTROL_INDEX),
    ]
    ids = None if peer_ids is None else sorted(set(peer_ids))
    if ids is not None and any(not 0 <= p <= MAX_PEER_ID for p in ids):
        raise ValueError("peer ids must be 24-bit numbers for steering")
    if ids is None or len(ids) > MAX_TREE_PEERS:
        return head + [(_RET_K, 0, 0, ENGINE_INDEX)]
    if not ids:
        return head[:-2] + [(_RET_K, 0, 0, CONTROL_INDEX)]
    prog = head + [(_LD_W_ABS, 0, 0, 0), (_ALU_AND_K, 0, 0, MAX_PEER_ID)] + _tree(ids)
    assert len(prog) <= BPF_MAXINSNS
    return prog


def run_program(prog: list[Insn], payload: bytes) -> int:
    """Interpret ``prog`` on a UDP payload, as the kernel would (for tests).

    Only the opcodes :func:`steering_program` emits are supported.
    """
    a = 0
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == _LD_W_LEN:
            a = len(payload)
        elif code == _LD_B_ABS:
            if k + 1 > len(payload):
                return 0
            a = payload[k]
        elif code == _LD_W_ABS:
            if k + 4 > len(payload):
                return 0
            a = struct.unpack_from("!I", payload, k)[0]
        elif code == _ALU_RSH_K:
            a >>= k
        elif code == _ALU_AND_K:
            a &= k
        elif code == _JMP_JA:
            pc += k
        elif code in (_JMP_JEQ_K, _JMP_JGT_K, _JMP_JGE_K):
            cond = {_JMP_JEQ_K: a == k, _JMP_JGT_K: a > k, _JMP_JGE_K: a >= k}[code]
            pc += jt if cond else jf
        elif code == _RET_K:
            return k
        else:  # pragma: no cover - programs come from steering_program only
            raise ValueError(f"unsupported BPF opcode {code:#x}")


def attach_program(sock: socket.socket, prog: list[Insn]) -> None:
    """Attach ``prog`` to the reuseport group ``sock`` is in (atomic replace)."""
    n = len(prog)
    arr = (ctypes.c_uint8 * (8 * n))()
    for i, (code, jt, jf, k) in enumerate(prog):
        struct.pack_into("=HBBI", arr, 8 * i, code, jt, jf, k)
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; },
    # padded to the pointer's alignment; the kernel copies the array at once.
    if struct.calcsize("P") == 8:
        fprog = struct.pack("=H6xQ", n, ctypes.addressof(arr))
    else:
        fprog = struct.pack("=H2xI", n, ctypes.addressof(arr))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        raise SteeringError(f"SO_ATTACH_REUSEPORT_CBPF failed: {exc.strerror}") from exc


def _sockaddr(local: tuple) -> tuple[int, tuple]:
    host = local[0]
    try:
        ip = ipaddress.ip_address(host) if host else None
    except ValueError as exc:
        raise ValueError(f"not an IP address: {host!r}") from exc
    if ip is not None and ip.version == 6:
        return socket.AF_INET6, (str(ip), local[1], 0, local[3] if len(local) > 3 else 0)
    return socket.AF_INET, (str(ip) if ip else "0.0.0.0", local[1])


def make_udp_socket(local: tuple, *, reuseport: bool = True,
                    v6only: bool | None = None) -> socket.socket:
    """A bound, unconnected UDP socket for an OpenVPN control plane.

    ``reuseport=True`` (the default) sets SO_REUSEPORT before bind, which is
    what lets the userspace engine share the port; the FreeBSD kernel data
    channel does not need it but is not harmed by it.  ``local`` is
    ``(host, port)`` or ``(host, port, flowinfo, scope_id)``; an IPv6 host
    gives an AF_INET6 socket (``v6only=False`` makes it dual-stack).

    SO_REUSEPORT would also let the bind silently *join* a port another of our
    sockets already holds (a second daemon, another interface), and the kernel
    would then hash that port's clients across both: so a fixed port is first
    probed with a plain bind, which fails with EADDRINUSE in that case.
    """
    family, addr = _sockaddr(local)
    if reuseport and addr[1] != 0:
        probe = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and v6only is not None:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            probe.bind(addr)
        finally:
            probe.close()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def open_engine_socket(control: socket.socket) -> socket.socket:
    """Bind the engine's socket into ``control``'s reuseport group.

    Copies what Linux compares when it groups sockets (family, bound address
    and port, IPV6_V6ONLY, SO_BINDTODEVICE).  Raises OSError(EADDRINUSE) when
    the control socket was bound without SO_REUSEPORT.
    """
    family = control.family
    if control.type != socket.SOCK_DGRAM or family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(errno.EPROTOTYPE, "the control socket is not a UDP/IP socket")
    if not control.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
        raise OSError(errno.EADDRINUSE,
                      "the control socket was bound without SO_REUSEPORT; "
                      "bind it with bsd_ovpn.engine.steering.make_udp_socket()")
    local = control.getsockname()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                            control.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        dev = control.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0")
        if dev:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev)
        sock.bind(local)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
