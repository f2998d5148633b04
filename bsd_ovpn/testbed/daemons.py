"""Run our own daemons (``ovpnctl server`` / ``ovpnctl client``) inside test hosts.

The end-to-end scenarios compare our daemons with stock OpenVPN on equal
terms, so they must start them the way an administrator does: the real CLI as
a separate process inside the host, its config in a file, its state read back
with ``ovpnctl status --json``.  What differs by platform is only the data
channel: on FreeBSD the daemons use if_ovpn in the jail's vnet (``--engine
kernel``); on Linux each host needs its own userspace engine daemon
(``python3 -m bsd_ovpn.engine``), which :class:`Engines` starts once per host
and reuses for every daemon started there.

The objects here mirror :class:`~bsd_ovpn.testbed.stockovpn.StockOpenVPN`
(``wait_ready``, ``wait_for``, ``mark``, ``stop``, ``log_tail``, ``running``),
so a scenario can treat "our peer" and "stock peer" alike.

Unix socket paths are limited to ~100 bytes and pytest's tmp paths are long,
so sockets live in one short private directory under /tmp per factory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bsd_ovpn.errors import OvpnError, ValidationError
from bsd_ovpn.testbed.hosts import Host
from bsd_ovpn.testbed.stockovpn import READY, OvpnConfig
from bsd_ovpn.testbed.logged import LoggedProcess

#: The package root, put on PYTHONPATH so hosts run this checkout's code.
REPO = Path(__file__).resolve().parents[2]
#: ``ovpnctl`` without relying on an installed console script.
OVPNCTL = [sys.executable, "-c", "from bsd_ovpn.cli import main; main()"]
#: What our server logs once its UDP socket is bound (it is then ready).
SERVER_READY = "listening on"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")


class DaemonTestError(OvpnError):
    """One of our daemons failed to start, exited, or never logged what we waited for.

    The message ends with the daemon's log tail, where the reason usually is.
    """


def ovpnctl_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def kernel_engine() -> bool:
    """True where the data channel is the kernel's if_ovpn (FreeBSD)."""
    return sys.platform.startswith("freebsd")


class DaemonProc(LoggedProcess):
    """A process of ours in a host, with its combined stdout/stderr in a log file."""

    error = DaemonTestError

    def __init__(self, host: Host, name: str, argv: list[str], log_path: Path) -> None:
        self.host = host
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "ab") as fh:
            self.proc: subprocess.Popen[bytes] = host.popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=ovpnctl_env(), cwd=str(REPO))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} in {self.host.name} " \
               f"{'running' if self.running else 'stopped'}>"

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0, *, sig: int = signal.SIGTERM) -> int:
        """Signal (SIGTERM by default) and wait; SIGKILL and raise if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise DaemonTestError(f"{self.name} did not exit within {timeout:g} s of signal "
                                  f"{sig}:\n{self.log_tail()}") from None

    def kill(self) -> int:
        """SIGKILL: the process vanishes without telling anyone."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)


