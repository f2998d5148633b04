"""Find and remove the if_ovpn interface a crashed daemon left behind.

Why: an if_ovpn interface outlives the process that cloned it (if_ovpn.md §5;
the userspace engine behaves the same).  After ``kill -9`` of ``ovpnctl
server`` the interface, its peers and its routes stay; the next start of the
same configuration then either fails (``dev tunX``: the name is taken) or
silently takes another name and leaves the old tunnel half-configured forever.

So every daemon records the interface it created in an *owner record*
(``RUN_DIR/ifowners/<scope>-<ifname>.json``: pid, control socket, config).
At start it looks at the records of its engine: a record whose owner is dead
(no such process, and its control socket refuses connections) and that
names the interface this start wants (``dev tunX``), or that was written by
the same configuration file (``dev tun``/``dev ovpn``, where the kernel picked
the name), is stale: the interface is destroyed and the record removed.  An
interface whose owner is alive, or that has no record at all (created by hand
or by another program), is never touched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from bsd_ovpn.errors import IfOvpnError, OvpnError
from bsd_ovpn.interface import Interface
from bsd_ovpn.daemon.control import is_alive as control_is_alive
from bsd_ovpn.paths import RUN_DIR

log = logging.getLogger("bsd_ovpn.daemon")

OWNERS_DIR = os.path.join(RUN_DIR, "ifowners")
#: ``dev`` values for which the kernel/daemon picks the interface name.
GENERIC_DEVS = ("tun", "ovpn")
_MAX_RECORD = 4096


class StaleInterfaceError(OvpnError):
    """The configured interface belongs to another daemon that is still running."""


@dataclass
class OwnerRecord:
    """Who created an interface: enough to tell later whether that daemon is gone."""

    ifname: str
    pid: int
    control: str | None
    config: str | None
    scope: str


def transport_scope(transport: Any) -> str:
    """Which interface namespace the transport talks to: the kernel, or one engine socket.

    Interface names are only unique per engine (two userspace engines may
    each have a tun0), so records are kept per scope.
    """
    path = getattr(transport, "path", None)
    if isinstance(path, str) and path:
        return "userspace:" + os.path.abspath(path)
    return type(transport).__name__


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists and is not a zombie (a zombie owns nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(512)
        state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
        return state != b"Z"
    except (OSError, ValueError):
        return True                     # no Linux procfs (FreeBSD): kill(0) is the answer


def owner_alive(rec: OwnerRecord) -> bool:
    """Conservative: alive if either the process or its control socket still answers."""
    return pid_alive(rec.pid) or control_is_alive(rec.control)


def _norm(path: str | None) -> str | None:
    return os.path.realpath(path) if path else None


class InterfaceLedger:
    """This daemon's owner record, and the sweep of records left by dead daemons."""

    def __init__(self, transport: Any, *, config: str | None, control: str | None,
                 directory: str = OWNERS_DIR, pid: int | None = None) -> None:
        self.transport = transport
        self.config = _norm(config)
        self.control = os.path.abspath(control) if control else None
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.scope = transport_scope(transport)
        self._prefix = hashlib.sha256(self.scope.encode()).hexdigest()[:12] + "-"
        self.recorded: str | None = None

    # ------------------------------------------------------------------ records
    def _path(self, ifname: str) -> str:
        return os.path.join(self.directory, f"{self._prefix}{ifname}.json")

    def records(self) -> list[tuple[str, OwnerRecord]]:
        """Readable records of this scope; unreadable ones are skipped (logged)."""
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return []
        out = []
        for n in names:
            if not (n.startswith(self._prefix) and n.endswith(".json")):
                continue
            path = os.path.join(self.directory, n)
            try:
                with open(path, "rb") as f:
                    data = json.loads(f.read(_MAX_RECORD))
                rec = OwnerRecord(ifname=str(data["ifname"]), pid=int(data["pid"]),
                                  control=data.get("control"), config=data.get("config"),
                                  scope=str(data["scope"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable interface owner record %s: %s", path, exc)
                continue
            if rec.scope == self.scope:
                out.append((path, rec))
        return out

    def record(self, ifname: str) -> None:
        """Note that this daemon created ``ifname`` (atomic write; best effort)."""
        rec = OwnerRecord(ifname=ifname, pid=self.pid, control=self.control,
                          config=self.config, scope=self.scope)
        path = self._path(ifname)
        tmp = f"{path}.{self.pid}.tmp"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(asdict(rec), f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot record the owner of %s in %s: %s (a crash would leave it "
                        "for manual cleanup)", ifname, self.directory, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self.recorded = ifname

    def release(self) -> None:
        """The interface is gone (destroyed by us): drop our record."""
        if self.recorded is None:
            return
        path = self._path(self.recorded)
        self.recorded = None
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(_MAX_RECORD))
            if int(data.get("pid", -1)) != self.pid:
                return                  # someone else's record by now: leave it
            os.unlink(path)
        except (OSError, ValueError, TypeError) as exc:
            log.debug("removing owner record %s: %s", path, exc)

    # ------------------------------------------------------------------ sweep
    def sweep(self, dev: str) -> list[str]:
        """Before creating the interface for ``dev``: destroy what a dead daemon left.

        Returns the interfaces destroyed.  Raises :class:`StaleInterfaceError`
        if the explicitly configured ``dev`` is recorded by a daemon that is
        still running (its pid and control socket are named in the message).
        """
        removed = []
        existing = self._existing()
        for path, rec in self.records():
            if rec.pid == self.pid:
                continue
            mine = rec.ifname == dev if dev not in GENERIC_DEVS else \
                (self.config is not None and rec.config == self.config)
            if not mine:
                if existing is not None and rec.ifname not in existing \
                        and not owner_alive(rec):
                    with contextlib.suppress(OSError):      # garbage: both are gone
                        os.unlink(path)
                continue
            if owner_alive(rec):
                if rec.ifname == dev:
                    raise StaleInterfaceError(
                        f"interface {dev} belongs to a running daemon (pid {rec.pid}, control "
                        f"socket {rec.control}); stop it first or choose another `dev`")
                continue
            if self._destroy(rec):
                removed.append(rec.ifname)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return removed

    def _existing(self) -> set[str] | None:
        """The engine's interface names, or None if it cannot list them."""
        try:
            return set(self.transport.list_interfaces())
        except (AttributeError, OvpnError, OSError):
            return None

    def _destroy(self, rec: OwnerRecord) -> bool:
        try:
            ifc = Interface.open(rec.ifname, transport=self.transport)
        except IfOvpnError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT, errno.ENODEV):
                log.debug("stale record for %s: the interface is already gone", rec.ifname)
            else:
                log.warning("not removing %s (recorded by dead pid %d): %s", rec.ifname,
                            rec.pid, exc)
            return False
        try:
            ifc.destroy()
        except OvpnError as exc:
            log.warning("cannot remove stale interface %s: %s", rec.ifname, exc)
            return False
        log.warning("removed stale interface %s left by a crashed daemon (pid %d, config %s)",
                    rec.ifname, rec.pid, rec.config)
        return True
