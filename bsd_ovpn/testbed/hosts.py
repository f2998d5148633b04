"""Test hosts and the labs that wire them together, independent of the OS.

Every end-to-end test, benchmark, ``ovpnctl demo`` and the jail tests need the
same thing: a few isolated network stacks joined by virtual cables, with a way
to run programs inside each.  Linux gives that with network namespaces and
veth pairs, FreeBSD with vnet jails and epair(4) interfaces.  This module is
the one abstraction over both (in the spirit of pyroute2's NetNS and FreeBSD's
tests/sys/common/vnet.subr); :mod:`.netns` and :mod:`.jail` are the backends,
chosen by ``sys.platform``.

Names are unique per run (prefix, pid, random tag) because several test runs
share one machine, and everything a :class:`Lab` creates is removed by
``close()``, by an ``atexit`` hook and by a SIGTERM/SIGHUP handler.  A run that
was killed with SIGKILL leaves its namespaces behind; :func:`cleanup_stale`
removes those whose creating process no longer exists.

Usage::

    with Lab() as lab:
        srv, cli = lab.host("server"), lab.host("client")
        if_s, if_c = lab.link(srv, cli, "192.0.2.1/24", "192.0.2.2/24")
        assert cli.ping("192.0.2.1")
"""
from __future__ import annotations

import abc
import atexit
import ipaddress
import os
import re
import secrets
import signal
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from bsd_ovpn.daemon.stale import pid_alive
from bsd_ovpn.errors import OvpnError, UnsupportedPlatform, ValidationError

#: Default prefix of namespace / jail names.  ``cleanup_stale`` only ever
#: touches names with this shape: ``<prefix>-<pid>-<tag>-<host>``.
DEFAULT_PREFIX = "bovpn"
#: Linux and FreeBSD both limit interface names to IFNAMSIZ-1 = 15 characters.
IFNAMSIZ_MAX = 15
DEFAULT_TIMEOUT = 30.0

_HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_TAG_ALPHABET = string.ascii_lowercase + string.digits


class TestbedError(OvpnError):
    """The test bed could not build, run or tear down what was asked."""

    __test__ = False  # not a pytest test class despite the name


class HostCommandError(TestbedError):
    """A command run inside (or for) a test host failed or timed out.

    Carries the command and its output so a failing test says *why* the host
    refused (e.g. "RTNETLINK answers: File exists"), not just an exit code.
    """

    def __init__(self, host: str, argv: Sequence[str], returncode: int | None,
                 stdout: str = "", stderr: str = "", timeout: float | None = None) -> None:
        self.host = host
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        cmd = " ".join(self.argv)
        if timeout is not None:
            what = f"timed out after {timeout:g} s"
        else:
            what = f"exited with status {returncode}"
        detail = (stderr or stdout).strip()
        if len(detail) > 2000:
            detail = "..." + detail[-2000:]
        super().__init__(f"[{host}] {cmd!r} {what}" + (f": {detail}" if detail else ""))


# ---------------------------------------------------------------------------
# Running commands: one seam so the FreeBSD backend is testable on Linux.

