"""Transports: how a packed if_ovpn request reaches whatever implements if_ovpn.

The typed API (``interface.py``) builds nvlists and parses replies; a
transport only moves bytes.  Keeping that seam narrow is what lets the same
API drive the FreeBSD kernel (:class:`KernelTransport`, ioctls), the Linux
userspace engine (``bsd_ovpn.engine.transport``, a UNIX socket) and tests
(:class:`RecordingTransport`, which records every call and answers from a
script).

Every transport reports failures as :class:`~bsd_ovpn.errors.IfOvpnError`
(built with :func:`errno_error`, so the errno picks a catchable subclass) with
the kernel's command name and the interface name.
"""
from __future__ import annotations

import errno as _errno
import itertools
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

from . import binding
from .binding import (  # re-exported: the engine transport raises the same classes
    IfOvpnBufferTooSmall,
    IfOvpnBusy,
    IfOvpnExists,
    IfOvpnNoSuchInterface,
    IfOvpnNotFound,
    IfOvpnNotSupported,
    IfOvpnPermissionError,
    encode_ifname,
    errno_error,
)
from .errors import IfOvpnError, UnsupportedPlatform, ValidationError
from .ifovpn import CLONER_NAME, GET_COMMANDS, INTERFACE_PREFIX, POLL_PKT_BUFSIZE, Command

__all__ = [
    "Transport", "KernelTransport", "RecordingTransport", "RecordedCall", "errno_error",
    "IfOvpnBufferTooSmall", "IfOvpnBusy", "IfOvpnExists", "IfOvpnNoSuchInterface",
    "IfOvpnNotFound", "IfOvpnNotSupported", "IfOvpnPermissionError",
]


@runtime_checkable
class Transport(Protocol):
    """The if_ovpn command set as bytes in, bytes out.

    ``request`` is SIOCSDRVSPEC: ``data`` is a packed nvlist, or None for
    ``ifd_len`` 0 (START_VPN).  ``fd`` is, for NEW_PEER, the UDP socket whose
    number is also in the nvlist's "fd": the kernel resolves that number in
    the caller's fd table and ignores ``fd``; the engine transport passes the
    descriptor by SCM_RIGHTS.  ``query`` is SIOCGDRVSPEC and returns the reply
    bytes (``ifd_len`` of them) or raises ENOSPC if they exceed ``bufsize``.
    """

    def request(self, ifname: str, command: Command, data: bytes | None, *,
                fd: int | None = None) -> None: ...

    def query(self, ifname: str, command: Command, bufsize: int) -> bytes: ...

    def create_interface(self, name: str = "ovpn") -> str: ...

    def destroy_interface(self, name: str) -> None: ...

    def rename_interface(self, name: str, new_name: str) -> None: ...

    def list_interfaces(self) -> list[str]: ...

    def close(self) -> None: ...


def check_create_name(name: str) -> None:
    """The if_ovpn cloner only matches names starting with "ovpn"."""
    encode_ifname(name)
    if not name.startswith(INTERFACE_PREFIX):
        raise ValidationError(
            f"cannot create {name!r}: if_ovpn interfaces are created with a name starting "
            f"with {INTERFACE_PREFIX!r} (e.g. 'ovpn' or 'ovpn3'); rename it afterwards")


# --------------------------------------------------------------------------
# FreeBSD kernel
# --------------------------------------------------------------------------

