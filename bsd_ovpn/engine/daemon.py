"""The engine daemon: the if_ovpn command set served over a UNIX socket.

One process serves any number of interfaces.  Clients (``EngineTransport``)
connect to a SOCK_SEQPACKET socket — message boundaries for free, and
SCM_RIGHTS to pass NEW_PEER's UDP socket, the way the kernel resolves the
"fd" number in the caller's table.  The socket file is 0600 root (or 0660
with ``--group``): file permissions are this engine's PRIV_NET_OVPN.

One selectors loop handles requests and the keepalive/notification timers
(:meth:`Engine.tick`); each interface's data plane moves packets on its own
thread(s).  SIGTERM/SIGINT destroy every interface (deleting its peers) and
remove the socket file.

Wire format (all integers big-endian):

* request: ``"OVE1"``, op u8, 3 pad, ifname[16], name2[16], command u64,
  bufsize u64, then the packed nvlist (SET) — ops: 1 set, 2 get, 3 create
  (ifname = requested name), 4 destroy, 5 rename (name2 = new name), 6 list,
  7 batch (below);
* reply: ``"OVE1"``, errno u32, then the GET reply / created name / the
  NUL-separated interface list.

Batch (op 7): N SET requests on one interface in one message, so a new
client's NEW_PEER + SET_PEER + NEW_KEY + START_VPN cost one message and one
reply instead of four of each (the per-message syscalls were most of the
engine's and the caller's cost per client).  The header's ``command`` field
is N (1..:data:`MAX_BATCH`), ``name2`` and ``bufsize`` are zero; then N
entries, each ``command u64, length u32, fd index i32`` (:data:`ENTRY`)
followed by ``length`` bytes of packed nvlist.  The fd index is -1 (no
descriptor) or an index into the message's SCM_RIGHTS array (at most
:data:`MAX_BATCH_FDS` descriptors; one socket used by several NEW_PEERs
travels once).  The whole message is at most ``REQ.size + MAX_DATA`` bytes.
Every entry runs, in order, exactly as the same op-1 request would (its own
errno; a failure does not stop the ones after it).  Reply: ``"OVE1"``,
errno 0, then N errnos u32 in entry order.  A batch that is not well formed
(N out of range, an entry running past the end, bytes left over, an fd
index without a descriptor, too many descriptors) runs nothing and is
answered with errno EINVAL alone (E2BIG when larger than the frame), and
the engine logs what was wrong.  An engine without batches answers
EOPNOTSUPP, also running nothing.
"""
from __future__ import annotations

import array
import errno as E
import grp
import logging
import os
import selectors
import signal
import socket
import struct
import time
from typing import Callable

from bsd_ovpn.engine import steering, tun as tunmod
from bsd_ovpn.engine.commands import Engine, KAddr, SocketInfo, inspect_socket
from bsd_ovpn.engine.dataplane import DataPlane, PythonDataPlane
from bsd_ovpn.errors import OvpnError

log = logging.getLogger("bsd_ovpn.engine")

MAGIC = b"OVE1"
REQ = struct.Struct("!4sB3x16s16sQQ")
REP = struct.Struct("!4sI")
OP_SET, OP_GET, OP_CREATE, OP_DESTROY, OP_RENAME, OP_LIST, OP_BATCH = range(1, 8)
MAX_DATA = 65536                 # larger SET requests are answered E2BIG
#: a batch entry: command u64, length u32, fd index i32 (-1: none)
ENTRY = struct.Struct("!QIi")
#: requests in one batch; descriptors in one message
MAX_BATCH = 256
MAX_BATCH_FDS = 16
# plain ints: the socket module's MsgFlag members make every ``&`` an enum call
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_ANC_SPACE = socket.CMSG_SPACE(MAX_BATCH_FDS * 4)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
SOCK_BUF = 8 << 20               # replies to GET_PEER_STATS can be large
ROUTE_REFRESH = 1.0
#: requests answered per client per selector wake-up (pipelined requests)
MAX_PER_WAKEUP = 32


DATAPLANE_KINDS = ("auto", "python", "fast")


