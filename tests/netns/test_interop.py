"""Interop with Debian's stock OpenVPN 2.6 (disable-dco) in network namespaces.

* ``ovpnctl probe`` (our client Session) against a stock server: every control
  wrapping, every AEAD cipher, PRF and TLS-EKM key derivation, failures.
* A stock client against our ServerEndpoint, and our client Session against
  a stock server, with data packets both ways: the helper at the bottom of
  this file (``python test_interop.py serve|connect ...``) runs our side in
  the namespace, answers the peer's keepalive pings with pings encrypted by
  our keys and reports every decrypted packet as a JSON line.
* Renegotiation every 5 s, initiated by either side, three times.
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve()

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]

SERVER_IP = "192.0.2.1"


def _py(*args: str) -> list[str]:
    return ["env", f"PYTHONPATH={ROOT}", sys.executable, *args]


def _probe_config(tmp: Path, pki: Any, keys: Any, wrap: str, *, ciphers: str = "AES-256-GCM",
                  ca: Path | None = None, cert: Any = None, wrap_key: Path | None = None,
                  inline: bool = False) -> Path:
    cred = cert or pki.client()
    lines = ["client", "dev tun", "proto udp", f"remote {SERVER_IP} 1194", "nobind",
             "remote-cert-tls server", f"data-ciphers {ciphers}"]
    files = {"ca": Path(ca or pki.ca_path), "cert": cred.cert_path, "key": cred.key_path}
    for name, path in files.items():
        if inline:
            lines += [f"<{name}>", path.read_text().strip(), f"</{name}>"]
        else:
            lines.append(f"{name} {path}")
    if wrap != "none":
        key = wrap_key or keys.key_for(wrap, "client", cred.cert_path.stem)
        if inline:
            lines += [f"<{wrap}>", Path(key).read_text().strip(), f"</{wrap}>"]
            if wrap == "tls-auth":
                lines.append("key-direction 1")
        else:
            lines.append(f"{wrap} {key}" + (" 1" if wrap == "tls-auth" else ""))
    path = tmp / f"probe-{wrap}-{time.monotonic_ns()}.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def _probe(host: Any, conf: Path, *extra: str, timeout: float = 25) -> tuple[int, dict, str]:
    cmd = _py("-c", "from bsd_ovpn.cli import main; main()", "probe", "-c", str(conf), "--json",
              "--timeout", str(timeout), *extra)
    r = host.run(cmd, check=False, timeout=timeout + 20)
    try:
        data = json.loads(r.stdout) if r.stdout.strip() else {}
    except json.JSONDecodeError:
        data = {}
    return r.returncode, data, r.stdout + r.stderr


# ----------------------------------------------------------------------------- probe tests

@pytest.mark.parametrize("wrap,inline", [("tls-crypt", False), ("tls-auth", False),
                                         ("tls-crypt-v2", False), ("none", False),
                                         ("tls-crypt", True)])
def test_probe_wrappings(two_hosts: Any, stock_openvpn: Any, pki: Any, wrap_keys: Any,
                         tmp_path: Path, wrap: str, inline: bool) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap=wrap, local=SERVER_IP)
    srv.wait_ready(30)
    conf = _probe_config(tmp_path, pki, wrap_keys, wrap, inline=inline)
    rc, data, out = _probe(two_hosts.client, conf)
    assert rc == 0, out
    assert data["ok"] and data["cipher"] == "AES-256-GCM"
    assert data["key_derivation"] == "tls-ekm"
    assert data["key_id"] == 0 and data["peer_id"] == 0
    assert data["tls_version"] in ("TLSv1.3", "TLSv1.2") and data["tls_cipher"]
    assert "topology subnet" in data["pushed"]
    assert any(o.startswith("ifconfig 198.51.100.") for o in data["pushed"])
    srv.wait_for(r"Peer Connection Initiated with", 10)
    # the probe said goodbye on the control channel (cc-exit EXIT), the server let go at once
    srv.wait_for(r"exit message received by peer", 10)


@pytest.mark.parametrize("cipher", ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"])
@pytest.mark.parametrize("kdf", ["tls-ekm", "prf"])
def test_probe_ciphers_and_key_derivation(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                          wrap_keys: Any, tmp_path: Path, cipher: str,
                                          kdf: str) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    conf = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt", ciphers=cipher)
    rc, data, out = _probe(two_hosts.client, conf, "--key-derivation", kdf)
    assert rc == 0, out
    assert data["cipher"] == cipher and data["key_derivation"] == kdf


@pytest.mark.parametrize("kdf", ["tls-ekm", "prf"])
def test_probe_tls12(two_hosts: Any, stock_openvpn: Any, pki: Any, wrap_keys: Any,
                     tmp_path: Path, kdf: str) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP,
                               extra=("tls-version-max 1.2",))
    srv.wait_ready(30)
    conf = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt")
    rc, data, out = _probe(two_hosts.client, conf, "--key-derivation", kdf)
    assert rc == 0, out
    assert data["tls_version"] == "TLSv1.2" and data["key_derivation"] == kdf


def test_probe_wrong_ca(two_hosts: Any, stock_openvpn: Any, pki: Any, wrap_keys: Any,
                        tmp_path: Path) -> None:
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    other = pki.unrelated_ca()
    conf = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt", ca=other.ca_path)
    t0 = time.monotonic()
    rc, data, out = _probe(two_hosts.client, conf, timeout=20)
    assert rc != 0 and not data["ok"]
    assert data["reason"] == "tls-error"
    assert "certificate verify failed" in data["error"], out
    assert time.monotonic() - t0 < 15


def test_probe_wrong_tls_crypt_key(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                   wrap_keys: Any, tmp_path: Path) -> None:
    from bsd_ovpn.testbed.stockovpn import genkey
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP)
    srv.wait_ready(30)
    bad = tmp_path / "other-tc.key"
    genkey("tls-crypt", bad)
    conf = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt", wrap_key=bad)
    rc, data, out = _probe(two_hosts.client, conf, timeout=7)
    assert rc != 0 and data["reason"] == "no-answer", out
    assert "no answer from server after 2 retransmits" in data["error"]


@pytest.mark.parametrize("who", ["server", "client"])
def test_probe_expired_certificate(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                   wrap_keys: Any, tmp_path: Path, who: str) -> None:
    kw = {"cert": pki.server("expired-server", expired=True)} if who == "server" else {}
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP, **kw)
    srv.wait_ready(30)
    ccert = pki.client("expired-client", expired=True) if who == "client" else None
    conf = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt", cert=ccert)
    rc, data, out = _probe(two_hosts.client, conf, timeout=8)
    assert rc != 0, out
    if who == "server":
        assert data["reason"] == "tls-error" and "certificate has expired" in data["error"], out
    else:
        # a stock server drops the instance without flushing its TLS alert to us
        assert data["reason"] == "rejected" and "rejected our certificate" in data["error"], out
        srv.wait_for("certificate has expired", 5)


# ----------------------------------------------------------------------------- our side as helper

class Helper:
    """Our endpoint running in a namespace; JSON lines from its stdout arrive on a queue."""

    def __init__(self, host: Any, args: list[str]) -> None:
        self.proc = host.popen(_py(str(HELPER), *args), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self.raw: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    def wait(self, pred: Any, timeout: float, what: str) -> dict:
        end = time.monotonic() + timeout
        for d in self.seen:
            if pred(d):
                return d
        while time.monotonic() < end:
            try:
                d = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(d)
            if pred(d):
                return d
        raise AssertionError(f"helper never reported {what}; output:\n{''.join(self.raw[-40:])}")

    def all(self) -> list[dict]:
        """Everything reported so far."""
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _helper_args(role: str, pki: Any, keys: Any, wrap: str, *, reneg: int = 0,
                 cipher: str = "AES-256-GCM", auth: str | None = None,
                 prf: bool = False) -> list[str]:
    cred = pki.server() if role == "serve" else pki.client()
    args = [role, "--addr", SERVER_IP, "--ca", str(pki.ca_path), "--cert", str(cred.cert_path),
            "--key", str(cred.key_path), "--wrap", wrap, "--reneg", str(reneg),
            "--cipher", cipher]
    if wrap != "none":
        k = keys.key_for(wrap, "server" if role == "serve" else "client")
        args += ["--wrap-key", str(k)]
    if auth:
        args += ["--auth", auth]
    if prf:
        args.append("--prf")
    return args


@pytest.mark.parametrize("wrap", ["tls-crypt", "tls-auth", "tls-crypt-v2", "none"])
def test_stock_client_against_our_server(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                         wrap_keys: Any, wrap: str) -> None:
    helper = Helper(two_hosts.server, _helper_args("serve", pki, wrap_keys, wrap))
    try:
        helper.wait(lambda d: d.get("event") == "listening", 20, "listening")
        cli = stock_openvpn.client(two_hosts.client, remote=SERVER_IP, wrap=wrap)
        cli.wait_ready(30)
        keys = helper.wait(lambda d: d.get("event") == "KeysReady", 5, "keys")
        assert keys["key_id"] == 0 and keys["cipher"] == "AES-256-GCM"
        assert keys["key_derivation"] == "tls-ekm"
        # the stock client's keepalive pings decrypt with our keys ...
        helper.wait(lambda d: d.get("event") == "data" and d.get("ping"), 15, "a decrypted ping")
        # ... and ours with its keys: it stays up past ping-restart (4 s) on our pings alone
        time.sleep(6)
        log = cli.log
        assert "Inactivity timeout" not in log and "Decrypt" not in log, cli.log_tail()
        assert not any(d.get("event") == "data-error" for d in helper.all())
        assert helper.proc.poll() is None
    finally:
        helper.stop()


@pytest.mark.slow
@pytest.mark.parametrize("cipher", ["AES-256-GCM", "AES-128-GCM", "CHACHA20-POLY1305"])
@pytest.mark.parametrize("kdf", ["tls-ekm", "prf"])
def test_our_client_data_both_ways(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                   wrap_keys: Any, cipher: str, kdf: str) -> None:
    """Keys of our client Session agree with a stock server's for every cipher and KDF."""
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP,
                               keepalive=(1, 4))
    srv.wait_ready(30)
    helper = Helper(two_hosts.client, _helper_args("connect", pki, wrap_keys, "tls-crypt",
                                                   cipher=cipher, prf=kdf == "prf"))
    try:
        keys = helper.wait(lambda d: d.get("event") == "KeysReady", 20, "keys")
        assert keys["cipher"] == cipher and keys["key_derivation"] == kdf
        # server -> client: its keepalive pings decrypt with our keys
        helper.wait(lambda d: d.get("event") == "data" and d.get("ping"), 10, "a ping")
        # client -> server: it would hit ping-restart (2 x 4 s) if ours did not decrypt
        time.sleep(9)
        log = srv.log
        assert "Inactivity timeout" not in log and "Decrypt" not in log, srv.log_tail()
        assert not any(d.get("event") in ("data-error", "ConnectionTerminated")
                       for d in helper.all())
        assert helper.proc.poll() is None
    finally:
        helper.stop()


