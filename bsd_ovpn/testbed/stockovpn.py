"""Run stock OpenVPN 2.6 peers inside test hosts.

Interop is only proven against the real program, so tests start Debian's (or
FreeBSD's) ``openvpn`` binary as server or client in a :class:`~.hosts.Host`
with a generated config, capture its log to a file and wait for log lines.
Key files for tls-auth / tls-crypt / tls-crypt-v2 are made by the real
``openvpn --genkey``, so our own key-file parsers are tested against the
format the reference writes.

Addresses are test ranges only: tunnels use 198.51.100.0/24 and
2001:db8:100::/64, the outer link 192.0.2.0/24 (and 2001:db8:2::/64).

Usage::

    keys = WrapKeys(tmp / "keys")
    srv = StockOpenVPN(server_host, OvpnConfig.server(pki, keys), tmp, "server").start()
    cli = StockOpenVPN(client_host, OvpnConfig.client(pki, keys, remote="192.0.2.1"),
                       tmp, "client").start()
    srv.wait_ready(); cli.wait_ready()
    ...
    cli.stop(); srv.stop()
"""
from __future__ import annotations

import ipaddress
import itertools
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

from bsd_ovpn.errors import OvpnError, ValidationError
from bsd_ovpn.testbed.hosts import Host, check_ifname
from bsd_ovpn.testbed.pki import PKI, Credential
from bsd_ovpn.testbed.logged import LoggedProcess

Wrap = Literal["none", "tls-auth", "tls-crypt", "tls-crypt-v2"]
WRAPS: tuple[str, ...] = ("none", "tls-auth", "tls-crypt", "tls-crypt-v2")
READY = "Initialization Sequence Completed"

#: Tunnel pools handed out by a stock server (server gets .1 / ::1).
TUNNEL_NET4 = "198.51.100.0/24"
TUNNEL_NET6 = "2001:db8:100::/64"
DEFAULT_SERVER_CIPHERS = "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"
DEFAULT_CLIENT_CIPHERS = "AES-256-GCM"

_RUN_TAG = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(4))
_DEV_COUNTER = itertools.count()


class StockOpenVPNError(OvpnError):
    """A stock openvpn peer failed to start, exited, or never logged what we waited for.

    The message ends with the tail of the peer's log, which is almost always
    where the reason is.
    """


def openvpn_binary() -> str:
    path = shutil.which("openvpn") or next(
        (p for p in ("/usr/sbin/openvpn", "/usr/local/sbin/openvpn") if os.access(p, os.X_OK)), None)
    if path is None:
        raise StockOpenVPNError("the openvpn program is not installed (apt-get install openvpn "
                                "/ pkg install openvpn)")
    return path


def unique_dev_name() -> str:
    """A tun name unique to this run (<= 15 chars); on FreeBSD "tun" (next free tunN)."""
    if sys.platform.startswith("freebsd"):
        return "tun"
    return check_ifname(f"tun{_RUN_TAG}{next(_DEV_COUNTER)}")


# ---------------------------------------------------------------------------
# Key files made by openvpn itself


def genkey(kind: str, path: str | os.PathLike[str], *, server_key: str | os.PathLike[str] | None = None,
           metadata_b64: str | None = None) -> Path:
    """``openvpn --genkey <kind> <path>``; kind = tls-auth, tls-crypt, secret,
    tls-crypt-v2-server or tls-crypt-v2-client (which needs ``server_key``)."""
    kinds = ("secret", "tls-auth", "tls-crypt", "tls-crypt-v2-server", "tls-crypt-v2-client")
    if kind not in kinds:
        raise ValidationError(f"genkey kind must be one of {kinds}, got {kind!r}")
    path = Path(path)
    argv = [openvpn_binary()]
    if kind == "tls-crypt-v2-client":
        if server_key is None:
            raise ValidationError("a tls-crypt-v2 client key needs the server key (server_key=)")
        argv += ["--tls-crypt-v2", str(server_key)]
    elif server_key is not None or metadata_b64 is not None:
        raise ValidationError(f"server_key/metadata only apply to tls-crypt-v2-client, not {kind}")
    argv += ["--genkey", kind, str(path)]
    if metadata_b64 is not None:
        if not re.fullmatch(r"[A-Za-z0-9+/=]{1,980}", metadata_b64):
            raise ValidationError("metadata_b64 must be base64 text (<= 980 chars)")
        argv.append(metadata_b64)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not path.exists():
        raise StockOpenVPNError(f"{' '.join(argv)} failed ({proc.returncode}): "
                                f"{(proc.stderr or proc.stdout).strip()}")
    return path