#: ``runner(argv, timeout=, check=, input=, host=) -> CompletedProcess[str]``.
Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def subprocess_runner(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                      check: bool = True, input: str | None = None,
                      host: str = "-", env: dict[str, str] | None = None,
                      ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion with captured text output, bounded in time."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise HostCommandError(host, argv, None, out, err, timeout=timeout) from None
    except FileNotFoundError as exc:
        raise HostCommandError(host, argv, 127, "", f"program not found: {exc.filename}") from None
    if check and proc.returncode != 0:
        raise HostCommandError(host, argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PingResult:
    """Outcome of ``Host.ping``; true when every requested reply arrived."""

    destination: str
    transmitted: int
    received: int
    ok: bool
    rtt_avg_ms: float | None
    output: str = field(repr=False, default="")

    def __bool__(self) -> bool:
        return self.ok

    @property
    def loss(self) -> float:
        return 0.0 if self.transmitted == 0 else 1.0 - self.received / self.transmitted


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"(?:rtt|round-trip) min/avg/max/(?:mdev|stddev|std-dev) = "
                       r"[\d.]+/([\d.]+)/")


def parse_ping(destination: str, returncode: int, output: str, count: int) -> PingResult:
    """Parse iputils (Linux) or FreeBSD ping summary lines into a PingResult."""
    m = _PING_COUNTS.search(output)
    tx, rx = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    r = _PING_RTT.search(output)
    rtt = float(r.group(1)) if r else None
    return PingResult(destination, tx, rx, returncode == 0 and rx >= count, rtt, output)


def ip_version(addr: str) -> int:
    """4 or 6 for an address or CIDR string; ValidationError otherwise."""
    try:
        return ipaddress.ip_interface(addr).version
    except ValueError:
        raise ValidationError(f"not an IP address or CIDR: {addr!r}") from None


def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ_MAX or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValidationError(f"bad interface name {name!r}: 1..{IFNAMSIZ_MAX} chars of [A-Za-z0-9_.-]")
    return name


# ---------------------------------------------------------------------------
# The Host abstraction


class Host(abc.ABC):
    """One isolated network stack (netns / vnet jail) with its processes.

    ``name`` is the short logical name given to ``Lab.host`` ("server");
    ``ident`` is the backend's unique name (namespace or jail name).  The file
    system is shared with the test process, so config files written anywhere
    are visible inside the host.
    """

    name: str
    ident: str

    def __init__(self, name: str, ident: str, runner: Runner | None = None) -> None:
        self.name = name
        self.ident = ident
        self._runner: Runner = runner or subprocess_runner
        self._procs: list[subprocess.Popen[Any]] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.ident})>"

    # -- processes ---------------------------------------------------------

    @abc.abstractmethod
    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this host."""

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host and wait for it (text output captured)."""
        self._check_open()
        return self._runner(self.wrap(argv), timeout=timeout, check=check, input=input,
                            host=self.name)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside the host; ``close()`` kills it if still running.

        Keyword arguments go to ``subprocess.Popen``.  The child gets its own
        session so a Ctrl-C to the test runner does not kill peers before the
        fixture teardown has read their logs.
        """
        self._check_open()
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.wrap(argv), **kw)
        self._procs.append(proc)
        return proc

    def _check_open(self) -> None:
        if self.closed:
            raise TestbedError(f"host {self.name} ({self.ident}) is already closed")

    def _stop_procs(self, grace: float = 3.0) -> None:
        """SIGTERM every process we started, SIGKILL what is left after ``grace``."""
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()

    # -- network configuration --------------------------------------------

    @abc.abstractmethod
    def add_address(self, ifname: str, cidr: str) -> None:
        """Add an IPv4 or IPv6 address (``"192.0.2.1/24"``) to an interface."""

    @abc.abstractmethod
    def link_up(self, ifname: str, *, mtu: int | None = None) -> None:
        """Bring an interface up (optionally setting its MTU)."""

    @abc.abstractmethod
    def add_route(self, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        """Add a route to ``dst`` (CIDR or "default") via a gateway or out of an interface."""

    @abc.abstractmethod
    def interfaces(self) -> list[str]:
        """Names of the interfaces that exist in this host."""

    @abc.abstractmethod
    def addresses(self, ifname: str | None = None) -> list[str]:
        """Addresses in CIDR form, of one interface or of all."""

    @abc.abstractmethod
    def ping_argv(self, addr: str, count: int, timeout: float, interval: float,
                  size: int | None) -> list[str]:
        """The platform's ping command line."""

    def ping(self, addr: str, *, count: int = 1, timeout: float = 5.0,
             interval: float = 0.2, size: int | None = None) -> PingResult:
        """Ping ``addr`` (IPv4 or IPv6) until ``count`` replies or ``timeout`` seconds.

        Retries within the deadline, so ``ping(addr, timeout=10)`` doubles as
        "wait until the tunnel carries traffic".  The result is truthy only if
        ``count`` replies arrived.
        """
        ip_version(addr)
        if count < 1 or timeout <= 0:
            raise ValidationError(f"ping needs count >= 1 and timeout > 0 (got {count}, {timeout})")
        argv = self.ping_argv(addr, count, timeout, interval, size)
        proc = self.run(argv, check=False, timeout=timeout + 10)
        return parse_ping(addr, proc.returncode, proc.stdout + proc.stderr, count)

    def wait_ping(self, addr: str, *, timeout: float = 10.0) -> PingResult:
        """Like ``ping`` but raises with the ping output when no reply came."""
        res = self.ping(addr, count=1, timeout=timeout)
        if not res:
            raise TestbedError(f"[{self.name}] no reply from {addr} within {timeout:g} s:\n"
                               f"{res.output.strip()}")
        return res

    # -- teardown ------------------------------------------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Kill every process in the host and remove the host; idempotent."""


# ---------------------------------------------------------------------------
# Backends


