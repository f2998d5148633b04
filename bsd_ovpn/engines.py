"""Engine selection: which implementation of if_ovpn a command talks to.

Two engines implement the if_ovpn command set: the FreeBSD kernel module
(:class:`~bsd_ovpn.transport.KernelTransport`, ioctls) and the userspace
engine daemon (:class:`~bsd_ovpn.engine.transport.EngineTransport`, a UNIX
socket), which runs the same commands over a tun device on hosts without
if_ovpn (Linux).  Everything above the transport is engine-blind, so the
only decision -- and the only place that knows both engines' failure modes
and how to tell a person what to do about them -- is here:

* ``"kernel"``: if_ovpn(4); tries ``kldload if_ovpn`` first, as OpenVPN does;
* ``"userspace"``: the engine daemon at the socket path (``--engine-socket``,
  else ``$BSD_OVPN_ENGINE_SOCKET``, else :data:`DEFAULT_ENGINE_SOCKET`);
* ``"auto"``: the kernel when its ``"openvpn"`` interface cloner already
  exists (no module is loaded behind the admin's back), else the userspace
  engine.

The engines also differ in what the UDP socket handed over by NEW_PEER must
look like (the userspace engine shares the port through SO_REUSEPORT);
:func:`needs_reuseport` answers that, so socket code does not test types.
"""
from __future__ import annotations

import errno as _errno
import os
import sys
from typing import Literal

from .errors import OvpnError, UnsupportedPlatform, ValidationError
from .transport import KernelTransport, RecordingTransport, Transport, errno_error
from .paths import ENGINE_SOCKET

__all__ = [
    "EngineName", "ENGINES", "DEFAULT_ENGINE_SOCKET", "ENGINE_SOCKET_ENV", "ENGINE_ENV",
    "IfOvpnNotLoaded", "EngineNotRunning", "open_transport", "engine_socket_path",
    "engine_kind", "needs_reuseport", "kernel_available",
]

EngineName = Literal["auto", "kernel", "userspace"]
ENGINES: tuple[str, ...] = ("auto", "kernel", "userspace")

#: Where ``ovpnctl engine run`` listens and every command looks by default.
#: /var/run rather than /run: FreeBSD (where the engine is the fallback) has no
#: /run, and on Linux /var/run is a symlink to /run.
DEFAULT_ENGINE_SOCKET = ENGINE_SOCKET
ENGINE_SOCKET_ENV = "BSD_OVPN_ENGINE_SOCKET"
ENGINE_ENV = "BSD_OVPN_ENGINE"


class IfOvpnNotLoaded(UnsupportedPlatform):
    """The kernel engine was asked for and if_ovpn is not there."""


class EngineNotRunning(OvpnError, ConnectionError):
    """No userspace engine daemon answers at the socket path."""

    def __init__(self, message: str, path: str) -> None:
        self.path = path
        super().__init__(message)


def engine_socket_path(socket_path: str | os.PathLike[str] | None = None) -> str:
    """The engine socket: the argument, else $BSD_OVPN_ENGINE_SOCKET, else the default."""
    if socket_path is not None and str(socket_path) != "":
        return os.fspath(socket_path)
    return os.environ.get(ENGINE_SOCKET_ENV) or DEFAULT_ENGINE_SOCKET


def _is_freebsd() -> bool:
    return sys.platform.startswith("freebsd")


def _start_hint(path: str) -> str:
    run = "ovpnctl engine run"
    if path != DEFAULT_ENGINE_SOCKET:
        run += f" --socket {path}"
    return f"start it with `{run}`"


def _open_kernel(*, load_module: bool) -> KernelTransport:
    if not _is_freebsd():
        raise IfOvpnNotLoaded(
            f"if_ovpn is a FreeBSD kernel module and this host is {sys.platform}; "
            "use --engine userspace (or auto)")
    try:
        return KernelTransport(load_module=load_module)
    except IfOvpnNotLoaded:
        raise
    except UnsupportedPlatform as exc:
        raise IfOvpnNotLoaded(f"if_ovpn is not loaded (kldload if_ovpn): {exc}") from exc


def _open_userspace(path: str, *, kernel_missing: bool = False) -> Transport:
    # Imported here: the engine package is Linux-oriented and not needed for the kernel.
    from .engine import transport as engine_transport

    try:
        return engine_transport.EngineTransport(path)
    except PermissionError as exc:
        raise errno_error(_errno.EPERM, "connect",
                          f"no permission to use the userspace engine at {path}: run as root, "
                          "or as a member of the group given to `ovpnctl engine run --group`"
                          ) from exc
    except engine_transport.EngineNotRunning as exc:
        what = (f"if_ovpn is not loaded (kldload if_ovpn) and the userspace engine is not "
                f"running at {path}" if kernel_missing
                else f"userspace engine not running at {path}")
        raise EngineNotRunning(f"{what}; {_start_hint(path)}", path) from exc


def kernel_available() -> bool:
    """True when the if_ovpn cloner exists now (no module is loaded to find out)."""
    if not _is_freebsd():
        return False
    try:
        _open_kernel(load_module=False).close()
    except (UnsupportedPlatform, OSError):
        return False
    return True


def open_transport(engine: str = "auto", *,
                   socket_path: str | os.PathLike[str] | None = None) -> Transport:
    """The transport for ``engine`` ("auto", "kernel" or "userspace"); see the module doc.

    Raises :class:`IfOvpnNotLoaded` or :class:`EngineNotRunning` with a
    message that says what to do, or ValidationError for an unknown engine.
    The caller closes the transport.
    """
    if engine not in ENGINES:
        raise ValidationError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    path = engine_socket_path(socket_path)
    if engine == "kernel":
        return _open_kernel(load_module=True)
    if engine == "userspace":
        return _open_userspace(path)
    # auto
    if _is_freebsd():
        try:
            return _open_kernel(load_module=False)
        except IfOvpnNotLoaded:
            return _open_userspace(path, kernel_missing=True)
    return _open_userspace(path)


def engine_kind(transport: object) -> str:
    """"kernel", "userspace" or "test" (a RecordingTransport); "unknown" otherwise."""
    if isinstance(transport, KernelTransport):
        return "kernel"
    if isinstance(transport, RecordingTransport):
        return "test"
    mod = type(transport).__module__
    if mod == "bsd_ovpn.engine" or mod.startswith("bsd_ovpn.engine."):
        return "userspace"
    return "unknown"


def needs_reuseport(transport: object) -> bool:
    """Whether NEW_PEER's socket must be bound with SO_REUSEPORT for this engine.

    The userspace engine joins the control plane's port through a reuseport
    group (``engine/steering.py``); the kernel hooks the socket itself and on
    FreeBSD SO_REUSEPORT would only let a second process bind the same port.
    """
    return engine_kind(transport) != "kernel"
