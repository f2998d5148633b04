"""OpenVPN 2.6 configuration files -> typed settings.

bsd_ovpn reads the same ``server.conf`` / ``client.conf`` a stock OpenVPN
uses, so an operator can switch implementations without rewriting configs.
The tokenizer follows OpenVPN's own rules (``split_line``); helper
directives (``server``, ``server-ipv6``, ``keepalive``, ``client``) expand
exactly as OpenVPN documents them.  Anything we do not implement is an error
naming file, line and directive rather than being silently ignored: a VPN
that quietly drops ``redirect-gateway`` or a ``learn-address`` script is
worse than one that refuses to start.  Directives that are accepted but have
no effect here are listed in :data:`NOOP_DIRECTIVES`, each with the reason why
ignoring it changes nothing a user relies on; directives this module parses
but whose behaviour ``ovpnctl`` does not have yet are refused at load time
(:data:`NOT_YET_SUPPORTED`).
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Union

from bsd_ovpn.errors import ConfigError
from bsd_ovpn.ifovpn import CIPHER_KEY_SIZES, REPLAY_WINDOW
from bsd_ovpn.proto.keyfile import (
    KeyFileError, StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, parse_tls_crypt_v2_key,
    read_key_text,
)

__all__ = [
    "Config", "CCDConfig", "Material", "Remote", "Route", "RouteIPv6", "IRoute", "Pool",
    "TLSWrapSettings", "TLSCryptV2Settings", "VerifyX509Name", "AuthUserPass",
    "AuthUserPassVerify", "StatusFile", "TokenizeError", "split_line", "load", "loads",
    "load_ccd", "loads_ccd", "NOOP_DIRECTIVES", "UNSUPPORTED_DIRECTIVES", "DATA_CIPHERS",
    "DEFAULT_DATA_CIPHERS", "NOT_YET_SUPPORTED", "PoolPersist", "PULL_FILTER_ACTIONS",
    "pull_filter_action",
]

log = logging.getLogger(__name__)

#: AEAD ciphers the data channel (if_ovpn or the engine) implements.
DATA_CIPHERS = tuple(c for c in CIPHER_KEY_SIZES if c != "none")
DEFAULT_DATA_CIPHERS = ("AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305")

#: Accepted and recorded nowhere.  An entry may only be here when ignoring the directive
#: changes nothing a user relies on (security, addressing, who may connect); the reason
#: says why.  Anything else is implemented, refused (UNSUPPORTED_DIRECTIVES) or refused
#: until the daemon implements it (NOT_YET_SUPPORTED).
NOOP_DIRECTIVES: dict[str, str] = {
    "persist-key": "keys and certificates are read at start (and on SIGHUP, as in OpenVPN) "
                   "and kept in memory over reconnects and ping-restarts",
    "persist-local-ip": "the local address is resolved once at start and never again",
    "key-derivation": "only meaningful when pushed by a server; the key derivation (TLS-EKM "
                      "or the OpenVPN PRF) is negotiated through IV_PROTO as in 2.6",
    "mute-replay-warnings": "replayed packets are dropped and counted by the data channel, "
                            "never logged per packet",
    "auth-nocache": "the password comes from the auth-user-pass file (ovpnctl cannot prompt), "
                    "which stays on disk; keeping it in memory for renegotiations exposes "
                    "nothing the file does not, and OpenVPN re-reads that file anyway",
    "sndbuf": "only tunes throughput: the kernel / engine owns the data socket and the "
              "daemon sizes its control socket buffer itself",
    "rcvbuf": "only tunes throughput: the kernel / engine owns the data socket and the "
              "daemon sizes its control socket buffer itself",
    "fast-io": "only tunes throughput: the event loop is always non-blocking",
    "ping-timer-rem": "only matters for a p2p peer listening without a remote, which "
                      "bsd_ovpn does not run; server timers run per connected client",
    "tun-ipv6": "IPv6 in the tunnel is always enabled (a no-op in OpenVPN 2.6 too)",
    "txqueuelen": "only tunes throughput: the interface queue length stays at the system "
                  "default",
    "route-delay": "a Windows DHCP work-around; routes are added once the tunnel is up",
    "block-outside-dns": "Windows-only (OpenVPN ignores it elsewhere too)",
    "register-dns": "Windows-only (OpenVPN ignores it elsewhere too)",
    "suppress-timestamps": "logging goes through Python logging, which formats the time",
    "machine-readable-output": "logging goes through Python logging; use ovpnctl status --json",
}

#: Parsed and validated here, but ovpnctl does not act on them yet: a config that uses
#: them with an effect (see _Post.not_yet_supported) fails to load with "not supported yet by
#: ovpnctl".  Whoever implements the behaviour deletes the entry in the same change
#: (tests/unit/test_config.py lists these cases).
NOT_YET_SUPPORTED: dict[str, str] = {
    "reneg-bytes": "byte-count renegotiation is not implemented yet (only reneg-sec and the "
                   "data channel's packet-counter ROTATE_KEY)",
    "reneg-pkts": "packet-count renegotiation is not implemented yet (only reneg-sec and "
                  "the data channel's packet-counter ROTATE_KEY)",
    "ping-exit": "ovpnctl does not yet exit after ping-exit seconds without a packet from "
                 "the peer (use ping-restart / keepalive)",
    "pull-filter": "the client does not yet filter pushed options",
    "persist-remote-ip": "the client resolves the remote again on every reconnect",
    "route-metric": "the default metric is not applied yet (give the metric on each route "
                    "line instead)",
}

#: Known OpenVPN directives that bsd_ovpn refuses, with the reason.
UNSUPPORTED_DIRECTIVES: dict[str, str] = {
    "secret": "static-key (non-TLS) mode is not supported; use TLS with tls-crypt",
    "comp-lzo": "compression is not supported (if_ovpn/DCO refuses it); remove it",
    "compress": "compression is not supported (if_ovpn/DCO refuses it); remove it",
    "fragment": "--fragment is not supported by the in-kernel data channel",
    "management": "the management interface is not supported; use ovpnctl",
    "server-bridge": "bridging needs dev tap; if_ovpn is layer 3 only",
    "pkcs12": "use ca/cert/key PEM files",
    "pkcs11-providers": "PKCS#11 is not supported",
    "http-proxy": "proxies are UDP-incompatible",
    "socks-proxy": "proxies are not supported",
    "port-share": "port-share needs TCP, which is not supported",
    "up": "script hooks are not supported",
    "down": "script hooks are not supported",
    "route-up": "script hooks are not supported",
    "route-pre-down": "script hooks are not supported",
    "ipchange": "script hooks are not supported",
    "client-connect": "script hooks are not supported",
    "client-disconnect": "script hooks are not supported",
    "learn-address": "script hooks are not supported",
    "tls-verify": "script hooks are not supported",
    "plugin": "plugins are not supported",
    "shaper": "traffic shaping is not supported",
    "inetd": "inetd mode is not supported",
    "chroot": "chroot is not supported",
    "tls-crypt-v2-verify": "running a script on a client's tls-crypt-v2 key metadata before "
                           "accepting it is not implemented (script hooks are not supported); "
                           "remove it only if every holder of a client key may connect",
    "auth-gen-token": "server-generated session tokens are not implemented; clients re-send "
                      "their username/password at each renegotiation instead",
    "ncp-disable": "removed in OpenVPN 2.6",
    "connection": "<connection> blocks are not supported; use several remote lines",
    "tcp-nodelay": "TCP is not supported",
    "dev-node": "device nodes are chosen by bsd_ovpn",
}

_INLINE_OK = frozenset({"ca", "cert", "key", "dh", "tls-auth", "tls-crypt", "tls-crypt-v2",
                        "crl-verify", "auth-user-pass", "extra-certs"})
_MAX_INCLUDE_DEPTH = 10


class TokenizeError(ConfigError):
    """A line could not be split into parameters (quotes, backslashes)."""


# --- tokenizer ------------------------------------------------------------------------------

_C_SPACE = frozenset(" \t\n\v\f\r\0")     # C isspace() plus the terminating NUL

def split_line(line: str) -> list[str]:
    """Split one config (or pushed option) line into parameters, OpenVPN's way.

    Whitespace separates parameters; ``#`` or ``;`` starting a parameter
    begins a comment; ``"…"`` quotes with backslash escapes, ``'…'`` quotes
    verbatim; outside single quotes a backslash may only escape ``\\``,
    ``"`` or whitespace.  Raises :class:`TokenizeError` (no file/line: the
    caller adds them).
    """
    out: list[str] = []
    parm: list[str] = []
    INITIAL, QUOTED, UNQUOTED, SQUOTED = 0, 1, 2, 4
    state = INITIAL
    backslash = False
    for ch in line + "\0":
        is_space = ch in _C_SPACE
        if not backslash and ch == "\\" and state != SQUOTED:
            backslash = True
            continue
        out_ch = ""
        done = False
        if state == INITIAL:
            if not is_space:
                if ch in ";#":
                    break
                if not backslash and ch == '"':
                    state = QUOTED
                elif not backslash and ch == "'":
                    state = SQUOTED
                else:
                    out_ch, state = ch, UNQUOTED
        elif state == UNQUOTED:
            if not backslash and is_space:
                done = True
            else:
                out_ch = ch
        elif state == QUOTED:
            if not backslash and ch == '"':
                done = True
            else:
                out_ch = ch
        else:  # SQUOTED
            if ch == "'":
                done = True
            else:
                out_ch = ch
        if done:
            out.append("".join(parm))
            parm = []
            state = INITIAL
        if backslash and out_ch and not (out_ch in '\\"' or out_ch in _C_SPACE):
            raise TokenizeError("bad backslash ('\\') usage: only \\\\, \\\" and \\<space> are "
                                "escapes; write Windows paths with double backslashes")
        backslash = False
        if out_ch and out_ch != "\0":
            parm.append(out_ch)
        elif out_ch == "\0":
            # a NUL can only be reached escaped or inside quotes: the line ended there
            pass
    else:
        if state == QUOTED:
            raise TokenizeError('no closing quotation (")')
        if state == SQUOTED:
            raise TokenizeError("no closing single quotation (')")
        if state != INITIAL:
            raise TokenizeError(f"residual parse state ({state})")
    return out


# --- typed settings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Material:
    """Text of a PEM file or inline block (ca, cert, key, dh, crl-verify, …)."""

    text: str = field(repr=False)
    path: str | None = None          # None when it came from an inline <tag> block

    @property
    def inline(self) -> bool:
        return self.path is None

    def read(self) -> str:
        """Current text: re-read from disk for files (CRLs change), the block for inline."""
        if self.path is None:
            return self.text
        with open(self.path, encoding="utf-8") as fh:
            return fh.read()

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "[inline]"
        return f"Material({where}, sha256:{hashlib.sha256(self.text.encode()).hexdigest()[:12]})"


@dataclass(frozen=True)
class Remote:
    host: str
    port: int
    proto: str = "udp"


@dataclass(frozen=True)
class Route:
    network: str
    netmask: str = "255.255.255.255"
    gateway: str | None = None       # IP, or vpn_gateway / net_gateway / remote_host
    metric: int | None = None


@dataclass(frozen=True)
class RouteIPv6:
    network: str                      # "2001:db8::/64"
    gateway: str | None = None
    metric: int | None = None


@dataclass(frozen=True)
class IRoute:
    network: str                      # IPv4 "network/netmask-bits" style or IPv6 "addr/bits"
    netmask: str | None = None        # IPv4 only


@dataclass(frozen=True)
class Pool:
    start: str
    end: str
    netmask: str | None = None


@dataclass(frozen=True)
class PoolPersist:
    """``ifconfig-pool-persist FILE [SECONDS]``: CN -> address file, rewritten every SECONDS.

    ``seconds == 0`` means the file is only read (OpenVPN: "treated as read-only").
    """

    path: str
    seconds: int = 600


@dataclass(frozen=True)
class TLSWrapSettings:
    """tls-auth or tls-crypt: the key and (tls-auth only) the key direction."""

    kind: str                         # "tls-auth" | "tls-crypt"
    key: StaticKey
    direction: int | None = None
    source: str | None = None         # file path, None when inline


@dataclass(frozen=True)
class TLSCryptV2Settings:
    key: Union[TLSCryptV2ServerKey, TLSCryptV2ClientKey]
    force_cookie: bool = False
    source: str | None = None


@dataclass(frozen=True)
class VerifyX509Name:
    name: str
    type: str = "subject"             # subject | name | name-prefix


@dataclass(frozen=True)
class AuthUserPass:
    """Client credentials; username/password None means "ask" (not possible for a daemon)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str | None = None


