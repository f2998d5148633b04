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
  first byte >> 3 is 9 (P_DATA_V2) and the 24-bit peer id after it lies in
  a *steered block*; otherwise 0 (control plane).  The kernel's filter tests
  the same three conditions, in this order, except that its third one is
  "names a known peer".  The known ids are kept exactly, as runs of
  consecutive ids (:class:`PeerIdSet`, updated in O(log runs) per add or
  delete), and with them the :data:`STEER_BLOCK`-aligned blocks of 64 ids
  that hold at least one known id.  The program is a binary compare tree
  over the runs of those blocks (:func:`block_program`), re-attached
  atomically only when a block gains its first peer or loses its last one
  (``PeerIdSet.layout`` changes).

  Why blocks: an exact program changes on every NEW_PEER and DEL_PEER, and
  re-attaching it (SO_ATTACH_REUSEPORT_CBPF: the kernel checks, converts and
  JITs the program) was a fifth of the engine's CPU per new client.  A
  server hands out peer ids densely from 0, so with blocks a connect burst
  re-attaches once per 64 clients, and 1000 peers are still one run (a
  12-instruction program).  The price, and the one place where the split
  differs from the kernel's: a P_DATA_V2 whose id is *not* a peer but
  shares a block with one reaches the engine, which drops it and counts it
  (lost_data in), where the kernel would hand it to the control plane --
  which drops it too (no session has that peer id: data packets of unknown
  or deleted peers are useless to it).  Every datagram that is not
  P_DATA_V2, and every P_DATA_V2 outside the steered blocks, still reaches
  the control plane, and every P_DATA_V2 of a known peer the engine
  (tests/unit/test_engine_steering.py checks both exactly on real sockets).
  :func:`steering_program` is the exact form, for reference and tests.
  Only ids scattered into more than :data:`MAX_TREE_RUNS` (681) runs of
  blocks overflow BPF_MAXINSNS; the program then tests the opcode alone
  and the engine drops every unknown id the same way.

For a reuseport program the packet data starts at the UDP payload, and a load
past the end makes the program return 0, so short datagrams go to the control
plane without a length test; the explicit ``len >= 8`` test keeps the 8-byte
rule the kernel has.

Measured here (Linux 6.18, loopback, 2 shared cores, 200 000 datagrams of
104 bytes from a forked Python sender; script in the engine's report):
plain socket 308 kpps; steered with 3 peers 294 kpps; steered with 1000
peers 294 kpps (another run: 248 vs 102 for plain, i.e. noise from the other
load on the machine dominates).  The sender/receiver loops are the
bottleneck, the program (then about 30 instructions run per datagram for
1000 scattered peers: a log2 tree over single ids; a tree over runs runs
fewer) is not visible, and in every run no datagram reached the wrong socket
(tests/unit/test_engine_steering.py checks that exactly).
The fallback the design mentions (the engine owns
the socket and forwards control datagrams over a socketpair) would force the
control plane to read differently per backend, so it is not used; the price of
the chosen scheme is the SO_REUSEPORT requirement on the control socket, which
NEW_PEER reports as EADDRINUSE when it is not met.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import ipaddress
import itertools
import socket
import struct
from collections.abc import Iterable, Iterator

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
#: Instructions before the compare tree: length, opcode, peer id load and mask.
_HEAD_LEN = 9
#: Above this many runs of consecutive peer ids the compare tree (at most
#: 4 instructions per run and 2 per inner node) would not fit in
#: BPF_MAXINSNS; the program then steers on the opcode alone (see
#: :func:`steering_program`).
MAX_TREE_RUNS = (BPF_MAXINSNS - _HEAD_LEN + 2) // 6
#: The engine's program steers whole aligned blocks of this many ids (a
#: power of two, so blocks tile the 24-bit range): see the module docstring.
STEER_BLOCK_BITS = 6
STEER_BLOCK = 1 << STEER_BLOCK_BITS

Insn = tuple[int, int, int, int]  # (code, jt, jf, k)
_INSN = struct.Struct("=HBBI")      # struct sock_filter


class SteeringError(OvpnError):
    """The shared-port split could not be set up (says which step failed)."""


class _Runs:
    """A set of non-negative ints stored as sorted runs of consecutive values.

    ``add``/``discard`` cost a binary search plus at most one list
    insert/delete (a memmove of the run lists): no full sort per change.
    """

    __slots__ = ("_lo", "_hi", "_count")

    def __init__(self) -> None:
        self._lo: list[int] = []        # first value of each run, ascending
        self._hi: list[int] = []        # last value of the same run
        self._count = 0

    def add(self, pid: int) -> bool:
        """Add ``pid``; False if it was already there."""
        lo, hi = self._lo, self._hi
        i = bisect.bisect_right(lo, pid) - 1          # the run starting at or before pid
        if i >= 0 and pid <= hi[i]:
            return False
        joins_left = i >= 0 and hi[i] == pid - 1
        joins_right = i + 1 < len(lo) and lo[i + 1] == pid + 1
        if joins_left and joins_right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif joins_left:
            hi[i] = pid
        elif joins_right:
            lo[i + 1] = pid
        else:
            lo.insert(i + 1, pid)
            hi.insert(i + 1, pid)
        self._count += 1
        return True

    def discard(self, pid: int) -> bool:
        """Remove ``pid`` (splitting its run if it is inside one); False if absent."""
        lo, hi = self._lo, self._hi
        i = bisect.bisect_right(lo, pid) - 1
        if i < 0 or pid > hi[i]:
            return False
        first, last = lo[i], hi[i]
        if first == last:
            del lo[i], hi[i]
        elif pid == first:
            lo[i] = pid + 1
        elif pid == last:
            hi[i] = pid - 1
        else:
            hi[i] = pid - 1
            lo.insert(i + 1, pid + 1)
            hi.insert(i + 1, last)
        self._count -= 1
        return True

    def runs(self) -> list[tuple[int, int]]:
        """The (first, last) value of every run, ascending (a copy)."""
        return list(zip(self._lo, self._hi))

    @property
    def run_count(self) -> int:
        return len(self._lo)

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int):
            return False
        i = bisect.bisect_right(self._lo, pid) - 1
        return i >= 0 and pid <= self._hi[i]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for first, last in zip(self._lo, self._hi):
            yield from range(first, last + 1)