class EngineDaemon(DaemonProc):
    """``python3 -m bsd_ovpn.engine --socket P`` in one host (Linux only)."""

    def __init__(self, host: Host, socket_path: str, log_path: Path) -> None:
        self.socket_path = socket_path
        super().__init__(host, f"engine-{host.name}",
                         [sys.executable, "-m", "bsd_ovpn.engine", "--socket", socket_path],
                         log_path)

    def wait_ready(self, timeout: float = 20.0) -> "EngineDaemon":
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                raise DaemonTestError(f"{self.name} exited ({self.proc.returncode}):\n"
                                      f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DaemonTestError(f"{self.name}: no socket within {timeout:g} s:\n"
                                      f"{self.log_tail()}")
            time.sleep(0.05)
        return self


class Engines:
    """The data channel of each host: one engine daemon per host on Linux, the kernel on FreeBSD.

    Engines are started on first use and reused by every daemon of that host
    (starting one costs about a second of Python imports); one whose host was
    closed, or that died, is replaced.  ``close()`` stops them all.
    """

    def __init__(self, workdir: str | os.PathLike[str] | None = None) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bovpn-eng-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._engines: dict[str, EngineDaemon] = {}
        self._started = 0
        self.kernel = kernel_engine()

    def engine(self, host: Host) -> EngineDaemon | None:
        """The running engine of ``host`` (started now if needed); None on FreeBSD."""
        if self.kernel:
            return None
        eng = self._engines.get(host.ident)
        if eng is not None and eng.running and not host.closed:
            return eng
        n = self._started
        self._started += 1
        sock = str(self.workdir / f"e{n}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        eng = EngineDaemon(host, sock, self.workdir / f"engine-{n}-{host.name}.log")
        self._engines[host.ident] = eng
        return eng.wait_ready()

    def args(self, host: Host) -> list[str]:
        """``--engine ...`` options for an ovpnctl command run in ``host``."""
        eng = self.engine(host)
        if eng is None:
            return ["--engine", "kernel"]
        return ["--engine", "userspace", "--engine-socket", eng.socket_path]

    def interfaces(self, host: Host) -> dict[str, list[int] | None]:
        """if_ovpn interfaces of ``host`` and their peer ids (``ovpnctl interface list``)."""
        res = host.run([*OVPNCTL, "interface", "list", "--json", *self.args(host)], timeout=30)
        data = json.loads(res.stdout)
        return {i["name"]: i["peer_ids"] for i in data["interfaces"]}

    def engines_of(self, hosts: list[Host]) -> list[EngineDaemon]:
        return [e for e in self._engines.values() if any(e.host is h for h in hosts)]

    def close(self) -> None:
        for eng in self._engines.values():
            try:
                eng.stop(8)
            except DaemonTestError:
                pass
        self._engines.clear()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class OvpnctlDaemon(DaemonProc):
    """``ovpnctl server -c FILE`` or ``ovpnctl client -c FILE`` in a host."""

    def __init__(self, host: Host, name: str, role: str, config_path: Path, control_socket: str,
                 engine_args: list[str], log_path: Path) -> None:
        if role not in ("server", "client"):
            raise ValidationError(f"role must be server or client, got {role!r}")
        self.role = role
        self.config_path = config_path
        self.control_socket = control_socket
        self.engine_args = engine_args
        super().__init__(host, name, [*OVPNCTL, role, "-c", str(config_path), *engine_args,
                                      "--control-socket", control_socket, "-v"], log_path)

    @property
    def ready_pattern(self) -> str:
        return re.escape(SERVER_READY if self.role == "server" else READY)

    def wait_ready(self, timeout: float = 30.0) -> re.Match[str]:
        """Server: the socket is bound; client: "Initialization Sequence Completed"."""
        return self.wait_for(self.ready_pattern, timeout)

    def ctl(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run ``ovpnctl ARGS --control-socket S`` in the daemon's host."""
        return self.host.run([*OVPNCTL, *args, "--control-socket", self.control_socket],
                             timeout=timeout)

    def status(self) -> dict[str, Any]:
        """``ovpnctl status --json`` (docs/json.md)."""
        return json.loads(self.ctl("status", "--json").stdout)

    def clients(self) -> list[dict[str, Any]]:
        return list(self.status()["clients"])

    def kill_client(self, target: str) -> list[int]:
        """``ovpnctl kill --json TARGET``: the peer ids that were disconnected."""
        return list(json.loads(self.ctl("kill", "--json", target).stdout)["killed"])

    def wait_status(self, predicate: Any, timeout: float = 20.0, interval: float = 0.25,
                    what: str = "condition") -> dict[str, Any]:
        """Poll ``status()`` until ``predicate(status)`` is true; returns that status."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            if self.proc.poll() is not None:
                raise DaemonTestError(f"{self.name} exited ({self.proc.returncode}) while waiting "
                                      f"for {what}:\n{self.log_tail()}")
            try:
                last = self.status()
            except Exception:  # noqa: BLE001 - the control socket may not be up yet
                last = None
            if last is not None and predicate(last):
                return last
            if time.monotonic() > deadline:
                raise DaemonTestError(f"{self.name}: no {what} within {timeout:g} s; last status "
                                      f"{json.dumps(last)}\n{self.log_tail()}")
            time.sleep(interval)


class OvpnctlFactory:
    """Starts our daemons for one test and stops them all afterwards."""

    def __init__(self, engines: Engines, workdir: str | os.PathLike[str]) -> None:
        self.engines = engines
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockdir = Path(tempfile.mkdtemp(prefix="bovpn-ctl-"))
        self.daemons: list[OvpnctlDaemon] = []

    def start(self, host: Host, role: str, config: OvpnConfig | str, name: str) -> OvpnctlDaemon:
        """Write ``config`` to ``<workdir>/<name>.conf`` and start the daemon (no wait)."""
        if not _NAME_RE.match(name):
            raise ValidationError(f"bad daemon name {name!r}")
        text = config.render() if isinstance(config, OvpnConfig) else config
        path = self.workdir / f"{name}.conf"
        path.write_text(text)
        ctl = str(self.sockdir / f"{len(self.daemons)}.ctl")
        d = OvpnctlDaemon(host, name, role, path, ctl, self.engines.args(host),
                          self.workdir / f"{name}.log")
        self.daemons.append(d)
        return d

    def server(self, host: Host, config: OvpnConfig | str, name: str = "ours-server"
               ) -> OvpnctlDaemon:
        return self.start(host, "server", config, name)

    def client(self, host: Host, config: OvpnConfig | str, name: str = "ours-client"
               ) -> OvpnctlDaemon:
        return self.start(host, "client", config, name)

    def log_sections(self, lines: int = 80) -> list[tuple[str, str]]:
        """(title, log tail) of every daemon and of the engines of their hosts."""
        out = [(f"ovpnctl {d.role} {d.name} ({d.host.name}) log", d.log_tail(lines))
               for d in self.daemons]
        for eng in self.engines.engines_of([d.host for d in self.daemons]):
            out.append((f"{eng.name} log", eng.log_tail(lines)))
        return out

    def stop_all(self) -> None:
        errors = []
        for d in reversed(self.daemons):
            try:
                d.stop(8)
            except DaemonTestError as exc:
                errors.append(str(exc).splitlines()[0])
        shutil.rmtree(self.sockdir, ignore_errors=True)
        if errors:
            raise DaemonTestError("daemons did not stop on SIGTERM: " + "; ".join(errors))
