"""``ovpnctl demo``: a whole server + client tunnel in one command, then gone.

The first thing a new user runs should prove the main job end to end on
their own machine without touching their network: two isolated network
stacks (Linux network namespaces, FreeBSD vnet jails) joined by a virtual
cable, a throwaway PKI, ``ovpnctl server`` in one and ``ovpnctl client`` in
the other, a ping through the tunnel and ``ovpnctl status``.  Everything it
makes lives in a private temporary directory and in namespaces/jails whose
names carry this process's pid, and everything is removed again -- on
success, on failure, on Ctrl-C and on SIGTERM.

The daemons are started as real ``ovpnctl`` processes (the same Python, the
same package), so the demo exercises exactly what an admin would run; it
is built on :mod:`bsd_ovpn.testbed`, which ships with the package, and never
needs the source checkout or the stock ``openvpn`` program.

Addresses are documentation ranges only: the cable is 192.0.2.0/24, the
tunnel 198.51.100.0/24 and 2001:db8:100::/64.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from bsd_ovpn.errors import OvpnError, UnsupportedPlatform

#: Namespace / jail name prefix; distinct from the test suite's so
#: ``cleanup_stale`` of one never races the other.
LAB_PREFIX = "ovpndemo"
SERVER_OUTER, CLIENT_OUTER = "192.0.2.1", "192.0.2.2"
OUTER_PREFIXLEN = 24
TUNNEL_NET4, TUNNEL_NET6 = "198.51.100.0/24", "2001:db8:100::/64"
SERVER_VPN4, SERVER_VPN6 = "198.51.100.1", "2001:db8:100::1"
PORT = 1194
CLIENT_CN = "demo-client"
READY_SERVER = "listening on"
READY_CLIENT = "Initialization Sequence Completed"

Out = Callable[[str], None]


class DemoError(OvpnError):
    """The demo could not build or prove the tunnel; the message says which step and why."""


class DemoInterrupted(DemoError):
    """Ctrl-C or SIGTERM/SIGHUP arrived; everything made so far was removed."""


@dataclass
class DemoResult:
    """What the demo observed, for the CLI's exit status and for tests."""

    engine: str
    ping_sent: int = 0
    ping_received: int = 0
    ping_rtt_ms: float | None = None
    ping6_ok: bool = False
    status_text: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    namespaces: list[str] = field(default_factory=list)
    workdir: str = ""
    cleaned: bool = False


# --------------------------------------------------------------------------- configs

def server_config(workdir: Path, *, local: str = SERVER_OUTER) -> str:
    """The server's OpenVPN config: the same file stock ``openvpn --config`` accepts."""
    return "\n".join([
        "# ovpnctl demo server (an ordinary OpenVPN 2.6 server config)",
        f"port {PORT}",
        "proto udp",
        f"local {local}",
        "dev tun",
        "topology subnet",
        "server 198.51.100.0 255.255.255.0",
        f"server-ipv6 {TUNNEL_NET6}",
        f"ca {workdir / 'ca.crt'}",
        f"cert {workdir / 'server.crt'}",
        f"key {workdir / 'server.key'}",
        "dh none",
        f"tls-crypt {workdir / 'tc.key'}",
        "data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305",
        "keepalive 10 60",
        "verb 3",
        "",
    ])


def client_config(workdir: Path, *, remote: str = SERVER_OUTER) -> str:
    """The client's OpenVPN config (``client`` = pull + tls-client)."""
    return "\n".join([
        "# ovpnctl demo client (an ordinary OpenVPN 2.6 client config)",
        "client",
        "dev tun",
        "proto udp",
        f"remote {remote} {PORT}",
        "nobind",
        f"ca {workdir / 'ca.crt'}",
        f"cert {workdir / (CLIENT_CN + '.crt')}",
        f"key {workdir / (CLIENT_CN + '.key')}",
        "remote-cert-tls server",
        f"tls-crypt {workdir / 'tc.key'}",
        "data-ciphers AES-256-GCM",
        "verb 3",
        "",
    ])


# --------------------------------------------------------------------------- helpers

def ovpnctl_argv(*args: str) -> list[str]:
    """Run this package's ``ovpnctl`` with this interpreter (works without a console script)."""
    return [sys.executable, "-c", "from bsd_ovpn.cli import main; main()", *args]


def child_env() -> dict[str, str]:
    """Our environment, with this package importable (an installed one or a checkout)."""
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    parts = [pkg_parent] + [p for p in path.split(os.pathsep) if p and p != pkg_parent]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(parts))
    # the engine/daemon choice is made here, never inherited from the caller's shell
    env.pop("BSD_OVPN_ENGINE", None)
    env.pop("BSD_OVPN_ENGINE_SOCKET", None)
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text.splitlines()[-lines:])