class PeerIdSet(_Runs):
    """A set of 24-bit peer ids stored as sorted runs of consecutive ids.

    Why runs: the program's size follows the number of runs, not of ids, and
    servers allocate ids densely, so the common case is one run however many
    peers there are.  Iterating gives the ids in ascending order.

    Beside the exact ids the set keeps the :data:`STEER_BLOCK`-aligned blocks
    that hold at least one of them (a count per block, and the blocks as runs)
    and :attr:`layout`, a number that changes exactly when that block set
    changes: the steering program is built over the blocks
    (:func:`block_program`), so a caller re-attaches it only when ``layout``
    moved -- once per 64 ids of a dense allocation, not once per peer.
    """

    __slots__ = ("_blocks", "_block_runs", "layout")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        super().__init__()
        self._blocks: dict[int, int] = {}   # block number -> how many ids it holds
        self._block_runs = _Runs()
        #: changes whenever a block gains its first id or loses its last one
        self.layout = 0
        for pid in sorted(set(ids)):
            self.add(pid)

    def add(self, pid: int) -> bool:
        """Add ``pid``; False if it was already there.  ValueError if not 24-bit."""
        if not 0 <= pid <= MAX_PEER_ID:
            raise ValueError(f"peer id {pid} is not a 24-bit number (steering)")
        if not _Runs.add(self, pid):
            return False
        block = pid >> STEER_BLOCK_BITS
        n = self._blocks.get(block, 0)
        self._blocks[block] = n + 1
        if not n:
            self._block_runs.add(block)
            self.layout += 1
        return True

    def discard(self, pid: int) -> bool:
        """Remove ``pid`` (splitting its run if it is inside one); False if absent."""
        if not _Runs.discard(self, pid):
            return False
        block = pid >> STEER_BLOCK_BITS
        n = self._blocks[block] - 1
        if n:
            self._blocks[block] = n
        else:
            del self._blocks[block]
            self._block_runs.discard(block)
            self.layout += 1
        return True

    def block_runs(self) -> list[tuple[int, int]]:
        """The runs of steered ids: every block holding a peer, widened to whole blocks."""
        return [(lo << STEER_BLOCK_BITS, (hi << STEER_BLOCK_BITS) | (STEER_BLOCK - 1))
                for lo, hi in self._block_runs.runs()]

    def __repr__(self) -> str:
        return f"PeerIdSet({self.runs()!r})"


def _leaf(out: list[Insn], first: int, last: int) -> None:
    """ret ENGINE if first <= A <= last, else ret CONTROL (A is a 24-bit id)."""
    if first == last:
        out += [(_JMP_JEQ_K, 0, 1, first), (_RET_K, 0, 0, ENGINE_INDEX),
                (_RET_K, 0, 0, CONTROL_INDEX)]
        return
    if first > 0:                       # A < first -> the final ret CONTROL
        out.append((_JMP_JGE_K, 0, 2 if last < MAX_PEER_ID else 1, first))
    if last < MAX_PEER_ID:              # A > last -> ret CONTROL
        out.append((_JMP_JGT_K, 1, 0, last))
    out.append((_RET_K, 0, 0, ENGINE_INDEX))
    if first > 0 or last < MAX_PEER_ID:
        out.append((_RET_K, 0, 0, CONTROL_INDEX))