@dataclass(frozen=True)
class AuthUserPassVerify:
    command: str
    method: str                        # via-env | via-file


@dataclass(frozen=True)
class StatusFile:
    path: str
    interval: int = 60


@dataclass
class Config:
    """Everything a bsd_ovpn server or client needs from an OpenVPN config file."""

    path: str = "<string>"
    # role
    mode: str = "p2p"                  # p2p | server
    tls_server: bool = False
    tls_client: bool = False
    pull: bool = False
    client: bool = False
    # transport
    port: int = 1194
    lport: int | None = None
    rport: int | None = None
    proto: str = "udp"                 # udp | udp4 | udp6
    local: str | None = None
    remotes: list[Remote] = field(default_factory=list)
    remote_random: bool = False
    resolv_retry: float = math.inf
    connect_retry: int = 1
    connect_retry_max_interval: int = 300
    connect_retry_max: int | None = None
    nobind: bool = False
    float_peer: bool = False         # --float: accept the peer from a new address
    multihome: bool = False          # --multihome: reply from the address the peer used
    explicit_exit_notify: int = 0
    # device and addressing
    dev: str | None = None
    dev_type: str | None = None        # tun | null
    topology: str = "net30"
    server: tuple[str, str] | None = None
    server_nopool: bool = False
    server_ipv6: str | None = None
    ifconfig: tuple[str, str] | None = None           # (local, remote-or-netmask)
    ifconfig_ipv6: tuple[str, str] | None = None      # ("addr/bits", remote)
    ifconfig_pool: Pool | None = None
    ifconfig_ipv6_pool: str | None = None             # "base/bits"
    ifconfig_pool_persist: PoolPersist | None = None
    push_ifconfig_constraint: tuple[str, str] | None = None
    push: list[str] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    routes_ipv6: list[RouteIPv6] = field(default_factory=list)
    route_gateway: str | None = None
    route_metric: int | None = None
    route_nopull: bool = False
    redirect_gateway: list[str] | None = None
    dhcp_options: list[list[str]] = field(default_factory=list)
    pull_filters: list[tuple[str, str]] = field(default_factory=list)
    client_config_dir: str | None = None
    ccd_exclusive: bool = False
    client_to_client: bool = False
    duplicate_cn: bool = False
    max_clients: int | None = None
    tun_mtu: int = 1500
    mssfix: int | None = None
    # timers
    keepalive: tuple[int, int] | None = None
    ping: int = 0
    ping_restart: int = 0
    ping_exit: int = 0
    reneg_sec: int = 3600
    reneg_sec_max: int | None = None
    reneg_bytes: int = 0
    reneg_pkts: int = 0
    hand_window: int = 60
    tran_window: int = 3600
    tls_timeout: int = 2
    replay_window: tuple[int, int] = (64, 15)
    # crypto
    data_ciphers: list[str] = field(default_factory=lambda: list(DEFAULT_DATA_CIPHERS))
    data_ciphers_fallback: str | None = None
    cipher: str | None = None
    auth: str = "SHA1"
    tls_auth: TLSWrapSettings | None = None
    tls_crypt: TLSWrapSettings | None = None
    key_direction: int | None = None
    tls_crypt_v2: TLSCryptV2Settings | None = None
    ca: Material | None = None
    cert: Material | None = None
    key: Material | None = None
    extra_certs: Material | None = None
    dh: Material | None = None         # None also for "dh none" (ECDHE only)
    crl_verify: Material | None = None
    remote_cert_tls: str | None = None
    remote_cert_eku: str | None = None
    verify_x509_name: VerifyX509Name | None = None
    verify_client_cert: str = "require"
    tls_version_min: str | None = None
    tls_version_min_or_highest: bool = False
    tls_version_max: str | None = None
    tls_cipher: str | None = None
    tls_ciphersuites: str | None = None
    tls_groups: str | None = None
    # authentication
    auth_user_pass: AuthUserPass | None = None
    auth_user_pass_verify: AuthUserPassVerify | None = None
    username_as_common_name: bool = False
    auth_retry: str = "none"
    # process
    user: str | None = None
    group: str | None = None
    status: StatusFile | None = None
    status_version: int = 1
    log: str | None = None
    log_append: bool = False
    writepid: str | None = None
    daemon: bool = False
    verb: int = 1
    mute: int = 0
    persist_tun: bool = False
    persist_remote_ip: bool = False
    bind_ipv6only: bool = False
    push_peer_info: bool = False
    disable_dco: bool = False
    allow_compression: str = "no"
    script_security: int = 1
    setenv: dict[str, str] = field(default_factory=dict)
    # bookkeeping: directive -> (path, line) of its last occurrence
    origins: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)

    @property
    def is_server(self) -> bool:
        return self.mode == "server" or self.tls_server

    def control_wrap_kind(self) -> str:
        """"none", "tls-auth", "tls-crypt" or "tls-crypt-v2" (the one a client uses)."""
        if self.tls_crypt_v2 is not None and not self.is_server:
            return "tls-crypt-v2"
        if self.tls_crypt is not None:
            return "tls-crypt"
        if self.tls_auth is not None:
            return "tls-auth"
        return "none"

    def new_control_wrap(self):  # -> ControlWrap (imported lazily: config must not need proto)
        """A fresh per-session wrapping for this config's tls-auth / tls-crypt / v2 client key.

        A server's tls-crypt-v2 key is not a per-session wrapping: use
        ``TLSCryptV2Server(config.tls_crypt_v2.key)`` next to this.
        """
        from bsd_ovpn.proto import wrap as _wrap
        kind = self.control_wrap_kind()
        if kind == "tls-crypt-v2":
            assert self.tls_crypt_v2 is not None
            return _wrap.TLSCryptV2Client(self.tls_crypt_v2.key)   # type: ignore[arg-type]
        if kind == "tls-crypt":
            assert self.tls_crypt is not None
            return _wrap.TLSCrypt(self.tls_crypt.key, server=self.is_server)
        if kind == "tls-auth":
            assert self.tls_auth is not None
            return _wrap.TLSAuth(self.tls_auth.key, self.tls_auth.direction, self.auth)
        return _wrap.NoWrap()