class KernelTransport:
    """if_ovpn(4) through ioctls on an AF_LOCAL datagram socket (as OpenVPN does).

    Construction checks availability the way OpenVPN does: try kldload
    if_ovpn (errors ignored: it may be built in or loaded), then require the
    "openvpn" cloner in SIOCIFGCLONERS.  Off FreeBSD 14+ it raises
    UnsupportedPlatform before touching anything.
    """

    def __init__(self, *, load_module: bool = True) -> None:
        binding.require_freebsd()
        self._fd: int | None = binding.open_control_socket()
        try:
            kld_errno = binding.kldload("if_ovpn") if load_module else None
            cloners = binding.list_cloners(self._fd)
            if CLONER_NAME not in cloners:
                why = ""
                if kld_errno not in (None, _errno.EEXIST):
                    why = f"; kldload if_ovpn failed: {_errno.errorcode.get(kld_errno, kld_errno)}"
                raise UnsupportedPlatform(
                    f"if_ovpn is not available: no {CLONER_NAME!r} interface cloner{why} "
                    "(load it with 'kldload if_ovpn' as root)")
        except BaseException:
            self.close()
            raise

    @property
    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("KernelTransport is closed")
        return self._fd

    def request(self, ifname: str, command: Command, data: bytes | None, *,
                fd: int | None = None) -> None:
        binding.drvspec_set(self.fileno, ifname, command, data)

    def query(self, ifname: str, command: Command, bufsize: int) -> bytes:
        return binding.drvspec_get(self.fileno, ifname, command, bufsize)

    def create_interface(self, name: str = "ovpn") -> str:
        check_create_name(name)
        return binding.if_create(self.fileno, name)

    def destroy_interface(self, name: str) -> None:
        binding.if_destroy(self.fileno, name)

    def rename_interface(self, name: str, new_name: str) -> None:
        binding.if_rename(self.fileno, name, new_name)

    def list_interfaces(self) -> list[str]:
        """Interfaces that answer OVPN_POLL_PKT (names alone lie: OpenVPN renames to tun0).

        POLL_PKT only reads the queue length, so probing is harmless.  EPERM
        also marks an if_ovpn interface: only its handler checks PRIV_NET_OVPN.
        """
        found = []
        for _index, name in socket.if_nameindex():
            try:
                self.query(name, Command.OVPN_POLL_PKT, POLL_PKT_BUFSIZE)
            except IfOvpnPermissionError:
                found.append(name)
            except (IfOvpnError, ValidationError):
                continue
            else:
                found.append(name)
        return found

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            binding.close_fd(fd)

    def __enter__(self) -> KernelTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# Recording transport (a real test tool)
# --------------------------------------------------------------------------

#: A scripted answer: reply bytes, an errno, or an exception to raise.
Reply = Union[bytes, int, BaseException]


@dataclass(frozen=True)
class RecordedCall:
    """One call made on a RecordingTransport."""

    method: str                    # "request", "query", "create_interface", ...
    ifname: str | None
    command: Command | int | None = None
    data: bytes | None = None      # request bytes (None = ifd_len 0)
    fd: int | None = None
    bufsize: int | None = None     # query buffer size
    new_name: str | None = None    # rename target

    def nvlist(self) -> Any:
        """The request unpacked (an ``nv.NVList``), or None for ``ifd_len`` 0."""
        from . import nv

        return None if self.data is None else nv.unpack(self.data)