class WrapKeys:
    """Control-channel wrapping keys in one directory, generated on first use.

    One set is shared by a server and all its clients (tls-crypt-v2 client
    keys are wrapped with the server key, so they must come from the same set).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._v2_clients: dict[str, Path] = {}

    def _lazy(self, filename: str, kind: str) -> Path:
        path = self.directory / filename
        if not path.exists():
            genkey(kind, path)
        return path

    @property
    def tls_auth(self) -> Path:
        return self._lazy("ta.key", "tls-auth")

    @property
    def tls_crypt(self) -> Path:
        return self._lazy("tc.key", "tls-crypt")

    @property
    def tls_crypt_v2_server(self) -> Path:
        return self._lazy("tcv2-server.key", "tls-crypt-v2-server")

    def tls_crypt_v2_client(self, name: str = "client", *, metadata_b64: str | None = None) -> Path:
        """A client key wrapped with this set's server key (cached per name)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValidationError(f"bad tls-crypt-v2 client key name {name!r}")
        if name not in self._v2_clients:
            path = self.directory / f"tcv2-{name}.key"
            genkey("tls-crypt-v2-client", path, server_key=self.tls_crypt_v2_server,
                   metadata_b64=metadata_b64)
            self._v2_clients[name] = path
        return self._v2_clients[name]

    def key_for(self, wrap: str, role: str, client_name: str = "client") -> Path | None:
        """The key file a peer of ``role`` uses for ``wrap``."""
        if wrap == "none":
            return None
        if wrap == "tls-auth":
            return self.tls_auth
        if wrap == "tls-crypt":
            return self.tls_crypt
        if wrap == "tls-crypt-v2":
            return self.tls_crypt_v2_server if role == "server" \
                else self.tls_crypt_v2_client(client_name)
        raise ValidationError(f"wrap must be one of {WRAPS}, got {wrap!r}")


# ---------------------------------------------------------------------------
# Configs

_SAFE_TOKEN = re.compile(r"^[^\s#;\"'\\]+$")


def _token(what: str, value: object) -> str:
    s = str(value)
    if not _SAFE_TOKEN.match(s):
        raise ValidationError(f"{what} must be a single config token without spaces or quotes: {s!r}")
    return s


