"""The exception hierarchy every bsd_ovpn layer raises into.

Callers (the CLI, appliances embedding the library) catch ``OvpnError`` to get
every failure the library knows how to describe, and the narrower classes to
act on one kind.  Modules define their own subclasses of these bases next to
the code that raises them; this file only holds what several layers share.
"""
from __future__ import annotations

import errno as _errno
import os


class OvpnError(Exception):
    """Base of every error bsd_ovpn raises on purpose."""


class ValidationError(OvpnError, ValueError):
    """An argument was rejected before anything was sent to a kernel or peer.

    The kernel trusts userspace for several fields (24-bit peer id, key id,
    key length); we check them here so a mistake is an exception, not a
    silently corrupted tunnel.
    """


class UnsupportedPlatform(OvpnError):
    """The requested backend cannot work on this host (e.g. if_ovpn on Linux)."""


class IfOvpnError(OvpnError, OSError):
    """An if_ovpn command failed with an errno, from the kernel or the engine.

    ``command`` is the kernel's name for the command (``OVPN_NEW_KEY``);
    ``cause`` says in words what that errno means for that command.
    """

    def __init__(self, err: int, command: str, cause: str | None = None,
                 ifname: str | None = None) -> None:
        self.command = command
        self.ifname = ifname
        self.cause = cause or os.strerror(err)
        where = f"{command} on {ifname}" if ifname else command
        super().__init__(err, f"{where}: {self.cause} ({_errno.errorcode.get(err, err)})")

    def __str__(self) -> str:  # OSError's default adds "[Errno N]" noise
        return self.strerror or ""


class ProtocolError(OvpnError):
    """Base of OpenVPN protocol errors (the h11 split: who broke the rules)."""


class LocalProtocolError(ProtocolError):
    """Our own caller asked the protocol engine for something illegal."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that violates the protocol; the packet is dropped."""


class ConfigError(OvpnError, ValueError):
    """A configuration file or key file is wrong; names the file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 directive: str | None = None) -> None:
        self.path = path
        self.line = line
        self.directive = directive
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
