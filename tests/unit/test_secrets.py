"""Secrets stay secret: key file permissions, no key material in logs, root-only sockets.

Why: a VPN daemon's log is read by more people (and shipped to more places)
than its key files.  OpenVPN warns about group/world-readable key files,
keeps data-channel keys out of every log level below its explicit key dump,
and redacts auth tokens in logged control messages; bsd_ovpn must do the
same, and its control sockets (engine, daemons) are its privilege boundary.

The log checks run real handshakes (client Session <-> ServerEndpoint, in
memory, with renegotiation, junk packets and a password) and real engine
commands (EngineDaemon over its UNIX socket, typed Interface API) with the
root logger at DEBUG and a capturing handler, then search everything logged
-- messages and tracebacks -- for every secret of the run in raw, hex (both
cases) and base64 form.
"""
from __future__ import annotations

import base64
import io
import errno as E
import ipaddress
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Iterator

import pytest

from bsd_ovpn import config as configmod
from bsd_ovpn import logutil, nv
from bsd_ovpn.engine.commands import Engine
from bsd_ovpn.engine.daemon import EngineDaemon
from bsd_ovpn.engine.transport import EngineTransport
from bsd_ovpn.errors import OvpnError
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.interface import Interface, KeyMaterial
from bsd_ovpn.proto import events as ev
from bsd_ovpn.proto.cookie import CookieJar
from bsd_ovpn.proto.keyfile import StaticKey
from bsd_ovpn.proto.server import ServerEndpoint, ServerSettings
from bsd_ovpn.proto.session import Session, SessionSettings
from bsd_ovpn.proto.tls import TLSConfig
from bsd_ovpn.proto.wrap import TLSAuth, TLSCrypt
from bsd_ovpn.testbed.pki import PKI
from tests.unit.conftest import PairHost

CLIENT = ("192.0.2.2", 40000)
PASSWORD = "correct horse battery staple 7f3a"


# --------------------------------------------------------------------------- helpers