@pytest.mark.parametrize("password,ok", [("sesame", True), ("wrong", False)])
def test_stock_client_credentials_checked_by_our_hook(two_hosts: Any, stock_openvpn: Any,
                                                      pki: Any, wrap_keys: Any, tmp_path: Path,
                                                      password: str, ok: bool) -> None:
    creds = tmp_path / "creds.txt"
    creds.write_text(f"alice\n{password}\n")
    creds.chmod(0o600)
    helper = Helper(two_hosts.server, _helper_args("serve", pki, wrap_keys, "tls-crypt",
                                                   auth="alice:sesame"))
    try:
        helper.wait(lambda d: d.get("event") == "listening", 20, "listening")
        cli = stock_openvpn.client(two_hosts.client, remote=SERVER_IP, wrap="tls-crypt",
                                   extra=(f"auth-user-pass {creds}", "auth-retry none"))
        if ok:
            cli.wait_ready(30)
            helper.wait(lambda d: d.get("event") == "KeysReady", 5, "keys")
        else:
            cli.wait_for(r"AUTH: Received control message: AUTH_FAILED", 30)
            helper.wait(lambda d: d.get("event") == "AuthFailed", 5, "AuthFailed")
            assert not any(d.get("event") == "KeysReady" for d in helper.all())
    finally:
        helper.stop()