def choose_engine(requested: str) -> str:
    """"kernel" or "userspace" for this machine; UnsupportedPlatform when impossible."""
    from bsd_ovpn import engines

    if requested not in engines.ENGINES:
        raise DemoError(f"--engine must be one of {', '.join(engines.ENGINES)}, not {requested!r}")
    freebsd = sys.platform.startswith("freebsd")
    if requested == "kernel" and not freebsd:
        raise UnsupportedPlatform(f"if_ovpn is a FreeBSD kernel module and this host is "
                                  f"{sys.platform}; the demo uses the userspace engine here")
    if requested == "userspace" or not freebsd:
        return "userspace"
    # FreeBSD: load if_ovpn in the host (a vnet jail cannot kldload), as openvpn would
    if not engines.kernel_available():
        subprocess.run(["kldload", "-n", "if_ovpn"], capture_output=True, timeout=30,
                       check=False)
    if engines.kernel_available():
        return "kernel"
    if requested == "kernel":
        raise UnsupportedPlatform("if_ovpn(4) is not available (kldload if_ovpn failed)")
    return "userspace"


def preflight() -> None:
    """Refuse early, with the reason, where the demo cannot run."""
    if not (sys.platform.startswith("linux") or sys.platform.startswith("freebsd")):
        raise UnsupportedPlatform(f"ovpnctl demo needs Linux network namespaces or FreeBSD "
                                  f"vnet jails; this host is {sys.platform}")
    if os.geteuid() != 0:
        raise DemoError("ovpnctl demo must run as root (it creates network namespaces / "
                        "vnet jails and tunnel interfaces); try: sudo ovpnctl demo")
    need = ["ip", "ping"] if sys.platform.startswith("linux") else ["jail", "jexec", "ping"]
    missing = [p for p in need if shutil.which(p) is None]
    if missing:
        raise DemoError(f"ovpnctl demo needs {', '.join(missing)} on PATH")
    if sys.platform.startswith("linux") and not os.path.exists("/dev/net/tun"):
        raise DemoError("ovpnctl demo needs /dev/net/tun (modprobe tun)")