def _tree(out: list[Insn], lo: list[int], hi: list[int], a: int, b: int) -> None:
    """Append instructions deciding on A = peer id over runs ``a..b-1``.

    Balanced binary search; an inner node is ``jgt last-of-left-half``
    followed by an unconditional ``ja`` over the left half, because
    conditional jump offsets are only 8 bits and a half can be longer than
    255 instructions.
    """
    if b - a == 1:
        _leaf(out, lo[a], hi[a])
        return
    mid = (a + b) // 2
    out.append((_JMP_JGT_K, 0, 1, hi[mid - 1]))      # A > left's last id -> right half
    ja = len(out)
    out.append((_JMP_JA, 0, 0, 0))
    _tree(out, lo, hi, a, mid)
    out[ja] = (_JMP_JA, 0, 0, len(out) - ja - 1)
    _tree(out, lo, hi, mid, b)


_HEAD: list[Insn] = [
    (_LD_W_LEN, 0, 0, 0),
    (_JMP_JGE_K, 1, 0, 8),                       # len >= 8 ?
    (_RET_K, 0, 0, CONTROL_INDEX),
    (_LD_B_ABS, 0, 0, 0),
    (_ALU_RSH_K, 0, 0, 3),
    (_JMP_JEQ_K, 1, 0, P_DATA_V2),
    (_RET_K, 0, 0, CONTROL_INDEX),
]
_LOAD_PEER_ID: list[Insn] = [(_LD_W_ABS, 0, 0, 0), (_ALU_AND_K, 0, 0, MAX_PEER_ID)]
assert len(_HEAD) + len(_LOAD_PEER_ID) == _HEAD_LEN
_OPCODE_ONLY: list[Insn] = _HEAD + [(_RET_K, 0, 0, ENGINE_INDEX)]


def steering_program(peer_ids: PeerIdSet | Iterable[int] | None) -> list[Insn]:
    """The exact classic BPF reuseport program for a set of known peer ids.

    Cost and size follow the number of runs of consecutive ids (a
    :class:`PeerIdSet` is used as is; any other iterable is converted, which
    also checks the ids are 24-bit).  ``None``, or more than
    :data:`MAX_TREE_RUNS` runs, gives the opcode-only program: every
    P_DATA_V2 of 8+ bytes goes to the engine, which then drops those of
    unknown peers (counted lost_data) instead of leaving them to the control
    plane.  The engine attaches :func:`block_program` instead (see the
    module docstring); this exact form is the kernel's rule, kept for
    reference and tests.
    """
    if peer_ids is None:
        return list(_OPCODE_ONLY)
    ids = peer_ids if isinstance(peer_ids, PeerIdSet) else PeerIdSet(peer_ids)
    return _program(ids._lo, ids._hi)


def block_program(peer_ids: PeerIdSet | None) -> list[Insn]:
    """The program the engine attaches: :func:`steering_program` over whole blocks.

    Steers P_DATA_V2 whose peer id lies in a :data:`STEER_BLOCK`-aligned
    block holding at least one known peer (``peer_ids.block_runs()``); it
    changes only when ``peer_ids.layout`` does.
    """
    if peer_ids is None:
        return list(_OPCODE_ONLY)
    runs = peer_ids.block_runs()
    return _program([r[0] for r in runs], [r[1] for r in runs])


def _program(lo: list[int], hi: list[int]) -> list[Insn]:
    """The program steering P_DATA_V2 of the ids in runs ``lo[i]..hi[i]`` to the engine."""
    if not lo:
        return [(_RET_K, 0, 0, CONTROL_INDEX)]
    if len(lo) > MAX_TREE_RUNS:
        return list(_OPCODE_ONLY)
    prog = _HEAD + _LOAD_PEER_ID
    _tree(prog, lo, hi, 0, len(lo))
    assert len(prog) <= BPF_MAXINSNS
    return prog


def run_program(prog: list[Insn], payload: bytes) -> int:
    """Interpret ``prog`` on a UDP payload, as the kernel would (for tests).

    Only the opcodes :func:`steering_program` emits are supported.  Like the
    kernel's checker, a jump past the end of the program is an error.
    """
    a = 0
    pc = 0
    while True:
        if not 0 <= pc < len(prog):
            raise ValueError(f"BPF jump out of the program (pc {pc})")
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


def pack_program(prog: list[Insn]) -> bytes:
    """The program as the kernel's ``struct sock_filter`` array (one Struct, no per-call format)."""
    return b"".join(itertools.starmap(_INSN.pack, prog))


def attach_program(sock: socket.socket, prog: list[Insn]) -> None:
    """Attach ``prog`` to the reuseport group ``sock`` is in (atomic replace)."""
    n = len(prog)
    arr = ctypes.create_string_buffer(pack_program(prog), 8 * n)
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