@pytest.mark.parametrize("password,ok", [("sesame", True), ("wrong", False)])
def test_probe_credentials_against_stock_server(two_hosts: Any, stock_openvpn: Any, pki: Any,
                                                wrap_keys: Any, tmp_path: Path, password: str,
                                                ok: bool) -> None:
    script = tmp_path / "verify.sh"
    script.write_text('#!/bin/sh\n{ read u; read p; } < "$1"\n'
                      '[ "$u" = alice ] && [ "$p" = sesame ]\n')
    script.chmod(0o755)
    srv = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP,
                               extra=("script-security 2",
                                      f"auth-user-pass-verify {script} via-file"))
    srv.wait_ready(30)
    creds = tmp_path / "creds.txt"
    creds.write_text(f"alice\n{password}\n")
    conf = _probe_config(tmp_path, pki, wrap_keys, "tls-crypt")
    with open(conf, "a") as fh:
        fh.write(f"auth-user-pass {creds}\n")
    rc, data, out = _probe(two_hosts.client, conf, timeout=20)
    if ok:
        assert rc == 0 and data["ok"], out
    else:
        assert rc != 0 and data["reason"] == "auth-failed", out
        assert data["error"].startswith("AUTH_FAILED")


@pytest.mark.slow
@pytest.mark.parametrize("initiator", ["stock", "ours"])
@pytest.mark.parametrize("ours", ["serve", "connect"])
def test_renegotiation_every_5s(two_hosts: Any, stock_openvpn: Any, pki: Any, wrap_keys: Any,
                                initiator: str, ours: str) -> None:
    our_reneg = 5 if initiator == "ours" else 0
    stock_reneg = 5 if initiator == "stock" else 0
    helper = Helper(two_hosts.server if ours == "serve" else two_hosts.client,
                    _helper_args(ours, pki, wrap_keys, "tls-crypt", reneg=our_reneg))
    try:
        if ours == "serve":
            helper.wait(lambda d: d.get("event") == "listening", 20, "listening")
            peer = stock_openvpn.client(two_hosts.client, remote=SERVER_IP, wrap="tls-crypt",
                                        reneg_sec=stock_reneg)
        else:
            peer = stock_openvpn.server(two_hosts.server, wrap="tls-crypt", local=SERVER_IP,
                                        reneg_sec=stock_reneg, keepalive=(1, 4))
        peer.wait_ready(30)
        # a stock 2.6 peer and we both announce EKM + dynamic tls-crypt: renegotiations
        # below run with the dynamic tls-crypt key (spec §5.5)
        push = helper.wait(lambda d: d.get("event", "").startswith("PushReply"), 10, "push")
        assert "protocol-flags cc-exit tls-ekm dyn-tls-crypt" in push["options"], push
        for kid in (1, 2, 3):
            helper.wait(lambda d, k=kid: d.get("event") == "KeysReady" and d["key_id"] == k,
                        25, f"keys for key_id {kid}")
        # data with the renegotiated keys both ways
        helper.wait(lambda d: d.get("event") == "data" and d["key_id"] >= 2, 20,
                    "data decrypted with a renegotiated key")
        helper.wait(lambda d: d.get("event") == "SwapKeys" and d["key_id"] >= 2, 20,
                    "TX moved to a renegotiated key")
        time.sleep(3)
        log = peer.log
        assert "Decrypt" not in log and "Inactivity timeout" not in log, peer.log_tail()
        # One race is benign: a packet we sent on the key the peer retires when its next
        # soft reset starts.  Like OpenVPN (tls_select_encryption_key) we keep sending on the
        # old key until the new key's auth_deferred_expire (60 s here), so a peer that
        # renegotiates every 5 s can drop that key while our ping is in flight; stock logs it
        # as "keys are out of sync" and the data keeps flowing (checked above).  Anything
        # else, or more than one per renegotiation, is a failure.
        errors = [ln for ln in log.splitlines() if "TLS Error" in ln]
        assert all("keys are out of sync" in ln for ln in errors), peer.log_tail()
        assert len(errors) <= 3, peer.log_tail()
        assert not any(d.get("event") in ("data-error", "ConnectionTerminated")
                       for d in helper.all())
        assert helper.proc.poll() is None
    finally:
        helper.stop()


