"""EngineTransport: the Transport protocol spoken to the userspace engine daemon.

The typed API (``bsd_ovpn.interface``) sends the same packed nvlists to the
kernel (ioctls) or to the engine (this class), so nothing above the transport
branches on the backend.  Errors are the same ``IfOvpnError`` subclasses the
kernel transport raises (built by :func:`bsd_ovpn.binding.errno_error`).
The wire format is documented in :mod:`bsd_ovpn.engine.daemon`.
"""
from __future__ import annotations

import array
import errno as _errno
import socket
import struct
import threading

from bsd_ovpn.binding import command_name, encode_ifname, errno_error
from bsd_ovpn.engine.daemon import (
    ENTRY, MAGIC, MAX_BATCH, MAX_BATCH_FDS, MAX_DATA, OP_BATCH, OP_CREATE, OP_DESTROY, OP_GET,
    OP_LIST, OP_RENAME, OP_SET, REP, REQ, SOCK_BUF,
)
from bsd_ovpn.errors import IfOvpnError, OvpnError
from bsd_ovpn.ifovpn import MAX_REQUEST_SIZE, Command
from bsd_ovpn.transport import check_create_name
from bsd_ovpn.paths import ENGINE_SOCKET

DEFAULT_SOCKET = ENGINE_SOCKET
_MAX_REPLY = 64 << 20
_SET_REPLY = 4096        # more than a SET reply's header: nothing is cut
_PIPELINE = 16           # requests in flight in one request_many round (no batches)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_entry = ENTRY.pack
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class EngineNotRunning(OvpnError, ConnectionError):
    """No engine daemon answers at the socket path."""