class _Signals:
    """While active, SIGTERM/SIGHUP raise DemoInterrupted (Ctrl-C raises KeyboardInterrupt),
    so every ``finally`` runs; ``shield()`` ignores them during cleanup."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}
        self._sigint: Any = None

    @staticmethod
    def _raise(signum: int, _frame: Any) -> None:
        raise DemoInterrupted(f"interrupted by {signal.Signals(signum).name}")

    def __enter__(self) -> "_Signals":
        try:
            self._sigint = signal.getsignal(signal.SIGINT)
        except ValueError:
            pass
        for sig in self.SIGNALS:
            try:
                self._saved[sig] = signal.signal(sig, self._raise)
            except ValueError:          # not the main thread: leave signals alone
                pass
        return self

    def shield(self) -> None:
        for sig in (*self._saved, signal.SIGINT):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        if self._sigint is not None:
            try:
                signal.signal(signal.SIGINT, self._sigint)
            except ValueError:
                pass


# --------------------------------------------------------------------------- the demo

@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class Demo:
    """Build, prove and remove one tunnel.  ``run()`` is the whole demo.

    ``out`` receives the few human-readable progress lines; ``verbose``
    adds the config files and daemon log tails.
    """

    def __init__(self, *, out: Out = print, engine: str = "auto", verbose: bool = False,
                 timeout: float = 30.0) -> None:
        if timeout <= 0 or timeout > 600:
            raise DemoError(f"timeout must be in (0, 600] seconds, got {timeout}")
        self.out = out
        self.requested_engine = engine
        self.verbose = verbose
        self.timeout = timeout
        self.procs: list[_Proc] = []
        self.lab: Any = None
        self.workdir: Path | None = None
        self.env = child_env()

    # -- processes ------------------------------------------------------------

    def _start(self, host: Any, name: str, argv: Sequence[str]) -> _Proc:
        assert self.workdir is not None
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as fh:
            p = host.popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                           cwd=str(self.workdir))
        proc = _Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def _wait(self, proc: _Proc, ready: Callable[[], bool], what: str) -> float:
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        while not ready():
            if proc.popen.poll() is not None:
                raise DemoError(f"{proc.name} exited with status {proc.popen.returncode} "
                                f"before {what}; its log:\n{_tail(proc.log)}")
            if time.monotonic() > deadline:
                raise DemoError(f"{proc.name}: no {what} within {self.timeout:g} s; its log:\n"
                                f"{_tail(proc.log)}")
            time.sleep(0.05)
        return time.monotonic() - t0

    @staticmethod
    def _logged(proc: _Proc, needle: str) -> Callable[[], bool]:
        def check() -> bool:
            try:
                return needle in proc.log.read_text(errors="replace")
            except OSError:
                return False
        return check

    def _stop(self, proc: _Proc, grace: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace``; the exit status (None if killed)."""
        p = proc.popen
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                return None
            except ProcessLookupError:
                pass
        return p.returncode

    # -- steps ------------------------------------------------------------------

    def _pki(self, workdir: Path) -> None:
        from bsd_ovpn.proto import keyfile
        from bsd_ovpn.testbed.pki import PKI

        pki = PKI(workdir / "pki", ca_name="ovpnctl demo CA")
        shutil.copyfile(pki.ca_path, workdir / "ca.crt")
        for cred, stem in ((pki.server("server"), "server"), (pki.client(CLIENT_CN), CLIENT_CN)):
            shutil.copyfile(cred.cert_path, workdir / f"{stem}.crt")
            shutil.copyfile(cred.key_path, workdir / f"{stem}.key")
            os.chmod(workdir / f"{stem}.key", 0o600)
        fd = os.open(workdir / "tc.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(keyfile.genkey("tls-crypt"))

    def _engine(self, host: Any, role: str, engine: str) -> list[str]:
        """Start the userspace engine in ``host`` if needed; the daemon's --engine args."""
        if engine == "kernel":
            return ["--engine", "kernel"]
        assert self.workdir is not None
        sock = self.workdir / f"{role}-engine.sock"
        proc = self._start(host, f"{role}-engine", ovpnctl_argv("engine", "run", "--socket",
                                                                str(sock)))
        self._wait(proc, sock.exists, "engine socket")
        return ["--engine", "userspace", "--engine-socket", str(sock)]

    def _status(self, host: Any, ctl: Path, *fmt: str) -> str:
        res = host.run(ovpnctl_argv("status", "--control-socket", str(ctl), *fmt),
                       check=False, timeout=self.timeout)
        if res.returncode != 0:
            raise DemoError(f"ovpnctl status {' '.join(fmt)} failed ({res.returncode}): "
                            f"{(res.stderr or res.stdout).strip()}")
        return res.stdout

    def run(self) -> DemoResult:
        """The demo; raises DemoError (or DemoInterrupted) after cleaning up."""
        preflight()
        engine = choose_engine(self.requested_engine)
        result = DemoResult(engine=engine)
        started = time.monotonic()
        with _Signals() as sigs:
            try:
                self._run(result, engine)
            except KeyboardInterrupt:
                raise DemoInterrupted("interrupted by Ctrl-C") from None
            finally:
                sigs.shield()           # a second Ctrl-C must not cut the cleanup short
                self._cleanup(result)
        result.seconds = time.monotonic() - started
        return result

    def _run(self, result: DemoResult, engine: str) -> None:
        from bsd_ovpn.testbed.hosts import Lab, cleanup_stale

        out = self.out
        backend = "network namespaces" if sys.platform.startswith("linux") else "vnet jails"
        kind = "if_ovpn(4) in the kernel" if engine == "kernel" else "the userspace engine"
        out(f"ovpnctl demo: an OpenVPN server and client in two {backend}, data channel in "
            f"{kind}")
        try:
            cleanup_stale(LAB_PREFIX)       # leftovers of a demo that was SIGKILLed
        except OvpnError:
            pass
        # UNIX socket paths (engine, control) must fit in sun_path (~104 bytes)
        base = tempfile.gettempdir()
        self.workdir = Path(tempfile.mkdtemp(prefix="ovpnctl-demo-",
                                             dir=base if len(base) <= 48 else "/tmp"))
        result.workdir = str(self.workdir)
        self.lab = Lab(LAB_PREFIX)
        srv = self.lab.host("server")
        cli = self.lab.host("client")
        result.namespaces = [srv.ident, cli.ident]
        if_s, if_c = self.lab.link(srv, cli, f"{SERVER_OUTER}/{OUTER_PREFIXLEN}",
                                   f"{CLIENT_OUTER}/{OUTER_PREFIXLEN}")
        out(f"[1/5] network: {srv.ident} ({if_s} {SERVER_OUTER}) <-> {cli.ident} "
            f"({if_c} {CLIENT_OUTER})")

        self._pki(self.workdir)
        srv_conf, cli_conf = self.workdir / "server.conf", self.workdir / "client.conf"
        srv_conf.write_text(server_config(self.workdir))
        cli_conf.write_text(client_config(self.workdir))
        out(f"[2/5] throwaway PKI (CA, server and {CLIENT_CN} certificates, tls-crypt key) "
            f"and configs in {self.workdir}")
        if self.verbose:
            for p in (srv_conf, cli_conf):
                out(f"      --- {p.name} ---")
                for ln in p.read_text().splitlines():
                    out(f"      {ln}")

        srv_ctl, cli_ctl = self.workdir / "server.ctl", self.workdir / "client.ctl"
        srv_engine = self._engine(srv, "server", engine)
        server = self._start(srv, "server", ovpnctl_argv(
            "server", "-c", str(srv_conf), *srv_engine, "--control-socket", str(srv_ctl)))
        self._wait(server, lambda: self._logged(server, READY_SERVER)() and srv_ctl.exists(),
                   "'listening on'")
        out(f"[3/5] server: ovpnctl server -c server.conf   listening on "
            f"{SERVER_OUTER}:{PORT}/udp, tunnel {SERVER_VPN4} {SERVER_VPN6}")

        cli_engine = self._engine(cli, "client", engine)
        client = self._start(cli, "client", ovpnctl_argv(
            "client", "-c", str(cli_conf), *cli_engine, "--control-socket", str(cli_ctl)))
        took = self._wait(client, self._logged(client, READY_CLIENT),
                          f"'{READY_CLIENT}'")
        out(f"[4/5] client: ovpnctl client -c client.conf   connected in {took:.1f} s")

        ping = cli.ping(SERVER_VPN4, count=3, timeout=min(10.0, self.timeout))
        result.ping_sent, result.ping_received = ping.transmitted, ping.received
        result.ping_rtt_ms = ping.rtt_avg_ms
        ping6 = cli.ping(SERVER_VPN6, count=1, timeout=min(5.0, self.timeout))
        result.ping6_ok = bool(ping6)
        rtt = f", avg {ping.rtt_avg_ms:.2f} ms" if ping.rtt_avg_ms is not None else ""
        out(f"[5/5] ping {SERVER_VPN4} through the tunnel: {ping.received}/{ping.transmitted} "
            f"replies{rtt}; ping {SERVER_VPN6}: {'ok' if ping6 else 'no reply'}")
        if not ping:
            raise DemoError(f"no reply through the tunnel from {SERVER_VPN4}:\n"
                            f"{ping.output.strip()}\nserver log:\n{_tail(server.log)}\n"
                            f"client log:\n{_tail(client.log)}")

        result.status = json.loads(self._status(srv, srv_ctl, "--json"))
        result.status_text = self._status(srv, srv_ctl).rstrip("\n")
        out("")
        out("$ ovpnctl status        (in the server's namespace)")
        for ln in result.status_text.splitlines():
            out(ln)
        out("")
        clients = result.status.get("clients") or []
        if len(clients) != 1 or clients[0].get("common_name") != CLIENT_CN:
            raise DemoError(f"ovpnctl status shows {len(clients)} clients, expected one "
                            f"({CLIENT_CN}): {json.dumps(result.status)}")
        if self.verbose:
            for p in self.procs:
                out(f"      --- {p.name} log ---")
                out(_tail(p.log, 15))

        # orderly stop: the client says EXIT, the server forgets it, engines go last
        rc_c = self._stop(client)
        rc_s = self._stop(server)
        if rc_c != 0 or rc_s != 0:
            raise DemoError(f"daemons did not exit cleanly on SIGTERM (client {rc_c}, "
                            f"server {rc_s}):\nserver log:\n{_tail(server.log)}\n"
                            f"client log:\n{_tail(client.log)}")

    def _cleanup(self, result: DemoResult) -> None:
        """Stop every process, remove namespaces/jails and the temporary directory."""
        problems: list[str] = []
        for proc in reversed(self.procs):
            try:
                self._stop(proc, grace=5.0)
            except Exception as exc:   # keep going: the lab kills what is left anyway
                problems.append(f"{proc.name}: {exc}")
        if self.lab is not None:
            try:
                self.lab.close()
            except Exception as exc:
                problems.append(str(exc))
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"could not remove {self.workdir}")
        if problems:
            self.out("cleanup incomplete: " + "; ".join(problems))
            result.cleaned = False
        else:
            what = "namespaces" if sys.platform.startswith("linux") else "jails"
            self.out(f"cleaned up: daemons stopped, {what}, interfaces and "
                     f"{self.workdir or 'temporary files'} removed")
            result.cleaned = True


def run_demo(*, out: Out = print, engine: str = "auto", verbose: bool = False,
             timeout: float = 30.0) -> DemoResult:
    """Run the demo once; see :class:`Demo`."""
    return Demo(out=out, engine=engine, verbose=verbose, timeout=timeout).run()