# ----------------------------------------------------------------------------- helper process

def _helper_main(argv: list[str]) -> int:     # pragma: no cover - runs in a namespace
    import argparse
    import ipaddress
    import selectors
    import socket

    from bsd_ovpn.ifovpn import KeySlot
    from bsd_ovpn.proto import events as ev
    from bsd_ovpn.proto.datachannel import DataChannel, is_ping, parse_data_header
    from bsd_ovpn.proto.keyfile import StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey
    from bsd_ovpn.proto.server import ServerEndpoint, ServerSettings
    from bsd_ovpn.proto.session import Session, SessionSettings
    from bsd_ovpn.proto.tls import TLSConfig
    from bsd_ovpn.proto.wrap import NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Client, TLSCryptV2Server
    from bsd_ovpn.ifovpn import PING_MAGIC

    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["serve", "connect"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--port", type=int, default=1194)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--wrap", default="tls-crypt")
    ap.add_argument("--wrap-key")
    ap.add_argument("--reneg", type=float, default=0)
    ap.add_argument("--cipher", default="AES-256-GCM")
    ap.add_argument("--auth", help="USER:PASSWORD the server accepts (others: AUTH_FAILED)")
    ap.add_argument("--prf", action="store_true", help="do not announce TLS-EKM")
    a = ap.parse_args(argv)
    server = a.role == "serve"

    def out(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)

    tls = TLSConfig(ca=Path(a.ca).read_bytes(), cert=Path(a.cert).read_bytes(),
                    key=Path(a.key).read_bytes(),
                    remote_cert_tls="client" if server else "server")
    settings = SessionSettings(server=server, tls=tls, reneg_sec=a.reneg, hand_window=60,
                               data_ciphers=(a.cipher, "AES-128-GCM") if server else (a.cipher,),
                               ekm=not a.prf,
                               push_options=("ping 1", "ping-restart 4"),
                               ping=1, ping_restart=30)
    if a.auth and server:
        want_user, _, want_pw = a.auth.partition(":")

        def verify(req: Any) -> Any:
            ok = req.username == want_user and req.password == want_pw
            return (ok, "" if ok else f"bad credentials for {req.username}")
        settings.auth_verify = verify
    factory: Any = None
    v2: Any = None
    cwrap: Any = None
    if a.wrap in ("tls-auth", "tls-crypt"):
        settings.wrap_key = StaticKey.load(a.wrap_key)
    elif a.wrap == "tls-crypt-v2" and not server:
        settings.wrap_key = TLSCryptV2ClientKey.load(a.wrap_key).kc
    if a.wrap == "none":
        factory, cwrap = NoWrap, NoWrap()
    elif a.wrap == "tls-auth":
        k = StaticKey.load(a.wrap_key)
        factory = lambda: TLSAuth(k, 0, "SHA1")   # noqa: E731
        cwrap = TLSAuth(k, 1, "SHA1")
    elif a.wrap == "tls-crypt":
        k = StaticKey.load(a.wrap_key)
        factory = lambda: TLSCrypt(k, server=True)   # noqa: E731
        cwrap = TLSCrypt(k, server=False)
    elif server:
        v2 = TLSCryptV2Server(TLSCryptV2ServerKey.load(a.wrap_key))
    else:
        cwrap = TLSCryptV2Client(TLSCryptV2ClientKey.load(a.wrap_key))

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if server:
        sock.bind((a.addr, a.port))
        endpoint = ServerEndpoint(ServerSettings(settings, pool=ipaddress.ip_network(
            "198.51.100.0/24")), wrap_factory=factory, tls_crypt_v2=v2)
    else:
        sock.connect((a.addr, a.port))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    now = time.monotonic
    session: Session | None = None if server else Session.connect(settings, cwrap, now())
    peer_addr: Any = None if server else (a.addr, a.port)
    rx: dict[int, DataChannel] = {}
    tx: dict[str, DataChannel] = {}
    out(event="listening")

    def sessions() -> list[tuple[Any, Session]]:
        if server:
            return [(addr, s) for _pid, addr, s in endpoint.clients()]
        return [(peer_addr, session)] if session is not None else []

    def handle(e: Any, s: Session | None) -> None:
        name = type(e).__name__
        if isinstance(e, ev.KeysReady):
            dc = DataChannel(e.keys, peer_id=e.peer_id)
            rx[e.key_id] = dc
            if e.slot is KeySlot.PRIMARY:
                tx["dc"] = dc
            out(event=name, key_id=e.key_id, slot=int(e.slot), cipher=e.keys.cipher,
                key_derivation=e.key_derivation, peer_id=e.peer_id)
        elif isinstance(e, ev.SwapKeys):
            tx["dc"] = rx[e.key_id]
            out(event=name, key_id=e.key_id)
        elif isinstance(e, ev.DeleteKey):
            out(event=name, key_id=e.key_id, slot=int(e.slot))
        elif isinstance(e, ev.SendPing):
            dc = tx.get("dc")
            if dc is not None and peer_addr is not None:
                sock.sendto(dc.encrypt(PING_MAGIC), peer_addr) if server else sock.send(
                    dc.encrypt(PING_MAGIC))
        elif isinstance(e, ev.ConnectionTerminated):
            out(event=name, reason=e.reason, message=e.message)
        elif isinstance(e, ev.PushReplyReceived):
            out(event=name, options=list(e.raw))
        elif isinstance(e, ev.PushReplySent):
            out(event=name, options=list(e.options))
        else:
            out(event=name, text=str(e)[:300])

    while True:
        t = now()
        if server:
            for d, addr in endpoint.datagrams_to_send(t):
                sock.sendto(d, addr)
            while (ce := endpoint.next_event()) is not None:
                peer_addr = ce.addr
                handle(ce.event, endpoint.session_for(ce.addr))
            timer = endpoint.get_timer()
        else:
            assert session is not None
            for d in session.datagrams_to_send(t):
                sock.send(d)
            while (e := session.next_event()) is not None:
                handle(e, session)
            if session.terminated is not None:
                return 1
            timer = session.get_timer()
        wait = 0.5 if timer is None else max(0.0, min(0.5, timer - t))
        for _k, _m in sel.select(wait):
            while True:
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                t = now()
                if data and data[0] >> 3 in (6, 9):
                    hdr = parse_data_header(data)
                    dc = rx.get(hdr.key_id)
                    if dc is None:
                        out(event="data-unknown-key", key_id=hdr.key_id)
                        continue
                    try:
                        pt = dc.decrypt(data, t)
                    except Exception as exc:   # noqa: BLE001
                        out(event="data-error", key_id=hdr.key_id, error=str(exc))
                        continue
                    for _a, s in sessions():
                        s.data_received(t)
                    out(event="data", key_id=hdr.key_id, ping=is_ping(pt), size=len(pt))
                    continue
                if server:
                    endpoint.receive_datagram(data, addr, t)
                else:
                    assert session is not None
                    session.receive_datagram(data, t)
        t = now()
        if server:
            if (tt := endpoint.get_timer()) is not None and tt <= t:
                endpoint.handle_timer(t)
        elif session is not None and (tt := session.get_timer()) is not None and tt <= t:
            session.handle_timer(t)


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