def dataplane_factory(kind: str = "auto") -> Callable[[], DataPlane]:
    """``"python"``, ``"fast"`` (H7's C data plane) or ``"auto"``: fast when it loads.

    Logs one INFO line naming the choice, ``data plane: fast (--dataplane
    auto)``, so an operator (and a test reading the engine's log) can see
    what "auto" picked; :func:`dataplane_name` gives the same name in code.
    """
    if kind not in DATAPLANE_KINDS:
        raise ValueError(f"unknown data plane {kind!r} (expected one of "
                         f"{', '.join(DATAPLANE_KINDS)})")
    factory: Callable[[], DataPlane] = PythonDataPlane
    if kind != "python":
        try:
            from bsd_ovpn.engine.fastpath import FastDataPlane
            FastDataPlane().close()             # the native module is there and works
        except Exception as exc:
            if kind == "fast":
                raise RuntimeError(f"the C data plane is not available: {exc}") from exc
            log.info("C data plane unavailable (%s); using the Python one", exc)
        else:
            factory = FastDataPlane
    log.info("data plane: %s (--dataplane %s)", dataplane_name(factory), kind)
    return factory


def dataplane_name(factory: Callable[[], DataPlane]) -> str:
    """"fast" for the C data plane, "python" for :class:`PythonDataPlane`."""
    return "python" if factory is PythonDataPlane else "fast"


class LinuxHost:
    """The engine's :class:`~bsd_ovpn.engine.commands.Host` on Linux."""

    def __init__(self, dataplane_factory: Callable[[], DataPlane] | None = None) -> None:
        self._factory = dataplane_factory or PythonDataPlane
        self.tuns: dict[str, tunmod.LinuxTun | tunmod.FreeBSDTun] = {}
        # name -> (control socket kept alive like the kernel's soref, engine socket)
        self.sockets: dict[str, tuple[socket.socket, socket.socket]] = {}
        # name -> (the PeerIdSet, its layout, the program) last attached to its
        # engine socket
        self._programs: dict[str, tuple[steering.PeerIdSet, int, list[steering.Insn]]] = {}
        # name -> what inspect_socket said of its hooked socket (bound ones only)
        self._hooked_info: dict[str, SocketInfo] = {}

    def inspect_socket(self, fd: int) -> SocketInfo:
        """The kernel's getsock + sosockaddr; a hooked socket is recognised, not re-read.

        Every NEW_PEER of a server brings the same socket: one fstat names it
        (st_dev/st_ino: the same socket through any descriptor, and not
        reusable while the engine holds its dup) instead of a dup, a socket
        object, getsockname and close per peer.  Only bound sockets are
        remembered: a bound UDP socket cannot be bound again, so its address
        stays what it was (short of connect(), which the steering already
        rules out for the control socket, see :mod:`.steering`).  Any other
        socket is inspected and checked in full.
        """
        if self._hooked_info:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
            for info in self._hooked_info.values():
                if info.ident == ident:
                    return info
        return inspect_socket(fd)

    def select_source(self, remote: KAddr) -> bytes:
        """in6_selectsrc_addr: the source the routing table picks for ``remote``."""
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            s.connect((socket.inet_ntop(socket.AF_INET6, remote[1]), remote[2] or 9, 0,
                       remote[3]))
            return socket.inet_pton(socket.AF_INET6, s.getsockname()[0].split("%")[0])
        finally:
            s.close()

    def create_link(self, name: str) -> str:
        t = tunmod.open_tun(name)
        self.tuns[t.name] = t
        return t.name

    def destroy_link(self, name: str) -> None:
        t = self.tuns.pop(name, None)
        if t is not None:
            t.close()

    def rename_link(self, name: str, new_name: str) -> None:
        t = self.tuns[name]
        t.rename(new_name)
        self.tuns[new_name] = self.tuns.pop(name)
        if name in self.sockets:
            self.sockets[new_name] = self.sockets.pop(name)
        if name in self._programs:
            self._programs[new_name] = self._programs.pop(name)
        if name in self._hooked_info:
            self._hooked_info[new_name] = self._hooked_info.pop(name)

    def set_link_up(self, name: str) -> None:
        self.tuns[name].set_up()

    def link_is_up(self, name: str) -> bool:
        return tunmod.link_is_up(name)

    def link_exists(self, name: str) -> bool:
        return tunmod.link_exists(name)

    def make_dataplane(self, name: str) -> DataPlane:
        dp = self._factory()
        dp.tun_header = self.tuns[name].header
        return dp

    def hook_socket(self, name: str, fd: int, dataplane: DataPlane) -> None:
        """Join the control socket's port and start the data plane on it.

        The all-to-control program goes onto the *control* socket first, so
        the group has its program before the engine socket joins: no
        datagram is hashed to the engine in between.
        """
        control = socket.socket(fileno=os.dup(fd))
        try:
            steering.attach_program(control, steering.steering_program([]))
            engine = steering.open_engine_socket(control)
        except steering.SteeringError as exc:
            control.close()
            raise OSError(E.EINVAL, str(exc)) from exc
        except OSError:
            control.close()
            raise
        self.sockets[name] = (control, engine)
        self._programs.pop(name, None)
        self._hooked_info.pop(name, None)
        dataplane.attach(engine.fileno(), self.tuns[name].fd)
        try:
            info = inspect_socket(control.fileno())
        except OSError:
            return
        if info.local is not None and info.local[2] != 0:
            self._hooked_info[name] = info

    def unhook_socket(self, name: str, dataplane: DataPlane) -> None:
        dataplane.detach()
        pair = self.sockets.pop(name, None)
        self._programs.pop(name, None)
        self._hooked_info.pop(name, None)
        if pair is None:
            return
        control, engine = pair
        engine.close()
        try:
            control.setsockopt(socket.SOL_SOCKET, steering.SO_DETACH_REUSEPORT_BPF, 0)
        except OSError:
            pass
        control.close()

    def set_steering(self, name: str, peer_ids: steering.PeerIdSet) -> None:
        """Re-attach the block program for ``peer_ids`` when its blocks changed.

        O(1) when ``peer_ids.layout`` is what it was at the last attach (the
        common dense case: 63 of 64 NEW_PEERs); else O(runs of blocks) to
        build the program, and the setsockopt is still skipped when the
        program comes out the same (e.g. the opcode-only fallback).
        """
        pair = self.sockets.get(name)
        if pair is None:
            return
        last = self._programs.get(name)
        if last is not None and last[0] is peer_ids and last[1] == peer_ids.layout:
            return
        prog = steering.block_program(peer_ids)
        if last is None or last[2] != prog:
            steering.attach_program(pair[1], prog)
        self._programs[name] = (peer_ids, peer_ids.layout, prog)

    def gateway_routes(self, name: str) -> list:
        return tunmod.gateway_routes(name)

    def close(self) -> None:
        for name in list(self.tuns):
            self.destroy_link(name)