class RecordingTransport:
    """Records every call and answers from scripted replies/errnos.

    It imitates the kernel's transport-level behaviour so API logic can be
    tested without a kernel: a query whose scripted reply is longer than the
    buffer raises ENOSPC and (like the kernel) consumes that reply -- which
    is what loses a GET_PKT notification; GET_PKT with nothing scripted
    raises ENOENT (empty queue); interfaces are named ovpn0, ovpn1, ...
    """

    def __init__(self, interfaces: list[str] | None = None) -> None:
        self.calls: list[RecordedCall] = []
        self.interfaces: list[str] = list(interfaces or [])
        self._replies: dict[int, deque[Reply]] = {}
        self._units = itertools.count()
        self.closed = False

    # -- scripting ---------------------------------------------------------
    def script(self, command: Command | int, *replies: Reply) -> RecordingTransport:
        """Queue answers for ``command``: bytes (GET reply; ignored for SET),
        an int errno, or an exception instance.  SET commands with nothing
        scripted succeed."""
        self._replies.setdefault(int(command), deque()).extend(replies)
        return self

    def fail(self, command: Command | int, err: int, times: int = 1) -> RecordingTransport:
        return self.script(command, *([err] * times))

    def pending(self, command: Command | int) -> int:
        return len(self._replies.get(int(command), ()))

    # -- inspection --------------------------------------------------------
    @property
    def requests(self) -> list[tuple[str, Command | int, bytes | None, int | None]]:
        """Every SET call as (ifname, command, bytes, fd), in order."""
        return [(c.ifname or "", c.command or 0, c.data, c.fd)
                for c in self.calls if c.method == "request"]

    @property
    def queries(self) -> list[tuple[str, Command | int, int]]:
        """Every GET call as (ifname, command, bufsize), in order."""
        return [(c.ifname or "", c.command or 0, c.bufsize or 0)
                for c in self.calls if c.method == "query"]

    # -- Transport ---------------------------------------------------------
    def _next(self, command: Command | int) -> Reply | None:
        queue = self._replies.get(int(command))
        return queue.popleft() if queue else None

    @staticmethod
    def _raise(reply: Reply, command: Command | int, ifname: str | None) -> None:
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, int):
            raise errno_error(reply, binding.command_name(int(command)), None, ifname)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("RecordingTransport is closed")

    def request(self, ifname: str, command: Command, data: bytes | None, *,
                fd: int | None = None) -> None:
        self._check_open()
        self.calls.append(RecordedCall("request", ifname, command,
                                       None if data is None else bytes(data), fd))
        encode_ifname(ifname)
        reply = self._next(command)
        if reply is not None:
            self._raise(reply, command, ifname)

    def query(self, ifname: str, command: Command, bufsize: int) -> bytes:
        self._check_open()
        self.calls.append(RecordedCall("query", ifname, command, bufsize=bufsize))
        encode_ifname(ifname)
        reply = self._next(command)
        name = binding.command_name(int(command))
        if reply is None:
            if int(command) == Command.OVPN_GET_PKT:
                raise errno_error(_errno.ENOENT, name, "no notification pending", ifname)
            if int(command) not in GET_COMMANDS:
                raise errno_error(_errno.ENOTSUP, name, None, ifname)
            raise LookupError(f"RecordingTransport: no reply scripted for {name}")
        self._raise(reply, command, ifname)
        assert isinstance(reply, (bytes, bytearray))
        if len(reply) > bufsize:
            raise errno_error(_errno.ENOSPC, name,
                              f"{len(reply)}-byte reply does not fit {bufsize} bytes", ifname)
        return bytes(reply)

    def create_interface(self, name: str = "ovpn") -> str:
        self._check_open()
        self.calls.append(RecordedCall("create_interface", name))
        check_create_name(name)
        if name == INTERFACE_PREFIX:
            while True:
                name = f"{INTERFACE_PREFIX}{next(self._units)}"
                if name not in self.interfaces:
                    break
        elif name in self.interfaces:
            raise errno_error(_errno.EEXIST, "SIOCIFCREATE2", None, name)
        self.interfaces.append(name)
        return name

    def destroy_interface(self, name: str) -> None:
        self._check_open()
        self.calls.append(RecordedCall("destroy_interface", name))
        if name not in self.interfaces:
            raise errno_error(_errno.ENXIO, "SIOCIFDESTROY", None, name)
        self.interfaces.remove(name)

    def rename_interface(self, name: str, new_name: str) -> None:
        self._check_open()
        self.calls.append(RecordedCall("rename_interface", name, new_name=new_name))
        encode_ifname(new_name)
        if name not in self.interfaces:
            raise errno_error(_errno.ENXIO, "SIOCSIFNAME", None, name)
        if new_name in self.interfaces:
            raise errno_error(_errno.EEXIST, "SIOCSIFNAME", None, name)
        self.interfaces[self.interfaces.index(name)] = new_name

    def list_interfaces(self) -> list[str]:
        self._check_open()
        self.calls.append(RecordedCall("list_interfaces", None))
        return list(self.interfaces)

    def close(self) -> None:
        self.calls.append(RecordedCall("close", None))
        self.closed = True