class EngineTransport:
    """if_ovpn over the engine daemon's UNIX socket (SCM_RIGHTS for NEW_PEER's fd)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        self.path = socket_path
        self._lock = threading.Lock()
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.connect(socket_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            self._sock = None
            raise EngineNotRunning(
                f"userspace engine not running at {socket_path} "
                f"(start it with: python3 -m bsd_ovpn.engine --socket {socket_path})") from exc
        except PermissionError as exc:
            self._sock.close()
            self._sock = None
            raise errno_error(_errno.EPERM, "connect", f"no permission on {socket_path}") from exc
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        #: False once the engine answered a batch with EOPNOTSUPP (an older
        #: engine): request_many then pipelines single requests
        self._batches = True
        #: ifname -> its encoded form (a few names per transport; bounded anyway)
        self._names: dict[str, bytes] = {}

    def _call(self, op: int, ifname: str, *, name2: str = "", command: int = 0,
              bufsize: int = 0, data: bytes = b"", fd: int | None = None,
              what: str = "") -> bytes:
        if self._sock is None:
            raise ValueError("EngineTransport is closed")
        msg = REQ.pack(MAGIC, op, encode_ifname(ifname) if ifname else b"",
                       encode_ifname(name2) if name2 else b"", command, bufsize) + data
        anc = []
        if fd is not None:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [int(fd)]).tobytes())]
        with self._lock:
            try:
                self._sock.sendmsg([msg], anc)
                if op == OP_SET:
                    # a SET's reply is the bare header (errno): one read
                    reply = self._sock.recv(_SET_REPLY)
                else:
                    # learn the reply's size first (MSG_TRUNC gives the real length on
                    # Linux) so a large GET_PEER_STATS needs no huge fixed buffer
                    size = self._sock.recv_into(bytearray(1), 1,
                                                socket.MSG_PEEK | socket.MSG_TRUNC)
                    reply = self._sock.recv(min(max(size, 1), _MAX_REPLY))
            except OSError as exc:
                raise EngineNotRunning(f"userspace engine at {self.path} went away: "
                                       f"{exc.strerror}") from exc
        err = self._check_reply(reply)
        if err:
            raise errno_error(err, what or command_name(command), None, ifname or None)
        return reply[REP.size:]

    def request_many(self, ifname: str,
                     requests: list[tuple[Command, bytes | None, int | None]]
                     ) -> list[IfOvpnError | None]:
        """Several SETs, each run in order (even after one failed), in few round trips.

        Requests go in batches (op 7, see :mod:`bsd_ovpn.engine.daemon`): one
        message and one reply for up to ``MAX_BATCH`` of them.  A request
        larger than if_ovpn's MAX_REQUEST_SIZE goes alone (op 1), so its
        E2BIG is exactly the single request's.  Returns each request's error
        (None when it succeeded), in request order.
        """
        if self._sock is None:
            raise ValueError("EngineTransport is closed")
        out: list[IfOvpnError | None] = []
        i, n = 0, len(requests)
        while i < n:
            if not self._batches:
                out += self._pipeline(ifname, requests[i:])
                break
            command, data, fd = requests[i]
            if data is not None and len(data) > MAX_REQUEST_SIZE:
                try:
                    self._call(OP_SET, ifname, command=int(command), data=data, fd=fd)
                    out.append(None)
                except IfOvpnError as exc:
                    out.append(exc)
                i += 1
                continue
            errs, j = self._batch(ifname, requests, i)
            if errs is None:                  # an older engine: nothing ran
                self._batches = False
                continue
            out += errs
            i = j
        return out

    def _batch(self, ifname: str, requests: list[tuple[Command, bytes | None, int | None]],
               i: int) -> tuple[list[IfOvpnError | None] | None, int]:
        """One batch from ``requests[i]`` on, and its reply: (errors, where it ended).

        The batch ends within MAX_BATCH requests, the frame and MAX_BATCH_FDS
        distinct descriptors, and before a request that must go alone.
        Errors is None when the engine has no batches (nothing ran).
        """
        index: dict[int, int] = {}
        parts = [b""]
        size = 0
        j, stop = i, min(len(requests), i + MAX_BATCH)
        while j < stop:
            command, data, fd = requests[j]
            length = len(data) if data else 0
            if length > MAX_REQUEST_SIZE or size + ENTRY.size + length > MAX_DATA:
                break
            fdi = -1
            if fd is not None:
                fd = int(fd)
                fdi = index.get(fd, -1)
                if fdi < 0:
                    if len(index) == MAX_BATCH_FDS:
                        break
                    fdi = index[fd] = len(index)
            parts.append(_entry(command, length, fdi))   # IntEnum packs as its value
            if length:
                parts.append(data)           # type: ignore[arg-type]
            size += ENTRY.size + length
            j += 1
        count = j - i
        name = self._names.get(ifname)
        if name is None:
            name = encode_ifname(ifname)           # validates; raises on a bad name
            if len(self._names) < 64:
                self._names[ifname] = name
        parts[0] = REQ.pack(MAGIC, OP_BATCH, name, b"", count, 0)
        anc = []
        if index:
            anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", index).tobytes())]
        with self._lock:
            try:
                self._sock.sendmsg([b"".join(parts)], anc)     # type: ignore[union-attr]
                reply = self._sock.recv(_SET_REPLY)            # type: ignore[union-attr]
            except OSError as exc:
                raise EngineNotRunning(f"userspace engine at {self.path} went away: "
                                       f"{exc.strerror}") from exc
        err = self._check_reply(reply)
        if err == _errno.EOPNOTSUPP and len(reply) == REP.size:
            return None, i
        if err:
            raise errno_error(err, "engine batch",
                              f"the engine refused a batch of {count} requests "
                              f"(its log says why)", ifname or None)
        if len(reply) != REP.size + 4 * count:
            raise EngineNotRunning(f"malformed batch reply from the engine at {self.path}")
        errs = struct.unpack_from(f"!{count}I", reply, REP.size)
        if not any(errs):
            return [None] * count, j
        return [errno_error(e, command_name(requests[k][0]), None, ifname or None) if e
                else None for k, e in enumerate(errs, i)], j

    def _pipeline(self, ifname: str,
                  requests: list[tuple[Command, bytes | None, int | None]]
                  ) -> list[IfOvpnError | None]:
        """Single requests, all sent, then all replies read (an engine without batches).

        The engine serves one connection's messages in order, so reply i is
        request i's.  At most :data:`_PIPELINE` requests are in flight (longer
        lists go in chunks), so the replies always fit the socket buffer.
        """
        if len(requests) > _PIPELINE:
            return [e for i in range(0, len(requests), _PIPELINE)
                    for e in self._pipeline(ifname, requests[i:i + _PIPELINE])]
        name = encode_ifname(ifname)
        msgs = []
        for command, data, fd in requests:
            anc = []
            if fd is not None:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", [int(fd)]).tobytes())]
            msgs.append(([REQ.pack(MAGIC, OP_SET, name, b"", int(command), 0) + (data or b"")],
                         anc))
        replies = []
        with self._lock:
            try:
                for bufs, anc in msgs:
                    self._sock.sendmsg(bufs, anc)
                for _ in msgs:
                    replies.append(self._sock.recv(_SET_REPLY))
            except OSError as exc:
                raise EngineNotRunning(f"userspace engine at {self.path} went away: "
                                       f"{exc.strerror}") from exc
        out: list[IfOvpnError | None] = []
        for (command, _data, _fd), reply in zip(requests, replies):
            err = self._check_reply(reply)
            out.append(errno_error(err, command_name(command), None, ifname or None)
                       if err else None)
        return out

    def _check_reply(self, reply: bytes) -> int:
        """The errno of a well-formed reply; a broken one means the engine is gone."""
        if not reply:
            raise EngineNotRunning(f"userspace engine at {self.path} closed the connection")
        if len(reply) < REP.size:
            raise EngineNotRunning(f"malformed reply from the engine at {self.path}")
        magic, err = REP.unpack_from(reply)
        if magic != MAGIC:
            raise EngineNotRunning(f"the socket {self.path} is not a bsd_ovpn engine")
        return err

    def request(self, ifname: str, command: Command, data: bytes | None, *,
                fd: int | None = None) -> None:
        self._call(OP_SET, ifname, command=int(command), data=data or b"", fd=fd)

    def query(self, ifname: str, command: Command, bufsize: int) -> bytes:
        return self._call(OP_GET, ifname, command=int(command), bufsize=bufsize)

    def create_interface(self, name: str = "ovpn") -> str:
        check_create_name(name)
        return self._call(OP_CREATE, name, what="SIOCIFCREATE2").decode()

    def destroy_interface(self, name: str) -> None:
        self._call(OP_DESTROY, name, what="SIOCIFDESTROY")

    def rename_interface(self, name: str, new_name: str) -> None:
        self._call(OP_RENAME, name, name2=new_name, what="SIOCSIFNAME")

    def list_interfaces(self) -> list[str]:
        out = self._call(OP_LIST, "", what="list")
        return [n.decode() for n in out.split(b"\0") if n]

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> EngineTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