class Backend(abc.ABC):
    """What a platform must provide for a Lab: hosts, links, bridges, stale cleanup."""

    def __init__(self, runner: Runner | None = None) -> None:
        self.runner: Runner = runner or subprocess_runner

    @abc.abstractmethod
    def create_host(self, name: str, ident: str) -> Host:
        """Create an isolated host with loopback up and IPv6 DAD off."""

    @abc.abstractmethod
    def create_link(self, a: Host, b: Host, name_a: str, name_b: str,
                    mtu: int | None = None) -> None:
        """Create a virtual cable with end ``name_a`` in ``a`` and ``name_b`` in ``b``, both up."""

    @abc.abstractmethod
    def create_bridge(self, hub: Host, name: str, ports: Sequence[str]) -> None:
        """Create a learning bridge in ``hub`` enslaving ``ports`` (interfaces of hub)."""

    @abc.abstractmethod
    def list_idents(self) -> list[str]:
        """Names of every host (namespace / jail) that exists on the machine."""

    @abc.abstractmethod
    def destroy_ident(self, ident: str) -> None:
        """Remove a host by its ident, killing its processes (for stale cleanup)."""

    def after_close(self, lab: "Lab") -> None:
        """Backend hook after all hosts of a lab are closed (e.g. destroy epairs)."""


def default_backend(runner: Runner | None = None) -> Backend:
    """The backend for this platform: netns on Linux, vnet jails on FreeBSD."""
    if sys.platform.startswith("linux"):
        from bsd_ovpn.testbed.netns import NetnsBackend
        return NetnsBackend(runner)
    if sys.platform.startswith("freebsd"):
        from bsd_ovpn.testbed.jail import JailBackend
        return JailBackend(runner)
    raise UnsupportedPlatform(f"no test-host backend for {sys.platform} "
                              "(needs Linux network namespaces or FreeBSD vnet jails)")


# ---------------------------------------------------------------------------
# Lab

_LIVE_LABS: "set[Lab]" = set()
_LIVE_LOCK = threading.Lock()
_SAFETY_NET_INSTALLED = False


def _close_all_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE_LABS)
    for lab in labs:
        try:
            lab.close()
        except Exception as exc:  # best effort at interpreter exit
            print(f"bsd_ovpn.testbed: cleanup of {lab.tag} failed: {exc}", file=sys.stderr)


def _signal_handler(signum: int, frame: Any) -> None:
    _close_all_labs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net() -> None:
    """atexit + SIGTERM/SIGHUP cleanup; signals only if nobody else handles them."""
    global _SAFETY_NET_INSTALLED
    if _SAFETY_NET_INSTALLED:
        return
    _SAFETY_NET_INSTALLED = True
    atexit.register(_close_all_labs)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _signal_handler)
        except (ValueError, OSError):
            pass


def _random_tag(n: int = 4) -> str:
    return "".join(secrets.choice(_TAG_ALPHABET) for _ in range(n))