@dataclass(frozen=True)
class OvpnConfig:
    """Everything that varies between our stock-peer configs; ``render()`` makes the file.

    Build with :meth:`server` / :meth:`client`, adjust with
    ``dataclasses.replace`` or keyword arguments.  ``extra`` lines are
    appended verbatim (one directive each) for anything not covered.
    """

    role: Literal["server", "client"]
    ca: Path
    cert: Path
    key: Path
    wrap: str = "tls-crypt"
    wrap_key: Path | None = None
    dev: str = field(default_factory=unique_dev_name)
    proto: str = "udp"
    port: int = 1194
    local: str | None = None
    remote: str | None = None
    subnet: str = TUNNEL_NET4
    subnet6: str | None = None
    topology: str = "subnet"
    data_ciphers: str = DEFAULT_SERVER_CIPHERS
    auth: str | None = None
    keepalive: tuple[int, int] | None = None
    reneg_sec: int | None = None
    verb: int = 3
    disable_dco: bool = True
    remote_cert_tls: bool = False
    crl: Path | None = None
    status: Path | None = None
    extra: tuple[str, ...] = ()

    @classmethod
    def server(cls, pki: PKI, keys: WrapKeys | None, *, wrap: str = "tls-crypt",
               cert: Credential | None = None, **kw: object) -> "OvpnConfig":
        """A stock server: topology subnet, pool 198.51.100.0/24, keepalive 10 60."""
        cred = cert or pki.server()
        wrap_key = kw.pop("wrap_key", None) or (keys.key_for(wrap, "server") if keys else None)
        kw.setdefault("keepalive", (10, 60))
        return cls(role="server", ca=pki.ca_path, cert=cred.cert_path, key=cred.key_path,
                   wrap=wrap, wrap_key=wrap_key, **kw)  # type: ignore[arg-type]

    @classmethod
    def client(cls, pki: PKI, keys: WrapKeys | None, *, remote: str, wrap: str = "tls-crypt",
               cert: Credential | None = None, **kw: object) -> "OvpnConfig":
        """A stock client of ``remote``; checks the server's EKU (remote-cert-tls server)."""
        cred = cert or pki.client()
        wrap_key = kw.pop("wrap_key", None) or (
            keys.key_for(wrap, "client", cred.cert_path.stem) if keys else None)
        kw.setdefault("data_ciphers", DEFAULT_CLIENT_CIPHERS)
        kw.setdefault("remote_cert_tls", True)
        return cls(role="client", ca=pki.ca_path, cert=cred.cert_path, key=cred.key_path,
                   wrap=wrap, wrap_key=wrap_key, remote=remote, **kw)  # type: ignore[arg-type]

    def with_(self, **kw: object) -> "OvpnConfig":
        return replace(self, **kw)  # type: ignore[arg-type]

    # -- rendering -----------------------------------------------------------

    def render(self) -> str:
        if self.role not in ("server", "client"):
            raise ValidationError(f"role must be server or client, got {self.role!r}")
        if self.wrap not in WRAPS:
            raise ValidationError(f"wrap must be one of {WRAPS}, got {self.wrap!r}")
        if self.wrap != "none" and self.wrap_key is None:
            raise ValidationError(f"wrap {self.wrap} needs a key file (wrap_key= or WrapKeys)")
        if not 1 <= int(self.port) <= 65535:
            raise ValidationError(f"port must be 1..65535, got {self.port}")
        if self.proto not in ("udp", "udp4", "udp6", "tcp-server", "tcp-client", "tcp",
                              "tcp4", "tcp6", "tcp4-server", "tcp6-server", "tcp4-client",
                              "tcp6-client"):
            raise ValidationError(f"unknown proto {self.proto!r}")
        lines = [f"# {self.role} config generated by bsd_ovpn.testbed.stockovpn"]
        add = lines.append
        dev = _token("dev", self.dev)
        if self.role == "server":
            add(f"port {int(self.port)}")
            add(f"proto {self.proto}")
            if self.local:
                add(f"local {_token('local', ipaddress.ip_address(self.local))}")
            add(f"dev {dev}")
            add("dev-type tun")
            add(f"topology {_token('topology', self.topology)}")
            net = ipaddress.ip_network(self.subnet, strict=True)
            if net.version != 4:
                raise ValidationError(f"subnet must be an IPv4 network: {self.subnet!r}")
            add(f"server {net.network_address} {net.netmask}")
            if self.subnet6:
                net6 = ipaddress.ip_network(self.subnet6, strict=True)
                if net6.version != 6:
                    raise ValidationError(f"subnet6 must be an IPv6 network: {self.subnet6!r}")
                add(f"server-ipv6 {net6}")
            add("dh none")
        else:
            if not self.remote:
                raise ValidationError("a client config needs remote=")
            add("client")
            add(f"dev {dev}")
            add("dev-type tun")
            add(f"proto {self.proto}")
            add(f"remote {_token('remote', self.remote)} {int(self.port)}")
            if self.local:
                add(f"local {_token('local', ipaddress.ip_address(self.local))}")
                add("lport 0")
            else:
                add("nobind")
        for name, path in (("ca", self.ca), ("cert", self.cert), ("key", self.key)):
            add(f"{name} {_token(name, path)}")
        if self.remote_cert_tls:
            add(f"remote-cert-tls {'client' if self.role == 'server' else 'server'}")
        if self.crl is not None:
            add(f"crl-verify {_token('crl', self.crl)}")
        if self.auth:
            add(f"auth {_token('auth', self.auth)}")
        if self.wrap == "tls-auth":
            add(f"tls-auth {_token('wrap_key', self.wrap_key)} {0 if self.role == 'server' else 1}")
        elif self.wrap in ("tls-crypt", "tls-crypt-v2"):
            add(f"{self.wrap} {_token('wrap_key', self.wrap_key)}")
        add(f"data-ciphers {_token('data_ciphers', self.data_ciphers)}")
        if self.keepalive is not None:
            interval, timeout = (int(x) for x in self.keepalive)
            add(f"keepalive {interval} {timeout}")
        if self.reneg_sec is not None:
            add(f"reneg-sec {int(self.reneg_sec)}")
        if self.status is not None:
            add(f"status {_token('status', self.status)} 1")
            add("status-version 2")
        add(f"verb {int(self.verb)}")
        if self.disable_dco:
            add("disable-dco")
        for line in self.extra:
            if "\n" in line or "\r" in line:
                raise ValidationError(f"extra config lines must be single lines: {line!r}")
            add(line)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# A running peer