class EngineDaemon:
    """Accepts clients and runs their requests against one :class:`Engine`."""

    def __init__(self, socket_path: str, *, group: str | None = None,
                 engine: Engine | None = None, dataplane: str = "auto") -> None:
        self.path = socket_path
        #: "python" or "fast": the data plane new interfaces get (None with an
        #: injected ``engine``, whose host decides).
        self.dataplane: str | None = None
        if engine is None:
            factory = dataplane_factory(dataplane)
            self.dataplane = dataplane_name(factory)
            engine = Engine(LinuxHost(factory))
        self.engine = engine
        self.sel = selectors.DefaultSelector()
        self._stop = False
        self._rbuf = bytearray(REQ.size + MAX_DATA)
        self._rview = memoryview(self._rbuf)
        gid = grp.getgrnam(group).gr_gid if group else None
        if os.path.exists(socket_path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(socket_path)
            except OSError:
                os.unlink(socket_path)          # stale file of a dead daemon
            else:
                probe.close()
                raise RuntimeError(f"an engine is already running at {socket_path}")
            finally:
                probe.close()
        # The socket file appears only once it accepts connections: bound and
        # listening under a temporary name, then renamed into place.  Whoever
        # waits for the file (tests, service managers) could otherwise connect
        # between bind() and listen() and get ECONNREFUSED.
        staging = os.path.join(os.path.dirname(os.path.abspath(socket_path)),
                               f".engine-{os.getpid()}-{os.urandom(3).hex()}.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if os.path.lexists(staging):
                os.unlink(staging)
            old = os.umask(0o177)
            try:
                self.listener.bind(staging)
            finally:
                os.umask(old)
            if gid is not None:
                os.chown(staging, 0, gid)
                os.chmod(staging, 0o660)
            else:
                os.chmod(staging, 0o600)
            self.listener.listen(16)
            os.rename(staging, socket_path)
        except BaseException:
            self.listener.close()
            if os.path.lexists(staging):
                os.unlink(staging)
            raise
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)

    def stop(self, *_args: object) -> None:
        self._stop = True

    def serve_forever(self) -> None:
        last_routes = 0.0
        try:
            while not self._stop:
                try:
                    deadline = self.engine.tick()
                except Exception:                # keep serving; the log says what broke
                    log.exception("engine: timer/notification processing failed")
                    deadline = None
                now = time.monotonic()
                wait = 0.25 if deadline is None else min(0.25, max(0.0, deadline - now))
                for key, _ in self.sel.select(wait):
                    if key.data is None:
                        self._accept()
                    else:
                        self._serve(key.fileobj)
                if now - last_routes >= ROUTE_REFRESH:
                    last_routes = now
                    for name in self.engine.reap_vanished():
                        log.warning("interface %s is gone (its tun device was removed); "
                                    "dropped it and its peers", name)
                    try:
                        self.engine.refresh_routes()
                    except Exception:
                        log.exception("engine: reading the routing table failed")
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Destroy every interface, close clients, remove the socket file."""
        try:
            self.engine.close()
        finally:
            for key in list(self.sel.get_map().values()):
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, "client")

    def _serve(self, conn: socket.socket) -> None:
        """Answer the requests queued on ``conn``, up to MAX_PER_WAKEUP of them.

        Clients may pipeline requests (send several, then read the replies in
        order); draining them here saves a selector round and a timer pass
        per request, and the cap keeps one busy client from starving others.
        A batch ends the drain: its sender (EngineTransport) waits for the
        reply before it sends again, so another read would only cost a
        syscall and an EAGAIN; if more is queued after all, the next select
        reports it.
        """
        for _ in range(MAX_PER_WAKEUP):
            if not self._serve_one(conn):
                return

    def _serve_one(self, conn: socket.socket) -> bool:
        """One message and its reply; False when nothing more is expected (nothing
        queued, ``conn`` closed, or the message was a batch)."""
        fds = array.array("i")
        try:
            # into a buffer kept for the daemon's life: recvmsg() would allocate
            # (and free) 64 KiB per call, the final EAGAIN of each drain included
            n, anc, flags, _ = conn.recvmsg_into([self._rbuf], _ANC_SPACE)
            msg = bytes(self._rview[:n])
        except BlockingIOError:
            return False
        except OSError:
            msg, anc, flags = b"", [], 0
        for level, kind, data in anc:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        try:
            if not msg:
                self.sel.unregister(conn)
                conn.close()
                return False
            reply = self._dispatch(msg, flags, list(fds))
            try:
                conn.sendmsg([reply])
            except OSError as exc:
                log.warning("engine: cannot reply to a client: %s", exc)
            return len(msg) <= 4 or msg[4] != OP_BATCH
        finally:
            for fd in fds:
                os.close(fd)

    def _dispatch(self, msg: bytes, flags: int, fds: list[int]) -> bytes:
        if len(msg) < REQ.size:
            return REP.pack(MAGIC, E.EINVAL)
        magic, op, name, name2, cmd, bufsize = REQ.unpack_from(msg)
        if magic != MAGIC:
            return REP.pack(MAGIC, E.EINVAL)
        ifname = name.rstrip(b"\0").decode(errors="replace")
        data = msg[REQ.size:]
        eng = self.engine
        try:
            if op == OP_SET:
                if flags & _MSG_TRUNC:
                    return REP.pack(MAGIC, E.E2BIG if ifname in eng.interfaces else E.ENXIO)
                err = eng.handle_set(ifname, cmd, data or None, fds[0] if fds else None)
                return REP.pack(MAGIC, err)
            if op == OP_BATCH:
                return self._batch(ifname, cmd, name2, bufsize, data, flags, fds)
            if op == OP_GET:
                err, out = eng.handle_get(ifname, cmd, bufsize)
                return REP.pack(MAGIC, err) + out
            if op == OP_CREATE:
                err, created = eng.create_interface(ifname)
                return REP.pack(MAGIC, err) + created.encode()
            if op == OP_DESTROY:
                return REP.pack(MAGIC, eng.destroy_interface(ifname))
            if op == OP_RENAME:
                return REP.pack(MAGIC, eng.rename_interface(
                    ifname, name2.rstrip(b"\0").decode(errors="replace")))
            if op == OP_LIST:
                return REP.pack(MAGIC, 0) + b"\0".join(n.encode() for n in eng.list_interfaces())
        except Exception:                    # never let one request kill the daemon
            log.exception("engine: request op %d on %r failed", op, ifname)
            return REP.pack(MAGIC, E.EIO)
        return REP.pack(MAGIC, E.EOPNOTSUPP)

    def _batch(self, ifname: str, count: int, name2: bytes, bufsize: int, body: bytes,
               flags: int, fds: list[int]) -> bytes:
        """Op 7: check the whole batch first (nothing runs if it is malformed), then
        run every entry in order, each as its own op-1 request would run."""
        entries, why = parse_batch(count, name2, bufsize, body, flags, len(fds))
        if entries is None:
            log.warning("engine: refused a malformed batch for %r: %s", ifname, why)
            return REP.pack(MAGIC, E.E2BIG if flags & _MSG_TRUNC else E.EINVAL)

        def crashed(cmd: int, exc: Exception) -> int:  # that request's EIO, as for op 1
            log.error("engine: batched command %d on %r failed", cmd, ifname, exc_info=exc)
            return E.EIO

        errs = self.engine.handle_set_many(
            ifname, [(cmd, data or None, fds[fdi] if fdi >= 0 else None)
                     for cmd, data, fdi in entries], crashed)
        return REP.pack(MAGIC, 0) + struct.pack(f"!{len(errs)}I", *errs)


def parse_batch(count: int, name2: bytes, bufsize: int, body: bytes, flags: int,
                nfds: int) -> tuple[list[tuple[int, bytes, int]] | None, str]:
    """A batch's entries as (command, data, fd index), or (None, what is wrong).

    Trusts no length: every entry header and body is checked against what
    was received, the count against :data:`MAX_BATCH`, fd indexes against
    the descriptors that actually arrived.
    """
    if flags & _MSG_TRUNC:
        return None, f"larger than {REQ.size + MAX_DATA} bytes"
    if flags & _MSG_CTRUNC:
        return None, f"more than {MAX_BATCH_FDS} descriptors"
    if not 1 <= count <= MAX_BATCH:
        return None, f"{count} requests (1..{MAX_BATCH} allowed)"
    if bufsize or name2.strip(b"\0"):
        return None, "name2/bufsize set"
    entries = []
    pos, end, esize = 0, len(body), ENTRY.size
    for i in range(count):
        if end - pos < esize:
            return None, f"entry {i} of {count} is cut short"
        cmd, length, fdi = ENTRY.unpack_from(body, pos)
        pos += esize
        if length > end - pos:
            return None, f"entry {i} says {length} bytes, {end - pos} left"
        if not -1 <= fdi < nfds:
            return None, f"entry {i} names descriptor {fdi}, {nfds} sent"
        entries.append((cmd, body[pos:pos + length], fdi))
        pos += length
    if pos != end:
        return None, f"{end - pos} bytes after the last entry"
    return entries, ""


def setup_logging(verbose: bool = False) -> None:
    """Engine log lines on stderr, redacted and rate-limited (see :mod:`bsd_ovpn.logutil`)."""
    from bsd_ovpn import logutil

    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s engine: %(message)s")
    for handler in root.handlers:
        if handler not in before:
            logutil.harden(handler)


class EngineStartError(OvpnError):
    """The engine daemon could not start; the message says why."""


def run(socket_path: str, *, group: str | None = None, dataplane: str = "auto",
        replay_protection: bool = True) -> None:
    """Serve until SIGTERM/SIGINT: what ``ovpnctl engine run`` and ``python3 -m bsd_ovpn.engine`` do.

    One implementation for both entry points, so their checks, socket
    directory, log lines and signal handling cannot drift apart.
    """
    if os.geteuid() != 0:
        raise EngineStartError("the engine must run as root (it creates tun devices and "
                               "shares UDP ports)")
    parent = os.path.dirname(os.path.abspath(socket_path))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise EngineStartError(f"socket {socket_path}: cannot create {parent}: "
                               f"{exc.strerror}") from None
    try:
        daemon = EngineDaemon(socket_path, group=group, dataplane=dataplane)
    except KeyError:
        raise EngineStartError(f"--group {group!r}: no such group") from None
    except (RuntimeError, OSError) as exc:
        raise EngineStartError(f"cannot start the engine at {socket_path}: {exc}") from None
    daemon.engine.replay_protection = replay_protection
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    log.info("listening on %s", socket_path)
    daemon.serve_forever()