class Lab:
    """A set of hosts and links that live exactly as long as the Lab.

    ``lab.host("server")`` creates a host; ``lab.link(a, b, "192.0.2.1/24",
    "192.0.2.2/24")`` joins two hosts with a point-to-point cable and returns
    the interface names; ``lab.segment([a, b, c], [...])`` joins several hosts
    on one broadcast segment (a bridge in a hidden hub host).  Interface names
    are ``<ifprefix><n><a|b>`` with a per-run random ifprefix, so concurrent
    runs never collide even on FreeBSD where epairs start in the parent vnet.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, backend: Backend | None = None) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", prefix):
            raise ValidationError(f"lab prefix must be 1..12 chars [a-z0-9] starting with a letter: {prefix!r}")
        self.prefix = prefix
        self.backend = backend or default_backend()
        self.tag = _random_tag()
        self.pid = os.getpid()
        self.ifprefix = "b" + self.tag          # 5 chars; + counter + a/b stays <= 15
        self.hosts: dict[str, Host] = {}
        self.links: list[tuple[str, str, str, str]] = []  # (host_a, if_a, host_b, if_b)
        self._nlinks = 0
        self._nhubs = 0
        self.closed = False
        _install_safety_net()
        with _LIVE_LOCK:
            _LIVE_LABS.add(self)

    # context manager -------------------------------------------------------

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Lab {self.prefix}-{self.pid}-{self.tag} hosts={list(self.hosts)}>"

    # building --------------------------------------------------------------

    def ident_for(self, name: str) -> str:
        return f"{self.prefix}-{self.pid}-{self.tag}-{name}"

    def host(self, name: str) -> Host:
        """Create (or return the existing) host called ``name``."""
        self._check_open()
        if name in self.hosts:
            return self.hosts[name]
        if not _HOST_NAME_RE.match(name):
            raise ValidationError(f"host name must match {_HOST_NAME_RE.pattern}: {name!r}")
        host = self.backend.create_host(name, self.ident_for(name))
        self.hosts[name] = host
        return host

    def ifname(self, side: str) -> str:
        """A fresh unique interface name for this lab (``side`` = "a" or "b")."""
        return check_ifname(f"{self.ifprefix}{self._nlinks}{side}")

    def link(self, a: Host, b: Host, a_cidr: str | Iterable[str] | None = None,
             b_cidr: str | Iterable[str] | None = None, *, mtu: int | None = None,
             ) -> tuple[str, str]:
        """Join ``a`` and ``b`` with a virtual cable; returns (ifname in a, ifname in b).

        ``a_cidr``/``b_cidr`` may be one CIDR or several (e.g. an IPv4 and an
        IPv6 address).  Both ends are up when this returns.
        """
        self._check_open()
        for h in (a, b):
            if self.hosts.get(h.name) is not h:
                raise ValidationError(f"{h!r} does not belong to this lab")
        if a is b:
            raise ValidationError("cannot link a host to itself")
        name_a, name_b = self.ifname("a"), self.ifname("b")
        self._nlinks += 1
        self.backend.create_link(a, b, name_a, name_b, mtu)
        self.links.append((a.name, name_a, b.name, name_b))
        for host, ifname, cidrs in ((a, name_a, a_cidr), (b, name_b, b_cidr)):
            for cidr in _as_list(cidrs):
                host.add_address(ifname, cidr)
        return name_a, name_b

    def segment(self, hosts: Sequence[Host], cidrs: Sequence[str | Iterable[str] | None] | None = None,
                *, mtu: int | None = None) -> list[str]:
        """Put ``hosts`` on one broadcast segment; returns each host's interface name.

        Built as one cable per host into a hidden hub host holding a bridge, so
        the root namespace / host vnet is never touched.
        """
        self._check_open()
        if len(hosts) < 2:
            raise ValidationError("a segment needs at least two hosts")
        cidr_list: list[Any] = list(cidrs) if cidrs is not None else [None] * len(hosts)
        if len(cidr_list) != len(hosts):
            raise ValidationError(f"segment: {len(hosts)} hosts but {len(cidr_list)} address entries")
        hub = self.host(f"hub{self._nhubs}")
        self._nhubs += 1
        names, hub_ports = [], []
        for host, cidr in zip(hosts, cidr_list):
            if_host, if_hub = self.link(host, hub, cidr, None, mtu=mtu)
            names.append(if_host)
            hub_ports.append(if_hub)
        self.backend.create_bridge(hub, f"{self.ifprefix}br{self._nhubs - 1}", hub_ports)
        return names

    # teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Kill all processes and remove all hosts and links; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for host in reversed(list(self.hosts.values())):
            try:
                host.close()
            except Exception as exc:
                errors.append(f"{host.ident}: {exc}")
        try:
            self.backend.after_close(self)
        except Exception as exc:
            errors.append(f"backend cleanup: {exc}")
        with _LIVE_LOCK:
            _LIVE_LABS.discard(self)
        if errors:
            raise TestbedError("lab cleanup incomplete: " + "; ".join(errors))

    def _check_open(self) -> None:
        if self.closed:
            raise TestbedError(f"lab {self.tag} is already closed")


def _as_list(cidrs: str | Iterable[str] | None) -> list[str]:
    if cidrs is None:
        return []
    if isinstance(cidrs, str):
        return [cidrs]
    return list(cidrs)


_STALE_RE = re.compile(r"^([a-z][a-z0-9]{0,11})-(\d+)-([a-z0-9]+)-")


def stale_idents(idents: Iterable[str], prefix: str = DEFAULT_PREFIX,
                 alive: Callable[[int], bool] = pid_alive) -> list[str]:
    """The idents with our naming scheme and ``prefix`` whose creating pid is gone."""
    out = []
    for ident in idents:
        m = _STALE_RE.match(ident)
        if m and m.group(1) == prefix and not alive(int(m.group(2))):
            out.append(ident)
    return out


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, backend: Backend | None = None) -> list[str]:
    """Remove hosts left by killed runs (creator pid dead); returns what was removed.

    Live runs of other processes are never touched: the pid in the name must
    not exist any more.
    """
    be = backend or default_backend()
    removed = []
    for ident in stale_idents(be.list_idents(), prefix):
        be.destroy_ident(ident)
        removed.append(ident)
    return removed