class Capture(logging.Handler):
    """Everything logged anywhere, formatted, including exception text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def capture() -> Iterator[Capture]:
    root = logging.getLogger()
    h = Capture()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.DEBUG)
    # some modules may set their own logger levels: force DEBUG on ours
    touched = []
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("bsd_ovpn"):
            lg = logging.getLogger(name)
            touched.append((lg, lg.level, lg.disabled))
            lg.setLevel(logging.DEBUG)
            lg.disabled = False
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(old)
        for lg, level, disabled in touched:
            lg.setLevel(level)
            lg.disabled = disabled


def forms(secret: bytes) -> list[str]:
    """How a secret could show up in text: hex (both cases), base64, raw (latin-1, repr)."""
    out = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode(),
           secret.decode("latin-1"), repr(secret)[2:-1]]
    # a hex dump with separators ("de:ad:be:ef" / "de ad be ef")
    out += [":".join(f"{b:02x}" for b in secret), " ".join(f"{b:02x}" for b in secret)]
    return out


def assert_no_secrets(text: str, secrets: dict[str, bytes]) -> None:
    for what, secret in secrets.items():
        assert len(secret) >= 8, what
        for form in forms(secret):
            assert form not in text, f"{what} appears in the log ({form[:16]}...)"
        # even a 12-hex-digit fragment (6 bytes) of a key is too much
        h = secret.hex()
        for i in range(0, len(h) - 12, 6):
            assert h[i:i + 12] not in text.lower(), f"part of {what} appears in the log"


# --------------------------------------------------------------------------- key files

def _server_conf(tmp: Path, key_mode: int, pki: PKI, wrap_mode: int) -> Path:
    srv = pki.server()
    key = tmp / "server.key"
    key.write_bytes(srv.key_path.read_bytes())
    os.chmod(key, key_mode)
    ta = tmp / "tc.key"
    StaticKey.generate().save(ta)
    os.chmod(ta, wrap_mode)
    conf = tmp / "server.conf"
    conf.write_text(f"dev tun\nserver 198.51.100.0 255.255.255.0\nca {pki.ca_path}\n"
                    f"cert {srv.cert_path}\nkey {key}\ntls-crypt {ta}\n")
    return conf


@pytest.mark.parametrize("key_mode,wrap_mode,warned", [
    (0o600, 0o600, set()),
    (0o400, 0o400, set()),
    (0o640, 0o600, {"server.key"}),
    (0o600, 0o604, {"tc.key"}),
    (0o644, 0o666, {"server.key", "tc.key"}),
])
def test_key_files_group_or_world_readable_warn(tmp_path: Path, pki: PKI, capture: Capture,
                                                key_mode: int, wrap_mode: int,
                                                warned: set[str]) -> None:
    conf = _server_conf(tmp_path, key_mode, pki, wrap_mode)
    cfg = configmod.load(conf)
    assert cfg is not None
    warnings = [ln for ln in capture.lines if "WARNING" in ln and "accessible" in ln]
    got = {name for name in ("server.key", "tc.key") if any(name in w for w in warnings)}
    assert got == warned, capture.lines
    for w in warnings:
        assert "chmod 600" in w and "mode" in w
    # the warning names the file, never its contents
    key_pem = (tmp_path / "server.key").read_text()
    body = "".join(key_pem.splitlines()[1:-1])
    assert body[:24] not in capture.text
    assert StaticKey.load(tmp_path / "tc.key").data.hex()[:24] not in capture.text


def test_auth_user_pass_file_permissions_warn(tmp_path: Path, pki: PKI,
                                              capture: Capture) -> None:
    creds = tmp_path / "up.txt"
    creds.write_text(f"alice\n{PASSWORD}\n")
    os.chmod(creds, 0o644)
    cli = pki.client()
    conf = tmp_path / "client.conf"
    conf.write_text(f"client\ndev tun\nremote 192.0.2.1\nca {pki.ca_path}\n"
                    f"cert {cli.cert_path}\nkey {cli.key_path}\nauth-user-pass {creds}\n")
    os.chmod(cli.key_path, 0o600)
    configmod.load(conf)
    assert any("up.txt" in ln and "accessible" in ln for ln in capture.lines), capture.lines
    assert PASSWORD not in capture.text


# --------------------------------------------------------------------------- handshakes

@pytest.fixture(scope="module")
def tls(pki: PKI) -> tuple[TLSConfig, TLSConfig, bytes]:
    srv, cli = pki.server(), pki.client()
    return (TLSConfig(ca=pki.ca_pem, cert=srv.cert_pem, key=srv.key_pem,
                      remote_cert_tls="client"),
            TLSConfig(ca=pki.ca_pem, cert=cli.cert_pem, key=cli.key_pem,
                      remote_cert_tls="server"),
            srv.key_pem if isinstance(srv.key_pem, bytes) else srv.key_pem.encode())


class Pair:
    """A client Session and a ServerEndpoint joined by lists, with a fake clock."""

    def __init__(self, tls: tuple[TLSConfig, TLSConfig, bytes], wrap: str) -> None:
        self.now = 1000.0
        self.key = StaticKey.generate()
        self.cookie_secret = os.urandom(32)
        if wrap == "tls-auth":
            factory = lambda: TLSAuth(self.key, 0, "SHA256")          # noqa: E731
            cwrap = TLSAuth(self.key, 1, "SHA256")
        else:
            factory = lambda: TLSCrypt(self.key, server=True)         # noqa: E731
            cwrap = TLSCrypt(self.key, server=False)
        self.verified: list[ev.AuthRequest] = []

        def verify(req: ev.AuthRequest) -> object:
            self.verified.append(req)
            return req.password == PASSWORD

        sset = SessionSettings(server=True, tls=tls[0],
                               push_options=("ping 10",), auth_verify=verify)
        self.ep = ServerEndpoint(ServerSettings(sset, pool=ipaddress.ip_network(
            "198.51.100.0/24")), wrap_factory=factory,
            cookie_jar=CookieJar(self.cookie_secret, 60))
        cset = SessionSettings(server=False, tls=tls[1],
                               username="alice", password=PASSWORD)
        self.client = Session.connect(cset, cwrap, self.now)
        self.c_events: list[ev.Event] = []
        self.s_events: list[ev.Event] = []

    def step(self) -> int:
        moved = 0
        for d in self.client.datagrams_to_send(self.now):
            self.ep.receive_datagram(d, CLIENT, self.now)
            moved += 1
        for d, addr in self.ep.datagrams_to_send(self.now):
            self.client.receive_datagram(d, self.now)
            moved += 1
        while (e := self.client.next_event()) is not None:
            self.c_events.append(e)
        while (ce := self.ep.next_event()) is not None:
            self.s_events.append(ce.event)
        return moved

    def run(self, until, limit: float = 120.0) -> None:
        end = self.now + limit
        while not until():
            if self.step():
                continue
            timers = [t for t in (self.client.get_timer(), self.ep.get_timer()) if t is not None]
            assert timers and self.now < end, "stuck"
            self.now = max(self.now, min(timers))
            self.client.handle_timer(self.now)
            self.ep.handle_timer(self.now)

    def keys(self, events: list[ev.Event]) -> list[ev.KeysReady]:
        return [e for e in events if isinstance(e, ev.KeysReady)]


@pytest.mark.parametrize("wrap", ["tls-auth", "tls-crypt"])
def test_handshake_and_rekey_log_no_key_material(tls, capture: Capture, wrap: str) -> None:
    p = Pair(tls, wrap)
    p.run(lambda: p.keys(p.c_events) and p.keys(p.s_events))
    # renegotiate once (the ROTATE_KEY reaction), then feed junk of every kind
    p.client.renegotiate(p.now)
    p.run(lambda: len(p.keys(p.c_events)) >= 2 and len(p.keys(p.s_events)) >= 2)
    for junk in (b"\x38" + os.urandom(60), b"\x20" + os.urandom(100), os.urandom(3),
                 b"\x38" + bytes(8) + os.urandom(40)):
        p.ep.receive_datagram(junk, ("192.0.2.99", 5555), p.now)
        p.ep.receive_datagram(junk, CLIENT, p.now)
        p.client.receive_datagram(junk, p.now)
    p.step()
    assert p.verified and p.verified[0].password == PASSWORD
    secrets: dict[str, bytes] = {
        "static key (tls-auth/tls-crypt)": p.key.data,
        "cookie secret": p.cookie_secret,
        "password": PASSWORD.encode(),
    }
    for side, events in (("client", p.c_events), ("server", p.s_events)):
        for k in p.keys(events):
            secrets[f"{side} key_id {k.key_id} encrypt key"] = k.keys.encrypt_key
            secrets[f"{side} key_id {k.key_id} decrypt key"] = k.keys.decrypt_key
            # 8-byte implicit IVs: searched as hex only (raw 8 bytes are too short to be unique)
            secrets[f"{side} key_id {k.key_id} encrypt iv"] = k.keys.encrypt_iv
    key_pem = tls[2].decode()
    assert capture.lines, "nothing was logged at DEBUG: the capture is not working"
    assert_no_secrets(capture.text, secrets)
    assert "".join(key_pem.splitlines()[1:-1])[:32] not in capture.text
    # defence in depth: what a careless log.debug("%s", event) would print
    for e in p.c_events + p.s_events:
        assert_no_secrets(repr(e) + str(e), secrets)
    assert PASSWORD not in repr(p.verified[0])


# --------------------------------------------------------------------------- the engine

@pytest.fixture
def engine_daemon(tmp_path: Path) -> Iterator[EngineDaemon]:
    host = PairHost()
    d = EngineDaemon(str(tmp_path / "e.sock"), engine=Engine(host))
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    try:
        yield d
    finally:
        d.stop()
        t.join(5)
        host.close()


def test_engine_commands_log_no_key_material(engine_daemon: EngineDaemon,
                                             capture: Capture) -> None:
    enc, dec = KeyMaterial(os.urandom(32), os.urandom(8)), KeyMaterial(os.urandom(32),
                                                                       os.urandom(8))
    enc2 = KeyMaterial(os.urandom(16), os.urandom(8))
    bad_key = os.urandom(40)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    tr = EngineTransport(engine_daemon.path)
    errors: list[str] = []
    try:
        ifc = Interface.create("ovpn", transport=tr)
        ifc.new_peer(1, sock, ("127.0.0.1", 1194))
        ifc.new_key(1, 0, 0, "AES-256-GCM", enc, dec)
        ifc.new_key(1, 1, 1, "AES-128-GCM", enc2, enc2)
        ifc.swap_keys(1)
        ifc.start_vpn()
        ifc.stats()
        ifc.peer_stats()
        ifc.notifications()
        # error paths: the typed API's own check, then the engine's (raw nvlist)
        for call in (lambda: ifc.new_key(1, 0, 0, "AES-256-GCM", KeyMaterial(bad_key, enc.iv),
                                         dec),
                     lambda: ifc.new_key(9, 0, 0, "AES-256-GCM", enc, dec)):
            with pytest.raises(OvpnError) as exc:
                call()
            errors.append(str(exc.value) + repr(exc.value))
        req = nv.NVList()
        req.add("slot", 0)
        req.add("keyid", 0)
        req.add("peerid", 1)
        req.add("encrypt", nv.NVList([("cipher", "AES-256-GCM"), ("key", bad_key),
                                      ("iv", enc.iv)]))
        req.add("decrypt", nv.NVList([("cipher", "AES-256-GCM"), ("key", bad_key),
                                      ("iv", enc.iv)]))
        with pytest.raises(OvpnError) as exc:
            tr.request(ifc.name, Command.OVPN_NEW_KEY, nv.pack(req))
        errors.append(str(exc.value) + repr(exc.value))
        assert getattr(exc.value, "errno", None) == E.E2BIG
        ifc.destroy()
    finally:
        tr.close()
        sock.close()
    secrets = {"encrypt key": enc.key, "decrypt key": dec.key, "secondary key": enc2.key,
               "rejected key": bad_key, "encrypt iv": enc.iv, "decrypt iv": dec.iv}
    assert_no_secrets(capture.text, secrets)
    assert_no_secrets("\n".join(errors), secrets)
    assert_no_secrets(repr(enc) + repr(dec), secrets)


# --------------------------------------------------------------------------- sockets

def _can_connect_as_nobody(path: str, kind: int) -> bool:
    """Fork, drop to uid/gid 65534 and try to connect (only meaningful as root)."""
    pid = os.fork()
    if pid == 0:                                    # child
        code = 2
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(path)
                code = 0
            except PermissionError:
                code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"child failed ({code})"
    return code == 0


def test_engine_socket_is_root_only(engine_daemon: EngineDaemon) -> None:
    st = os.stat(engine_daemon.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    if os.geteuid() == 0:
        os.chmod(os.path.dirname(engine_daemon.path), 0o755)
        assert not _can_connect_as_nobody(engine_daemon.path, socket.SOCK_SEQPACKET)


def test_engine_socket_group_mode(tmp_path: Path) -> None:
    import grp
    group = grp.getgrgid(os.getegid()).gr_name
    if os.geteuid() != 0:
        pytest.skip("chown to root:group needs root")
    d = EngineDaemon(str(tmp_path / "g.sock"), group=group, engine=Engine(PairHost()))
    try:
        st = os.stat(d.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
    finally:
        d.shutdown()


def test_daemon_control_socket_is_root_only(tmp_path: Path) -> None:
    from bsd_ovpn.daemon.control import ControlServer

    path = str(tmp_path / "run" / "d.ctl")
    srv = ControlServer(path, lambda req: {"ok": True})
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        if os.geteuid() == 0:
            os.chmod(os.path.dirname(path), 0o755)
            os.chmod(tmp_path, 0o755)
            assert not _can_connect_as_nobody(path, socket.SOCK_STREAM)
    finally:
        srv.close()


# --------------------------------------------------------------------------- logutil

def test_redact_auth_tokens_passwords_and_pem() -> None:
    r = logutil.redact
    assert r("PUSH_REPLY,ping 10,auth-token SESS_ID_AT_abcdef0123,peer-id 0") == \
        "PUSH_REPLY,ping 10,auth-token [REDACTED],peer-id 0"
    assert "tok123" not in r("auth-token-user dXNlcg== auth-token tok123")
    assert r("password=hunter2 user=bob") == "password=[REDACTED] user=bob"
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"
    assert "MIGHAgEAMBMG" not in r(f"x {pem} y")
    static = "-----BEGIN OpenVPN Static key V1-----\nabcdef\n-----END OpenVPN Static key V1-----"
    assert "abcdef" not in r(static)
    assert r("peer 3 connected: AES-256-GCM") == "peer 3 connected: AES-256-GCM"


def test_redact_filter_on_a_handler(capture: Capture) -> None:
    h = Capture()
    logutil.harden(h)
    lg = logging.getLogger("bsd_ovpn.test_secrets")
    lg.addHandler(h)
    try:
        lg.info("PUSH_REPLY: %s", "route-gateway 198.51.100.1,auth-token s3cr3tT0k3n")
        try:
            raise ValueError("password=s3cr3tpw")
        except ValueError:
            lg.exception("failed")
    finally:
        lg.removeHandler(h)
    assert "s3cr3tT0k3n" not in h.text and "auth-token [REDACTED]" in h.text
    assert "s3cr3tpw" not in h.text


def test_rate_limit_filter_per_call_site() -> None:
    t = [0.0]
    h = Capture()
    h.addFilter(logutil.RateLimitFilter(rate=2.0, burst=5, clock=lambda: t[0]))
    lg = logging.getLogger("bsd_ovpn.test_ratelimit")
    lg.addHandler(h)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False

    def drop(i: int) -> None:                   # one call site
        lg.debug("dropped: junk %d", i)

    try:
        for i in range(10000):
            drop(i)
        lg.info("peer 1 connected")             # another call site is not starved
        t[0] = 10.0                             # 10 s later: 2/s refill, capped at the burst
        for i in range(100):
            drop(i)
    finally:
        lg.removeHandler(h)
        lg.propagate = True
    drops = [ln for ln in h.lines if "dropped" in ln]
    assert len(drops) == 10
    assert any("peer 1 connected" in ln for ln in h.lines)
    assert "9995 similar messages suppressed" in drops[5]


def test_rate_limiter_bounded_keys() -> None:
    rl = logutil.RateLimiter(rate=1, burst=1, max_keys=100, clock=lambda: 0.0)
    for i in range(10000):
        rl.allow(("192.0.2.1", i))
    assert len(rl._buckets) == 100                 # noqa: SLF001 - the bound is the point


# --------------------------------------------------------------------------- the daemons' logging

def test_daemon_logging_redacts_and_rate_limits(tmp_path: Path) -> None:
    """ovpnctl server/client logging (cli.daemon._logging) must use logutil's filters.

    A client logs the whole PUSH_REPLY, which may carry ``auth-token``; a server
    under a flood logs one DEBUG line per dropped datagram.
    """
    from bsd_ovpn.cli import daemon as cli_daemon

    conf = tmp_path / "c.conf"
    conf.write_text("verb 4\n")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    try:
        cli_daemon._logging(str(conf), True)
        for h in root.handlers:                 # whatever they installed, written to buf
            if isinstance(h, logging.StreamHandler):
                h.setStream(buf)
        lg = logging.getLogger("bsd_ovpn.daemon.client")
        lg.info("PUSH_REPLY: %s", "ping 10,auth-token SESS_ID_AT_0123456789abcdef")
        for i in range(5000):
            logging.getLogger("bsd_ovpn.proto.server").debug("dropped: %s", f"junk {i}")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = buf.getvalue()
    assert "PUSH_REPLY" in text, "the capture did not see the daemon's log output"
    assert "SESS_ID_AT_0123456789abcdef" not in text, "auth-token logged in clear"
    assert text.count("dropped:") < 200, f"{text.count('dropped:')} drop lines: no rate limit"


# --------------------------------------------------------------------------- auth scripts

def test_auth_script_via_file_gets_a_private_file_that_is_removed(tmp_path: Path) -> None:
    """auth-user-pass-verify via-file: the password file is 0600 and gone afterwards;
    the password never appears on the script's command line."""
    from bsd_ovpn.daemon.server import run_auth_script

    out = tmp_path / "seen"
    script = tmp_path / "verify.sh"
    script.write_text("#!/bin/sh\n"
                      f"stat -c '%a' \"$1\" > {out}\n"
                      f"echo \"$1\" >> {out}\n"
                      f"cat /proc/$$/cmdline | tr '\\0' ' ' >> {out}\n"
                      f"echo >> {out}\n"
                      f"sed -n 2p \"$1\" >> {out}\n"
                      "exit 0\n")
    os.chmod(script, 0o700)
    ok, why = run_auth_script(str(script), "via-file", "alice", PASSWORD, dict(os.environ))
    assert ok, why
    mode, path, cmdline, pw = out.read_text().splitlines()[:4]
    assert mode == "600"
    assert pw == PASSWORD                          # the script did get it, from the file
    assert PASSWORD not in cmdline
    assert not os.path.exists(path), "the credentials file was left behind"


def test_auth_script_via_env_keeps_password_off_the_command_line(tmp_path: Path) -> None:
    from bsd_ovpn.daemon.server import run_auth_script

    out = tmp_path / "seen"
    script = tmp_path / "verify.sh"
    script.write_text("#!/bin/sh\n"
                      f"cat /proc/$$/cmdline | tr '\\0' ' ' > {out}\n"
                      f"[ \"$password\" = '{PASSWORD}' ] && [ \"$username\" = alice ]\n")
    os.chmod(script, 0o700)
    ok, why = run_auth_script(str(script), "via-env", "alice", PASSWORD,
                              dict(os.environ, username="alice"))
    assert ok, why
    assert PASSWORD not in out.read_text()
