"""The daemon's control socket and the status model it serves.

One UNIX stream socket per daemon, root-only (directory 0700, socket 0600):
file permissions are the whole access control, as with the engine's socket.
A request is one JSON object on one line, the answer is one JSON object on
one line, then the daemon closes the connection::

    {"cmd": "status"}                     -> {"ok": true, "status": {...}}
    {"cmd": "kill", "target": "alice"}    -> {"ok": true, "killed": [3]}

The status dataclasses below are the stable JSON shape (docs/json.md,
"status"); renderers live in :mod:`bsd_ovpn.daemon.status`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bsd_ovpn.errors import OvpnError
from bsd_ovpn.paths import RUN_DIR

log = logging.getLogger("bsd_ovpn.daemon")

SOCKET_SUFFIX = ".ctl"
MAX_REQUEST = 4096
STATUS_SCHEMA = 1


class ControlError(OvpnError):
    """The control socket cannot be created or reached, or the daemon refused a request."""


def default_socket_path(config_path: str) -> str:
    """``/var/run/bsd_ovpn/<config file stem>.ctl`` (server.conf -> server.ctl)."""
    stem = os.path.splitext(os.path.basename(config_path))[0] or "ovpnctl"
    return os.path.join(RUN_DIR, stem + SOCKET_SUFFIX)


# --------------------------------------------------------------------------- status model

@dataclass
class ClientStatus:
    """One connected peer (server: a client; client: the server)."""

    peer_id: int
    common_name: str | None
    username: str | None
    real_address: str | None          # "ip:port" / "[ip6]:port"
    vpn_ipv4: str | None
    vpn_ipv6: str | None
    cipher: str | None
    key_id: int | None
    connected_since: float | None     # Unix time
    last_handshake: float | None      # Unix time of the latest key negotiation
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    iroutes: list[str] = field(default_factory=list)


@dataclass
class DaemonStatus:
    """Everything ``ovpnctl status`` shows."""

    role: str                         # "server" | "client"
    config: str
    pid: int
    engine: str                       # "kernel" | "userspace" | "test"
    interface: str | None
    started: float                    # Unix time
    state: str                        # "running", "connecting", "connected", "reconnecting", ...
    clients: list[ClientStatus] = field(default_factory=list)
    local: str | None = None          # bound UDP address
    remote: str | None = None         # client role: the server
    max_clients: int | None = None
    schema: int = STATUS_SCHEMA

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DaemonStatus:
        d = dict(d)
        clients = [ClientStatus(**c) for c in d.pop("clients", [])]
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(clients=clients, **known)


def format_addr(addr: Any) -> str | None:
    if addr is None:
        return None
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- server side

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """Accept requests on the control socket from inside the daemon's loop."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            if is_alive(path):
                raise ControlError(f"control socket {path} is in use by another daemon "
                                   "(choose another with --control-socket)")
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise ControlError(f"cannot create control socket {path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self._conns: dict[socket.socket, bytearray] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def register(self, loop: Any) -> None:
        self._loop = loop
        loop.add_reader(self.sock, self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket accept: %s", exc)
                return
            conn.setblocking(False)
            self._conns[conn] = bytearray()
            self._loop.add_reader(conn, lambda c=conn: self._read(c))

    def _read(self, conn: socket.socket) -> None:
        buf = self._conns.get(conn)
        if buf is None:
            return
        try:
            chunk = conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk and b"\n" not in buf:
            self._close(conn)
            return
        buf += chunk
        if len(buf) > MAX_REQUEST:
            self._reply(conn, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
            return
        if b"\n" not in buf and chunk:
            return
        line = bytes(buf).split(b"\n", 1)[0]
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self._reply(conn, {"ok": False, "error": f"bad request: {exc}"})
            return
        try:
            answer = self.handler(req)
        except OvpnError as exc:
            answer = {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a status bug must not kill the tunnel
            log.exception("control request %r failed", req.get("cmd"))
            answer = {"ok": False, "error": f"internal error: {exc}"}
        self._reply(conn, answer)

    def _reply(self, conn: socket.socket, answer: dict[str, Any]) -> None:
        data = (json.dumps(answer, sort_keys=True) + "\n").encode()
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(data)
        except OSError as exc:
            log.debug("control reply: %s", exc)
        self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._loop.remove_reader(conn)
        self._conns.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def is_alive(path: str | None) -> bool:
    """True if something accepts connections on the daemon control socket ``path``."""
    if not path:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# --------------------------------------------------------------------------- client side

def find_sockets(run_dir: str = RUN_DIR) -> list[str]:
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return []
    return [os.path.join(run_dir, n) for n in names if n.endswith(SOCKET_SUFFIX)]


def resolve_socket(path: str | None) -> str:
    """The socket to talk to: the one given, or the only daemon socket in /var/run/bsd_ovpn."""
    if path:
        return path
    found = find_sockets()
    if len(found) == 1:
        return found[0]
    if not found:
        raise ControlError(f"no daemon control socket in {RUN_DIR} (is ovpnctl server/client "
                           "running? give --control-socket)")
    raise ControlError("several daemons are running; choose one with --control-socket: "
                       + ", ".join(found))


def request(path: str | None, req: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the daemon's answer; ControlError if it failed."""
    path = resolve_socket(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError as exc:
            raise ControlError(f"no control socket at {path} (is the daemon running?)") from exc
        except PermissionError as exc:
            raise ControlError(f"no permission on {path} (the control socket is root-only)") \
                from exc
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror}") from exc
        s.sendall((json.dumps(req) + "\n").encode())
        buf = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 << 20:
                raise ControlError(f"answer from {path} is too large")
    except socket.timeout as exc:
        raise ControlError(f"the daemon at {path} did not answer within {timeout:g} s") from exc
    finally:
        s.close()
    try:
        answer = json.loads(bytes(buf))
    except ValueError as exc:
        raise ControlError(f"malformed answer from {path}: {exc}") from exc
    if not isinstance(answer, dict):
        raise ControlError(f"malformed answer from {path}")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "request failed")))
    return answer