@dataclass
class CCDConfig:
    """A client-config-dir file: per-client overrides."""

    path: str = "<string>"
    iroutes: list[IRoute] = field(default_factory=list)
    iroutes_ipv6: list[IRoute] = field(default_factory=list)
    ifconfig_push: tuple[str, str] | None = None
    ifconfig_ipv6_push: tuple[str, str | None] | None = None
    push: list[str] = field(default_factory=list)
    push_reset: bool = False
    push_remove: list[str] = field(default_factory=list)
    disable: bool = False


# --- value helpers ------------------------------------------------------------------------

def _ipv4(v: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(v)


def _netbits(mask: str) -> int:
    m = int(_ipv4(mask))
    bits = bin(m).count("1")
    if m != ((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF):
        raise ValueError(f"{mask} is not a contiguous netmask")
    return bits


# --- the parser -----------------------------------------------------------------------------

class _Ctx:
    """Where a directive came from; builds errors that name file, line and directive."""

    def __init__(self, path: str, line: int, directive: str, inline: bool) -> None:
        self.path, self.line, self.directive, self.inline = path, line, directive, inline

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.directive}: {msg}", self.path, self.line, self.directive)


_Handler = Callable[["_Parser", _Ctx, list[str]], None]
_HANDLERS: dict[str, tuple[int, int, _Handler]] = {}


def _directive(name: str, nmin: int, nmax: int) -> Callable[[_Handler], _Handler]:
    def deco(fn: _Handler) -> _Handler:
        _HANDLERS[name] = (nmin, nmax, fn)
        return fn
    return deco


def _int(ctx: _Ctx, v: str, lo: int, hi: int, what: str = "value") -> int:
    digits = v[1:] if v.startswith("-") else v
    if not digits or len(digits) > 20 or not all("0" <= ch <= "9" for ch in digits):
        raise ctx.error(f"{what} {v!r} is not an integer")
    n = int(v, 10)
    if not lo <= n <= hi:
        raise ctx.error(f"{what} {n} outside {lo}..{hi}")
    return n


def _choice(ctx: _Ctx, v: str, choices: tuple[str, ...], what: str = "value") -> str:
    if v not in choices:
        raise ctx.error(f"{what} {v!r} must be one of: {', '.join(choices)}")
    return v


def _v4(ctx: _Ctx, v: str, what: str = "address") -> str:
    try:
        return str(_ipv4(v))
    except ValueError:
        raise ctx.error(f"{what} {v!r} is not an IPv4 address") from None


def _mask(ctx: _Ctx, v: str) -> str:
    try:
        _netbits(v)
    except ValueError:
        raise ctx.error(f"{v!r} is not a valid IPv4 netmask") from None
    return v


def _v6net(ctx: _Ctx, v: str, what: str = "network") -> str:
    try:
        if "/" not in v:
            return str(ipaddress.IPv6Address(v)) + "/128"
        addr, bits = v.split("/", 1)
        ipaddress.IPv6Address(addr)
        b = int(bits)
        if not 0 <= b <= 128:
            raise ValueError
        return f"{ipaddress.IPv6Address(addr)}/{b}"
    except ValueError:
        raise ctx.error(f"{what} {v!r} is not an IPv6 address[/bits]") from None


def _v6(ctx: _Ctx, v: str, what: str = "address") -> str:
    try:
        return str(ipaddress.IPv6Address(v))
    except ValueError:
        raise ctx.error(f"{what} {v!r} is not an IPv6 address") from None


class _Parser:
    def __init__(self, cfg: Config | CCDConfig, ccd: bool = False) -> None:
        self.cfg = cfg
        self.ccd = ccd
        self.base_dirs: list[str] = []
        self.ignore_unknown: set[str] = set()
        self.tls_auth_raw: tuple[_Ctx, StaticKey, int | None, str | None] | None = None
        self.explicit_data_ciphers = False

    # ---- file handling ----
    def resolve(self, p: str) -> str:
        if os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(self.base_dirs[-1], p))

    def material(self, ctx: _Ctx, arg: str, *, secret: bool = False) -> Material:
        if ctx.inline:
            return Material(arg, None)
        path = self.resolve(arg)
        try:
            text = read_key_text(path) if secret else _read_text(path)
        except (OSError, KeyFileError) as exc:
            raise ctx.error(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        return Material(text, path)

    def key_text(self, ctx: _Ctx, arg: str) -> tuple[str, str | None]:
        if ctx.inline:
            return arg, None
        path = self.resolve(arg)
        try:
            return read_key_text(path), path
        except KeyFileError as exc:
            raise ctx.error(str(exc)) from None

    def run(self, text: str, path: str, depth: int = 0) -> None:
        self.base_dirs.append(os.path.dirname(os.path.abspath(path))
                              if path not in ("<string>", "-") else os.getcwd())
        try:
            self._run(text, path, depth)
        finally:
            self.base_dirs.pop()

    def _run(self, text: str, path: str, depth: int) -> None:
        lines = text.split("\n")
        i = 0
        while i < len(lines):
            lineno = i + 1
            line = lines[i]
            i += 1
            if lineno == 1 and line.startswith("\ufeff"):
                line = line[1:]
            try:
                tokens = split_line(line)
            except TokenizeError as exc:
                raise TokenizeError(str(exc), path, lineno) from None
            if not tokens:
                continue
            if len(tokens[0]) >= 3 and tokens[0].startswith("--"):
                tokens[0] = tokens[0][2:]
            inline = False
            if len(tokens) == 1 and len(tokens[0]) > 2 and tokens[0][0] == "<" \
                    and tokens[0][-1] == ">":
                tag = tokens[0][1:-1]
                close = f"</{tag}>"
                body = []
                while True:
                    if i >= len(lines):
                        raise ConfigError(f"{tag}: end tag {close} missing", path, lineno, tag)
                    inner = lines[i]
                    i += 1
                    if inner.lstrip().startswith(close):
                        break
                    body.append(inner + "\n")
                tokens = [tag, "".join(body)]
                inline = True
            self.apply(_Ctx(path, lineno, tokens[0], inline), tokens[0], tokens[1:], depth)

    def apply(self, ctx: _Ctx, name: str, args: list[str], depth: int) -> None:
        if ctx.inline and name not in _INLINE_OK:
            raise ctx.error("this directive cannot be given as an inline <block>")
        if name == "config":
            if len(args) != 1:
                raise ctx.error("expects exactly 1 argument (a file to include)")
            if depth + 1 >= _MAX_INCLUDE_DEPTH:
                raise ctx.error("maximum include depth exceeded (does the file include itself?)")
            inc = self.resolve(args[0])
            try:
                text = _read_text(inc)
            except OSError as exc:
                raise ctx.error(f"cannot read {inc}: {exc.strerror or exc}") from None
            self.run(text, inc, depth + 1)
            return
        if name == "setenv" and args and args[0] == "opt":
            if len(args) < 2:
                raise ctx.error("setenv opt needs a directive")
            sub = _Ctx(ctx.path, ctx.line, args[1], False)
            # only *unknown* options are skipped (as in OpenVPN): one we refuse or have
            # not implemented yet must not slip through this door silently
            if args[1] not in _HANDLERS and args[1] not in NOOP_DIRECTIVES \
                    and args[1] not in UNSUPPORTED_DIRECTIVES \
                    and args[1] not in _CCD_HANDLERS:
                log.warning("%s:%d: ignoring unknown option %s (setenv opt)",
                            ctx.path, ctx.line, args[1])
                return
            self.apply(sub, args[1], args[2:], depth)
            return
        if name in UNSUPPORTED_DIRECTIVES:
            raise ctx.error(f"not supported: {UNSUPPORTED_DIRECTIVES[name]}")
        if name in NOOP_DIRECTIVES:
            log.debug("%s:%d: %s accepted, no effect: %s", ctx.path, ctx.line, name,
                      NOOP_DIRECTIVES[name])
            return
        table = _CCD_HANDLERS if self.ccd else _HANDLERS
        if name not in table:
            if name in self.ignore_unknown:
                log.warning("%s:%d: ignoring unknown option %s (ignore-unknown-option)",
                            ctx.path, ctx.line, name)
                return
            if not self.ccd and name in _CCD_HANDLERS and name not in _HANDLERS:
                raise ctx.error("only valid in a client-config-dir file")
            if self.ccd and name in _HANDLERS:
                raise ctx.error("cannot be used in a client-config-dir file")
            raise ctx.error("unknown or unsupported directive")
        nmin, nmax, fn = table[name]
        if not nmin <= len(args) <= nmax:
            want = f"{nmin}" if nmin == nmax else f"{nmin}..{nmax}"
            raise ctx.error(f"expects {want} argument(s), got {len(args)}")
        fn(self, ctx, args)
        if isinstance(self.cfg, Config):
            self.cfg.origins[name] = (ctx.path, ctx.line)


_MAX_FILE = 4 << 20


def _read_text(path: str) -> str:
    """Read a config/PEM file; every failure is an OSError with a readable message."""
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_FILE + 1)
    if len(raw) > _MAX_FILE:
        raise OSError(f"larger than {_MAX_FILE >> 20} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OSError(f"not UTF-8 text (byte {exc.start})") from None


# ---- directive handlers -----------------------------------------------------------------------

def _simple_int(name: str, attr: str, lo: int, hi: int) -> None:
    def h(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
        setattr(p.cfg, attr, _int(ctx, a[0], lo, hi))
    _directive(name, 1, 1)(h)


def _flag(name: str, attr: str) -> None:
    def h(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
        setattr(p.cfg, attr, True)
    _directive(name, 0, 0)(h)


def _string(name: str, attr: str, path: bool = False) -> None:
    def h(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
        setattr(p.cfg, attr, p.resolve(a[0]) if path else a[0])
    _directive(name, 1, 1)(h)


for _n, _a, _lo, _hi in [
        ("ping", "ping", 0, 86400 * 365), ("ping-restart", "ping_restart", 0, 86400 * 365),
        ("ping-exit", "ping_exit", 0, 86400 * 365), ("hand-window", "hand_window", 1, 86400),
        ("tran-window", "tran_window", 1, 86400 * 365), ("tls-timeout", "tls_timeout", 1, 3600),
        ("max-clients", "max_clients", 1, 0xFFFFFF), ("status-version", "status_version", 1, 3),
        ("verb", "verb", 0, 11), ("mute", "mute", 0, 1 << 30),
        ("connect-retry-max", "connect_retry_max", 1, 1 << 30),
        ("reneg-bytes", "reneg_bytes", 0, 1 << 62), ("reneg-pkts", "reneg_pkts", 0, 1 << 62),
        ("tun-mtu", "tun_mtu", 576, 65535), ("route-metric", "route_metric", 0, 255),
        ("script-security", "script_security", 0, 3)]:
    _simple_int(_n, _a, _lo, _hi)

for _n, _a in [("client-to-client", "client_to_client"), ("username-as-common-name",
               "username_as_common_name"), ("persist-tun", "persist_tun"),
               ("remote-random", "remote_random"), ("nobind", "nobind"),
               ("disable-dco", "disable_dco"), ("duplicate-cn", "duplicate_cn"),
               ("ccd-exclusive", "ccd_exclusive"), ("float", "float_peer"),
               ("route-nopull", "route_nopull"), ("multihome", "multihome"),
               ("tls-server", "tls_server"), ("tls-client", "tls_client"), ("pull", "pull"),
               ("client", "client"), ("persist-remote-ip", "persist_remote_ip"),
               ("push-peer-info", "push_peer_info")]:
    _flag(_n, _a)

for _n, _a, _p in [("user", "user", False), ("group", "group", False),
                   ("writepid", "writepid", True)]:
    _string(_n, _a, _p)


def _tls_policy(name: str, attr: str, check_name: str) -> None:
    """tls-cipher / tls-ciphersuites / tls-groups / remote-cert-eku: checked by OpenSSL now.

    The TLS layer converts the same strings again when it builds its context;
    checking here makes a typo a config error with file and line instead of a
    failure at the first handshake.
    """
    def h(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
        from bsd_ovpn.proto import tls as _tls    # lazily: OpenSSL only when used
        try:
            getattr(_tls, check_name)(a[0])
        except _tls.TLSConfigError as exc:
            msg = str(exc)
            if msg.startswith(name):
                msg = msg[len(name):].lstrip(": ")
            raise ctx.error(msg) from None
        setattr(p.cfg, attr, a[0])
    _directive(name, 1, 1)(h)


_tls_policy("tls-cipher", "tls_cipher", "openssl_cipher_list")
_tls_policy("tls-ciphersuites", "tls_ciphersuites", "openssl_ciphersuites")
_tls_policy("tls-groups", "tls_groups", "openssl_groups")
_tls_policy("remote-cert-eku", "remote_cert_eku", "check_remote_cert_eku")


@_directive("tls-version-max", 1, 1)
def _d_tls_version_max(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.tls_version_max = _choice(ctx, a[0], ("1.0", "1.1", "1.2", "1.3"), "version")


@_directive("bind", 0, 1)
def _d_bind(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    # plain "bind" is the default (nobind turns it off); only ipv6only changes anything
    if a:
        _choice(ctx, a[0], ("ipv6only",), "argument")
        p.cfg.bind_ipv6only = True


@_directive("log", 1, 1)
def _d_log(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.log = p.resolve(a[0])
    p.cfg.log_append = False


@_directive("log-append", 1, 1)
def _d_log_append(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.log = p.resolve(a[0])
    p.cfg.log_append = True


@_directive("daemon", 0, 1)
def _d_daemon(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.daemon = True


@_directive("cd", 1, 1)
def _d_cd(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    d = p.resolve(a[0])
    if not os.path.isdir(d):
        raise ctx.error(f"{d} is not a directory")
    p.base_dirs[-1] = d


@_directive("ignore-unknown-option", 1, 64)
def _d_ignore_unknown(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.ignore_unknown.update(a)


@_directive("setenv", 1, 2)
def _d_setenv(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.setenv[a[0]] = a[1] if len(a) > 1 else ""


def _port(ctx: _Ctx, v: str) -> int:
    return _int(ctx, v, 1, 65535, "port")


@_directive("port", 1, 1)
def _d_port(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.port = _port(ctx, a[0])
    p.cfg.lport = p.cfg.rport = None


@_directive("lport", 1, 1)
def _d_lport(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.lport = _port(ctx, a[0])


@_directive("rport", 1, 1)
def _d_rport(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.rport = _port(ctx, a[0])


_UDP_PROTOS = ("udp", "udp4", "udp6")
_TCP_PROTOS = ("tcp", "tcp4", "tcp6", "tcp-server", "tcp-client", "tcp4-server",
               "tcp4-client", "tcp6-server", "tcp6-client")


def _proto(ctx: _Ctx, v: str) -> str:
    v = v.lower()
    if v in _TCP_PROTOS:
        raise ctx.error(f"{v!r} is not supported: bsd_ovpn (if_ovpn) only carries UDP; "
                        "use proto udp")
    return _choice(ctx, v, _UDP_PROTOS, "protocol")


@_directive("proto", 1, 1)
def _d_proto(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.proto = _proto(ctx, a[0])


@_directive("local", 1, 1)
def _d_local(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.local = a[0]


@_directive("remote", 1, 3)
def _d_remote(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    port = _port(ctx, a[1]) if len(a) > 1 else 0          # 0: filled in from rport/port
    proto = _proto(ctx, a[2]) if len(a) > 2 else ""
    p.cfg.remotes.append(Remote(a[0], port, proto))


@_directive("resolv-retry", 1, 1)
def _d_resolv_retry(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.resolv_retry = math.inf if a[0] == "infinite" else \
        float(_int(ctx, a[0], 0, 1 << 30, "seconds"))


@_directive("connect-retry", 1, 2)
def _d_connect_retry(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.connect_retry = _int(ctx, a[0], 0, 1 << 20, "seconds")
    if len(a) > 1:
        p.cfg.connect_retry_max_interval = _int(ctx, a[1], 1, 1 << 20, "max seconds")


@_directive("explicit-exit-notify", 0, 1)
def _d_exit_notify(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.explicit_exit_notify = _int(ctx, a[0], 0, 3600, "count") if a else 1


@_directive("dev", 1, 1)
def _d_dev(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if a[0].startswith("tap"):
        raise ctx.error("dev tap is not supported: if_ovpn is a layer-3 (tun) device")
    p.cfg.dev = a[0]


@_directive("dev-type", 1, 1)
def _d_dev_type(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if a[0] == "tap":
        raise ctx.error("dev-type tap is not supported: if_ovpn is a layer-3 (tun) device")
    p.cfg.dev_type = _choice(ctx, a[0], ("tun", "null"), "device type")


@_directive("topology", 1, 1)
def _d_topology(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.topology = _choice(ctx, a[0], ("net30", "p2p", "subnet"), "topology")


@_directive("mode", 1, 1)
def _d_mode(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.mode = _choice(ctx, a[0], ("p2p", "server"), "mode")


@_directive("server", 2, 3)
def _d_server(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    net, mask = _v4(ctx, a[0], "network"), _mask(ctx, a[1])
    if len(a) > 2 and a[2] != "nopool":
        raise ctx.error(f"third argument must be 'nopool', not {a[2]!r}")
    if int(_ipv4(net)) & ~int(_ipv4(mask)) & 0xFFFFFFFF:
        raise ctx.error(f"{net} is not the network address of {net}/{mask}")
    p.cfg.server = (net, mask)
    p.cfg.server_nopool = len(a) > 2


@_directive("server-ipv6", 1, 1)
def _d_server_ipv6(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    net = _v6net(ctx, a[0])
    bits = int(net.split("/")[1])
    if not 64 <= bits <= 124:
        raise ctx.error(f"prefix length /{bits} must be between /64 and /124")
    p.cfg.server_ipv6 = net


@_directive("ifconfig", 2, 2)
def _d_ifconfig(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.ifconfig = (_v4(ctx, a[0], "local address"), _v4(ctx, a[1], "remote/netmask"))


@_directive("ifconfig-ipv6", 2, 2)
def _d_ifconfig_ipv6(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.ifconfig_ipv6 = (_v6net(ctx, a[0], "local address"), _v6(ctx, a[1], "remote"))


@_directive("ifconfig-pool", 2, 3)
def _d_ifconfig_pool(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    start, end = _v4(ctx, a[0], "pool start"), _v4(ctx, a[1], "pool end")
    if int(_ipv4(start)) > int(_ipv4(end)):
        raise ctx.error(f"pool start {start} is after pool end {end}")
    p.cfg.ifconfig_pool = Pool(start, end, _mask(ctx, a[2]) if len(a) > 2 else None)


@_directive("ifconfig-ipv6-pool", 1, 1)
def _d_ifconfig_ipv6_pool(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.ifconfig_ipv6_pool = _v6net(ctx, a[0], "pool")


@_directive("ifconfig-pool-persist", 1, 2)
def _d_pool_persist(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    path = p.resolve(a[0])
    if os.path.isdir(path):
        raise ctx.error(f"{path} is a directory, not a file")
    p.cfg.ifconfig_pool_persist = PoolPersist(
        path, _int(ctx, a[1], 0, 1 << 30, "seconds") if len(a) > 1 else 600)


@_directive("push", 1, 1)
def _d_push(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if "," in a[0]:
        # pushed options are comma-joined in PUSH_REPLY; a comma would split it
        raise ctx.error(f"pushed option {a[0]!r} contains a comma")
    p.cfg.push.append(a[0])


def _route(ctx: _Ctx, a: list[str]) -> Route:
    net = a[0]
    if net not in ("vpn_gateway", "net_gateway", "remote_host"):
        try:
            _ipv4(net)
        except ValueError:
            net = a[0]  # a DNS name: OpenVPN resolves it when routes are added
            if not net or any(c in net for c in "/ "):
                raise ctx.error(f"network {a[0]!r} is not an IPv4 address or host name") \
                    from None
    mask = "255.255.255.255"
    if len(a) > 1 and a[1] != "default":
        mask = _mask(ctx, a[1])
    gw = None
    if len(a) > 2 and a[2] != "default":
        gw = a[2] if a[2] in ("vpn_gateway", "net_gateway", "remote_host") else \
            _v4(ctx, a[2], "gateway")
    metric = _int(ctx, a[3], 0, 0x7FFFFFFF, "metric") if len(a) > 3 and a[3] != "default" \
        else None
    return Route(net, mask, gw, metric)


@_directive("route", 1, 4)
def _d_route(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.routes.append(_route(ctx, a))


@_directive("route-ipv6", 1, 3)
def _d_route_ipv6(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    gw = _v6(ctx, a[1], "gateway") if len(a) > 1 and a[1] != "default" else None
    metric = _int(ctx, a[2], 0, 0x7FFFFFFF, "metric") if len(a) > 2 else None
    p.cfg.routes_ipv6.append(RouteIPv6(_v6net(ctx, a[0]), gw, metric))


@_directive("route-gateway", 1, 1)
def _d_route_gateway(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.route_gateway = a[0] if a[0] == "dhcp" else _v4(ctx, a[0], "gateway")


@_directive("redirect-gateway", 0, 8)
def _d_redirect_gateway(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    for f in a:
        _choice(ctx, f, ("local", "autolocal", "def1", "bypass-dhcp", "bypass-dns",
                         "block-local", "ipv6", "!ipv4"), "flag")
    p.cfg.redirect_gateway = list(a)


@_directive("dhcp-option", 1, 2)
def _d_dhcp_option(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.dhcp_options.append(list(a))


PULL_FILTER_ACTIONS = ("accept", "ignore", "reject")


@_directive("pull-filter", 2, 2)
def _d_pull_filter(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if not a[1]:
        raise ctx.error("empty text would match every pushed option")
    p.cfg.pull_filters.append((_choice(ctx, a[0], PULL_FILTER_ACTIONS, "action"), a[1]))


def pull_filter_action(filters: list[tuple[str, str]], option: str) -> str:
    """What ``pull-filter`` lines say about one pushed option: accept, ignore or reject.

    OpenVPN's rule: the option text (leading white space skipped) is compared
    with each filter's text as a prefix, in config order; the first match
    decides; no match accepts.  ``reject`` means the client must drop the
    connection and reconnect ("offending option received from server").
    """
    text = option.lstrip(" \t\n\v\f\r")
    for action, prefix in filters:
        if text.startswith(prefix):
            return action
    return "accept"


@_directive("client-config-dir", 1, 1)
def _d_ccd(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.client_config_dir = p.resolve(a[0])


@_directive("keepalive", 2, 2)
def _d_keepalive(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    i = _int(ctx, a[0], 1, 86400, "ping interval")
    t = _int(ctx, a[1], 1, 86400 * 7, "restart timeout")
    if i * 2 > t:
        raise ctx.error(f"the restart timeout ({t}) must be at least twice the ping "
                        f"interval ({i}); 'keepalive 10 60' is recommended")
    p.cfg.keepalive = (i, t)


@_directive("reneg-sec", 1, 2)
def _d_reneg_sec(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.reneg_sec = _int(ctx, a[0], 0, 1 << 30, "seconds")
    p.cfg.reneg_sec_max = _int(ctx, a[1], 0, 1 << 30, "max seconds") if len(a) > 1 else None


@_directive("replay-window", 1, 2)
def _d_replay_window(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    window = _int(ctx, a[0], 1, 65536, "window")
    seconds = _int(ctx, a[1], 1, 3600, "seconds") if len(a) > 1 else 15
    if window != REPLAY_WINDOW:
        # the data channel (if_ovpn or the engine) has one fixed window; a smaller one
        # asked for here would silently be more lenient, a larger one stricter
        raise ctx.error(f"not supported: the data channel's replay window is fixed at "
                        f"{REPLAY_WINDOW} packets (if_ovpn); use 'replay-window "
                        f"{REPLAY_WINDOW}' or remove it")
    p.cfg.replay_window = (window, seconds)


@_directive("mssfix", 0, 2)
def _d_mssfix(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    size = _int(ctx, a[0], 0, 65535, "size") if a else 1492
    if len(a) > 1:
        _choice(ctx, a[1], ("mtu", "fixed"), "second argument")
    if size != 0:
        raise ctx.error("not supported: the data channel (if_ovpn or the engine) does not "
                        "clamp TCP MSS; lower tun-mtu, or clamp in the firewall (pf "
                        "'scrub max-mss', iptables TCPMSS); 'mssfix 0' is accepted")
    p.cfg.mssfix = size


def _cipher_name(ctx: _Ctx, v: str) -> str | None:
    """Canonical name of a data cipher we implement; None for '?'-prefixed unknown ones."""
    optional = v.startswith("?")
    name = v[1:] if optional else v
    up = name.upper()
    for c in DATA_CIPHERS:
        if c.upper() == up:
            return c
    if optional:
        log.warning("%s:%d: skipping unsupported optional cipher %s", ctx.path, ctx.line, name)
        return None
    raise ctx.error(f"cipher {name!r} is not supported by the data channel "
                    f"(supported: {':'.join(DATA_CIPHERS)})")


@_directive("data-ciphers", 1, 1)
def _d_data_ciphers(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    names = [n for n in (_cipher_name(ctx, c) for c in a[0].split(":") if c) if n]
    if not names:
        raise ctx.error("no usable cipher in the list")
    p.cfg.data_ciphers = list(dict.fromkeys(names))
    p.explicit_data_ciphers = True


_HANDLERS["ncp-ciphers"] = _HANDLERS["data-ciphers"]


@_directive("data-ciphers-fallback", 1, 1)
def _d_fallback(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.data_ciphers_fallback = _cipher_name(ctx, a[0])


@_directive("cipher", 1, 1)
def _d_cipher(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    # 2.6 only uses --cipher as a fallback for pre-NCP peers; a CBC cipher here is legal
    # in OpenVPN but we cannot run it, so it is recorded and never negotiated.
    up = a[0].upper()
    p.cfg.cipher = next((c for c in DATA_CIPHERS if c.upper() == up), a[0])
    if p.cfg.cipher not in DATA_CIPHERS:
        log.warning("%s:%d: cipher %s is not supported by the data channel; it will not be "
                    "used (peers negotiate from data-ciphers)", ctx.path, ctx.line, a[0])


@_directive("auth", 1, 1)
def _d_auth(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    name = a[0]
    if name.lower() != "none":
        norm = name.lower().replace("-", "_")
        norm = norm[4:] if norm.startswith("rsa_") else norm
        try:
            hashlib.new(norm)
        except ValueError:
            raise ctx.error(f"unknown digest {name!r}") from None
    p.cfg.auth = name


@_directive("allow-compression", 1, 1)
def _d_allow_compression(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    v = _choice(ctx, a[0], ("no", "asym", "yes"), "value")
    if v != "no":
        raise ctx.error("compression is not supported (if_ovpn/DCO refuses it); use 'no'")
    p.cfg.allow_compression = v


@_directive("key-direction", 1, 1)
def _d_key_direction(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.key_direction = int(_choice(ctx, a[0], ("0", "1"), "key direction"))


def _static_key(p: _Parser, ctx: _Ctx, arg: str) -> tuple[StaticKey, str | None]:
    text, src = p.key_text(ctx, arg)
    try:
        return StaticKey.parse(text, src), src
    except KeyFileError as exc:
        raise ctx.error(str(exc)) from None


@_directive("tls-auth", 1, 2)
def _d_tls_auth(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    key, src = _static_key(p, ctx, a[0])
    direction = int(_choice(ctx, a[1], ("0", "1"), "key direction")) if len(a) > 1 else None
    p.tls_auth_raw = (ctx, key, direction, src)


@_directive("tls-crypt", 1, 1)
def _d_tls_crypt(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    key, src = _static_key(p, ctx, a[0])
    p.cfg.tls_crypt = TLSWrapSettings("tls-crypt", key, None, src)


@_directive("tls-crypt-v2", 1, 2)
def _d_tls_crypt_v2(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    text, src = p.key_text(ctx, a[0])
    try:
        key = parse_tls_crypt_v2_key(text, src)
    except KeyFileError as exc:
        raise ctx.error(str(exc)) from None
    force = False
    if len(a) > 1:
        force = _choice(ctx, a[1], ("force-cookie", "allow-noncookie"), "mode") == "force-cookie"
    p.cfg.tls_crypt_v2 = TLSCryptV2Settings(key, force, src)


def _pem(name: str, attr: str, secret: bool = False) -> None:
    def h(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
        m = p.material(ctx, a[0], secret=secret)
        if "-----BEGIN" not in m.text:
            raise ctx.error(f"{m.path or '[inline]'} holds no PEM block")
        setattr(p.cfg, attr, m)
    _directive(name, 1, 1)(h)


_pem("ca", "ca")
_pem("cert", "cert")
_pem("key", "key", secret=True)
_pem("extra-certs", "extra_certs")


@_directive("dh", 1, 1)
def _d_dh(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if not ctx.inline and a[0] == "none":
        p.cfg.dh = None
        return
    m = p.material(ctx, a[0])
    if "-----BEGIN DH PARAMETERS-----" not in m.text:
        raise ctx.error(f"{m.path or '[inline]'} holds no DH PARAMETERS block")
    p.cfg.dh = m


@_directive("crl-verify", 1, 2)
def _d_crl_verify(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if len(a) > 1:
        raise ctx.error("the 'dir' form is not supported; give a CRL file")
    m = p.material(ctx, a[0])
    if "-----BEGIN X509 CRL-----" not in m.text:
        raise ctx.error(f"{m.path or '[inline]'} holds no X509 CRL block")
    p.cfg.crl_verify = m


@_directive("remote-cert-tls", 1, 1)
def _d_remote_cert_tls(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.remote_cert_tls = _choice(ctx, a[0], ("server", "client"), "value")


@_directive("verify-x509-name", 1, 2)
def _d_verify_x509_name(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    typ = _choice(ctx, a[1], ("subject", "name", "name-prefix"), "type") if len(a) > 1 \
        else "subject"
    p.cfg.verify_x509_name = VerifyX509Name(a[0], typ)


@_directive("verify-client-cert", 1, 1)
def _d_verify_client_cert(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.verify_client_cert = _choice(ctx, a[0], ("none", "optional", "require"), "value")


@_directive("tls-version-min", 1, 2)
def _d_tls_version_min(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.tls_version_min = _choice(ctx, a[0], ("1.0", "1.1", "1.2", "1.3"), "version")
    if len(a) > 1:
        _choice(ctx, a[1], ("or-highest",), "second argument")
        p.cfg.tls_version_min_or_highest = True


@_directive("auth-user-pass", 0, 1)
def _d_auth_user_pass(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    if not a:
        p.cfg.auth_user_pass = AuthUserPass()
        return
    if ctx.inline:
        text, path = a[0], None
    else:
        path = p.resolve(a[0])
        try:
            text = read_key_text(path)
        except KeyFileError as exc:
            raise ctx.error(str(exc)) from None
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    user = lines[0] if lines else ""
    if not user:
        raise ctx.error(f"{path or '[inline]'}: first line (username) is empty")
    password = lines[1] if len(lines) > 1 and lines[1] != "" else None
    p.cfg.auth_user_pass = AuthUserPass(user, password, path)


@_directive("auth-user-pass-verify", 2, 2)
def _d_auth_user_pass_verify(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.auth_user_pass_verify = AuthUserPassVerify(
        a[0], _choice(ctx, a[1], ("via-env", "via-file"), "method"))


@_directive("auth-retry", 1, 1)
def _d_auth_retry(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.auth_retry = _choice(ctx, a[0], ("none", "nointeract", "interact"), "value")


@_directive("status", 1, 2)
def _d_status(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.status = StatusFile(p.resolve(a[0]),
                              _int(ctx, a[1], 1, 86400, "seconds") if len(a) > 1 else 60)


# --- client-config-dir files --------------------------------------------------------------------

_CCD_HANDLERS: dict[str, tuple[int, int, _Handler]] = {}


def _ccd(name: str, nmin: int, nmax: int) -> Callable[[_Handler], _Handler]:
    def deco(fn: _Handler) -> _Handler:
        _CCD_HANDLERS[name] = (nmin, nmax, fn)
        return fn
    return deco


@_ccd("iroute", 1, 2)
def _c_iroute(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    net = _v4(ctx, a[0], "network")
    mask = _mask(ctx, a[1]) if len(a) > 1 else "255.255.255.255"
    if int(_ipv4(net)) & ~int(_ipv4(mask)) & 0xFFFFFFFF:
        raise ctx.error(f"{net} has host bits set for netmask {mask}")
    p.cfg.iroutes.append(IRoute(net, mask))


@_ccd("iroute-ipv6", 1, 1)
def _c_iroute_ipv6(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.iroutes_ipv6.append(IRoute(_v6net(ctx, a[0])))


@_ccd("ifconfig-push", 2, 3)
def _c_ifconfig_push(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.ifconfig_push = (_v4(ctx, a[0], "local"), _v4(ctx, a[1], "remote/netmask"))


@_ccd("ifconfig-ipv6-push", 1, 2)
def _c_ifconfig_ipv6_push(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.ifconfig_ipv6_push = (_v6net(ctx, a[0]), _v6(ctx, a[1]) if len(a) > 1 else None)


@_ccd("push", 1, 1)
def _c_push(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    _d_push(p, ctx, a)


@_ccd("push-reset", 0, 0)
def _c_push_reset(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.push_reset = True


@_ccd("push-remove", 1, 1)
def _c_push_remove(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.push_remove.append(a[0])


@_ccd("disable", 0, 0)
def _c_disable(p: _Parser, ctx: _Ctx, a: list[str]) -> None:
    p.cfg.disable = True


# --- post-processing (helper directives, cross checks) ---------------------------------------

class _Post:
    def __init__(self, p: _Parser) -> None:
        self.p = p
        self.cfg: Config = p.cfg  # type: ignore[assignment]

    def error(self, directive: str, msg: str) -> ConfigError:
        path, line = self.cfg.origins.get(directive, (self.cfg.path, None))
        return ConfigError(f"{directive}: {msg}", path, line, directive)

    def error_first(self, candidates: tuple[str, ...], msg: str) -> ConfigError:
        """Blame the first of ``candidates`` that actually appears in the file."""
        for d in candidates:
            if d in self.cfg.origins:
                return self.error(d, msg)
        return self.error(candidates[0], msg)

    def run(self) -> None:
        c = self.cfg
        self.tls_auth()
        self.device()
        if c.client and c.server:
            raise self.error("server", "--server and --client cannot be used together")
        if c.client and c.server_ipv6:
            raise self.error("server-ipv6", "--server-ipv6 and --client cannot be used together")
        if c.client and c.mode == "server":
            raise self.error("mode", "mode server and client cannot be used together")
        self.server_ipv6()
        self.server()
        if c.client:
            c.pull = True
            c.tls_client = True
        self.keepalive()
        self.roles()
        self.remotes()
        self.wrapping()
        self.pki()
        if c.cipher in DATA_CIPHERS and c.cipher not in c.data_ciphers \
                and not self.p.explicit_data_ciphers:
            c.data_ciphers.append(c.cipher)
        self.tls_versions()
        self.client_server_only()
        self.not_yet_supported()

    def tls_versions(self) -> None:
        """tls-version-min/max: a range with at least one version bsd_ovpn speaks (1.2, 1.3).

        ``tls-version-min 1.0`` / ``1.1`` are honoured as 1.2 (we never speak
        less), which only refuses peers OpenVPN 2.6 would refuse by default too.
        """
        c = self.cfg
        if c.tls_version_max is None:
            return
        if c.tls_version_max in ("1.0", "1.1"):
            raise self.error("tls-version-max", f"{c.tls_version_max} is below TLS 1.2, the "
                             "oldest version bsd_ovpn speaks")
        # ("or-highest" only lowers min to what the TLS library can do: 1.3 here, so
        # it never resolves a min above max)
        lo = c.tls_version_min or "1.2"
        if float(c.tls_version_max) < float(lo):
            raise self.error_first(("tls-version-max", "tls-version-min"),
                                   f"tls-version-max {c.tls_version_max} is below "
                                   f"tls-version-min {lo}: no TLS version is left")

    def client_server_only(self) -> None:
        c = self.cfg
        for d, active in (("username-as-common-name", c.username_as_common_name),
                          ("ifconfig-pool-persist", c.ifconfig_pool_persist is not None)):
            if active and c.mode != "server":
                raise self.error(d, "only valid in a server (mode server)")
        for d, active in (("pull-filter", bool(c.pull_filters)),
                          ("persist-remote-ip", c.persist_remote_ip)):
            if active and not c.tls_client:
                raise self.error(d, "only valid on a client")
        if c.pull_filters and not c.pull:
            raise self.error("pull-filter", "needs pull (or client): there is nothing pushed "
                             "to filter")
        uv = sorted(k for k in c.setenv if k.startswith("UV_"))
        if c.push_peer_info and uv:
            raise self.error("push-peer-info", f"sending setenv UV_ variables ({', '.join(uv)}) "
                             "in peer-info is not supported; remove push-peer-info or them")

    def not_yet_supported(self) -> None:
        c = self.cfg
        active = {
            "username-as-common-name": c.username_as_common_name,
            "ifconfig-pool-persist": c.ifconfig_pool_persist is not None,
            "reneg-bytes": c.reneg_bytes > 0,
            "reneg-pkts": c.reneg_pkts > 0,
            "ping-exit": c.ping_exit > 0,
            "pull-filter": bool(c.pull_filters),
            "persist-remote-ip": c.persist_remote_ip,
            "bind": c.bind_ipv6only,
            "route-metric": c.route_metric is not None,
        }
        for d, reason in NOT_YET_SUPPORTED.items():
            if active.get(d, d in c.origins):
                raise self.error(d, f"not supported yet by ovpnctl: {reason}")

    def tls_auth(self) -> None:
        raw = self.p.tls_auth_raw
        if raw is None:
            return
        ctx, key, direction, src = raw
        if direction is None:
            direction = self.cfg.key_direction
        if self.cfg.auth.lower() == "none":
            raise ctx.error("tls-auth needs an HMAC digest but 'auth none' is set")
        self.cfg.tls_auth = TLSWrapSettings("tls-auth", key, direction, src)

    def device(self) -> None:
        c = self.cfg
        if c.dev is None:
            raise ConfigError("dev: missing; add 'dev tun'", c.path, None, "dev")
        if c.dev_type is None:
            if c.dev.startswith(("tun", "ovpn")):
                c.dev_type = "tun"
            elif c.dev == "null":
                c.dev_type = "null"
            else:
                raise self.error("dev", f"cannot tell the type of device {c.dev!r}; add "
                                 "'dev-type tun'")

    def server(self) -> None:
        c = self.cfg
        if c.server is None:
            return
        if c.dev_type != "tun":
            raise self.error("server", "--server needs dev tun")
        net_s, mask_s = c.server
        net, mask = int(_ipv4(net_s)), int(_ipv4(mask_s))
        bits = _netbits(mask_s)
        if bits < 16:
            raise self.error("server", "netmask allows too many hosts (must be /16 or longer)")
        if bits > 29:
            raise self.error("server", "with dev tun the subnet must be /29 or larger")
        if not c.server_nopool and c.ifconfig_pool is not None:
            raise self.error("ifconfig-pool", "--server already defines an ifconfig-pool")
        ip = lambda n: str(ipaddress.IPv4Address(n & 0xFFFFFFFF))  # noqa: E731
        bcast = net | (~mask & 0xFFFFFFFF)
        c.mode = "server"
        c.tls_server = True
        pushes: list[str] = []
        if c.topology in ("net30", "p2p"):
            c.ifconfig = (ip(net + 1), ip(net + 2))
            if not c.server_nopool:
                c.ifconfig_pool = Pool(ip(net + 4), ip(bcast - (0 if bits == 29 else 4)))
            c.routes.append(Route(net_s, mask_s))
            if c.client_to_client:
                pushes.append(f"route {net_s} {mask_s}")
            elif c.topology == "net30":
                pushes.append(f"route {ip(net + 1)}")
        else:  # subnet
            c.ifconfig = (ip(net + 1), mask_s)
            if not c.server_nopool:
                c.ifconfig_pool = Pool(ip(net + 2), ip(bcast - 1), mask_s)
            pushes.append(f"route-gateway {ip(net + 1)}")
            if c.route_gateway is None:
                c.route_gateway = ip(net + 2)
            c.push_ifconfig_constraint = (net_s, mask_s)
        pushes.append(f"topology {c.topology}")
        c.push.extend(pushes)

    def server_ipv6(self) -> None:
        c = self.cfg
        if c.server_ipv6 is None:
            return
        if c.server_nopool:
            raise self.error("server-ipv6", "--server-ipv6 is incompatible with 'nopool'")
        if c.ifconfig_ipv6_pool is not None:
            raise self.error("ifconfig-ipv6-pool", "--server-ipv6 already defines an "
                             "ifconfig-ipv6-pool")
        addr, bits_s = c.server_ipv6.split("/")
        base, bits = int(ipaddress.IPv6Address(addr)), int(bits_s)
        ip6 = lambda n: str(ipaddress.IPv6Address(n))  # noqa: E731
        c.mode = "server"
        c.tls_server = True
        c.ifconfig_ipv6 = (f"{ip6(base + 1)}/{bits}", ip6(base + 2))
        c.ifconfig_ipv6_pool = f"{ip6(base + (0x1000 if bits < 112 else 2))}/{bits}"
        c.push.append("tun-ipv6")

    def keepalive(self) -> None:
        c = self.cfg
        if c.keepalive is None:
            return
        if c.ping or c.ping_restart or c.ping_exit:
            which = next(d for d in ("ping", "ping-restart", "ping-exit") if d in c.origins)
            raise self.error(which, "--keepalive conflicts with --ping, --ping-exit and "
                             "--ping-restart; keepalive alone is enough")
        i, t = c.keepalive
        c.ping = i
        if c.mode == "server":
            c.ping_restart = 2 * t
            c.push.extend([f"ping {i}", f"ping-restart {t}"])
        else:
            c.ping_restart = t

    def roles(self) -> None:
        c = self.cfg
        if c.tls_server and c.tls_client:
            raise self.error_first(("tls-server", "server", "server-ipv6", "mode"),
                                   "tls-server and tls-client cannot both be set")
        if not (c.tls_server or c.tls_client):
            raise ConfigError("neither a server (server / tls-server) nor a client (client / "
                              "tls-client): static-key mode is not supported", c.path, None,
                              "tls-client")
        if c.mode == "server" and not c.tls_server:
            raise self.error("mode", "mode server needs tls-server")
        if c.pull and not c.tls_client:
            raise self.error_first(("pull", "client"), "pull needs tls-client")
        if c.push and not c.tls_server:
            raise self.error("push", "push is only valid on a TLS server")
        for d, val in (("client-config-dir", c.client_config_dir),
                       ("max-clients", c.max_clients), ("ifconfig-pool", c.ifconfig_pool),
                       ("auth-user-pass-verify", c.auth_user_pass_verify)):
            if val is not None and c.mode != "server":
                raise self.error(d, "only valid in a server (mode server)")
        if c.client_to_client and c.mode != "server":
            raise self.error("client-to-client", "only valid in a server (mode server)")
        if c.auth_user_pass is not None and not c.tls_client:
            raise self.error("auth-user-pass", "only valid on a client")
        if c.tls_client and not c.remotes and not c.mode == "server":
            if c.pull:
                raise ConfigError("remote: a client needs at least one 'remote'", c.path, None,
                                  "remote")

    def remotes(self) -> None:
        c = self.cfg
        rport = c.rport or c.port
        c.remotes = [Remote(r.host, r.port or rport, r.proto or c.proto) for r in c.remotes]

    def wrapping(self) -> None:
        c = self.cfg
        if c.tls_auth is not None and c.tls_crypt is not None:
            raise self.error("tls-crypt", "tls-auth and tls-crypt are mutually exclusive")
        v2 = c.tls_crypt_v2
        if v2 is None:
            return
        if c.tls_server and not isinstance(v2.key, TLSCryptV2ServerKey):
            raise self.error("tls-crypt-v2", "a server needs the tls-crypt-v2 *server* key")
        if c.tls_client:
            if not isinstance(v2.key, TLSCryptV2ClientKey):
                raise self.error("tls-crypt-v2", "a client needs a tls-crypt-v2 *client* key")
            if c.tls_auth is not None or c.tls_crypt is not None:
                raise self.error("tls-crypt-v2", "--tls-crypt-v2, --tls-auth and --tls-crypt "
                                 "are mutually exclusive in client mode")
            if v2.force_cookie:
                raise self.error("tls-crypt-v2", "force-cookie is a server option")

    def pki(self) -> None:
        c = self.cfg
        if c.ca is None:
            raise ConfigError("ca: missing; a CA certificate is required", c.path, None, "ca")
        if (c.cert is None) != (c.key is None):
            which = "key" if c.key is None else "cert"
            raise ConfigError(f"{which}: cert and key must be given together", c.path,
                              c.origins.get("cert" if which == "key" else "key",
                                            (None, None))[1], which)
        if c.tls_server and c.cert is None:
            raise ConfigError("cert: a server needs cert and key", c.path, None, "cert")
        if c.tls_client and c.cert is None and c.auth_user_pass is None:
            raise ConfigError("cert: a client needs cert/key or auth-user-pass", c.path, None,
                              "cert")


# --- public entry points -------------------------------------------------------------------------

def loads(text: str, path: str = "<string>") -> Config:
    """Parse config text; ``path`` names it in errors and anchors relative paths."""
    cfg = Config(path=path)
    parser = _Parser(cfg)
    parser.run(text, path)
    _Post(parser).run()
    return cfg


def load(path: str | os.PathLike[str]) -> Config:
    path = os.fspath(path)
    try:
        text = _read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", path) from None
    return loads(text, path)


def loads_ccd(text: str, path: str = "<string>") -> CCDConfig:
    """Parse a client-config-dir file (iroute, ifconfig-push, push, push-reset, …)."""
    cfg = CCDConfig(path=path)
    _Parser(cfg, ccd=True).run(text, path)
    return cfg


def load_ccd(path: str | os.PathLike[str]) -> CCDConfig:
    path = os.fspath(path)
    try:
        text = _read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read client-config-dir file: {exc.strerror or exc}",
                          path) from None
    return loads_ccd(text, path)