class StockOpenVPN(LoggedProcess):
    """One ``openvpn`` process in a host, its config file and its log file."""

    error = StockOpenVPNError
    tail_lines = 40

    def _what(self) -> str:
        return f"{self.name} (openvpn in {self.host.name})"

    def __init__(self, host: Host, config: OvpnConfig | str, workdir: str | os.PathLike[str],
                 name: str = "openvpn") -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ValidationError(f"bad peer name {name!r}")
        self.host = host
        self.config = config
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{name}.conf"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._logfh: object | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<StockOpenVPN {self.name} in {self.host.name} {state}>"

    @property
    def dev(self) -> str | None:
        return self.config.dev if isinstance(self.config, OvpnConfig) else None

    @property
    def opened_dev(self) -> str | None:
        """The tun device openvpn actually opened (from its log; "tun3" on FreeBSD)."""
        m = re.search(r"TUN/TAP device (?:/dev/)?(\S+) opened", self.log)
        return m.group(1) if m else None

    def start(self) -> "StockOpenVPN":
        """Write the config and start openvpn; returns self (does not wait)."""
        if self.proc is not None:
            raise StockOpenVPNError(f"{self.name} was already started")
        text = self.config.render() if isinstance(self.config, OvpnConfig) else self.config
        self.config_path.write_text(text)
        logfh = open(self.log_path, "ab")
        self._logfh = logfh
        try:
            self.proc = self.host.popen([openvpn_binary(), "--config", str(self.config_path)],
                                        stdout=logfh, stderr=subprocess.STDOUT,
                                        cwd=str(self.workdir))
        except BaseException:
            logfh.close()
            raise
        return self

    # -- log -------------------------------------------------------------------

    def wait_ready(self, timeout: float = 30.0) -> re.Match[str]:
        """Wait for "Initialization Sequence Completed"."""
        return self.wait_for(re.escape(READY), timeout)

    # -- stop --------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit status."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            fh = self._logfh
            self._logfh = None
            if fh is not None:
                fh.close()  # type: ignore[attr-defined]
        return self.proc.returncode

    def __enter__(self) -> "StockOpenVPN":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(host: Host, pki: PKI, keys: WrapKeys | None, workdir: str | os.PathLike[str],
                 *, name: str = "server", **opts: object) -> StockOpenVPN:
    """Build a server config (``OvpnConfig.server`` options) and start it."""
    return StockOpenVPN(host, OvpnConfig.server(pki, keys, **opts), workdir, name).start()


def start_client(host: Host, pki: PKI, keys: WrapKeys | None, workdir: str | os.PathLike[str],
                 *, remote: str, name: str = "client", **opts: object) -> StockOpenVPN:
    """Build a client config (``OvpnConfig.client`` options) and start it."""
    return StockOpenVPN(host, OvpnConfig.client(pki, keys, remote=remote, **opts),
                        workdir, name).start()


def log_sections(peers: Sequence[StockOpenVPN], lines: int = 80) -> list[tuple[str, str]]:
    """(title, log tail) pairs for attaching to a failing test report."""
    return [(f"openvpn {p.name} ({p.host.name}) log", p.log_tail(lines)) for p in peers]
