"""Key files and wrappings against the real openvpn 2.6 binary.

A stock OpenVPN in point-to-point TLS-server mode with ``dev null`` (no root,
no tun) answers a client hard reset with its own HARD_RESET_SERVER_V2.  If it
answers our reset, it authenticated (and for tls-crypt-v2: unwrapped) what we
sent; if we can open its answer, our unwrap matches its wrap.  That proves
key files, key directions and wire layouts in both directions at once.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from bsd_ovpn.proto.keyfile import (
    StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, generate_tls_crypt_v2_client_key,
    unwrap_client_key,
)
from bsd_ovpn.proto.packet import (
    EARLY_NEG_FLAG_RESEND_WKC, TLV_EARLY_NEG_FLAGS, ControlPacket, Opcode, encode_tlvs,
)
from bsd_ovpn.proto.wrap import (
    ControlWrap, NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Client, TLSCryptV2Server,
    early_negotiation_marker,
)
from bsd_ovpn.testbed.pki import PKI

pytestmark = pytest.mark.openvpn


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    p = PKI(d)
    p.server()
    return p


class _Server:
    """A stock openvpn p2p TLS server on 127.0.0.1 with ``dev null``."""

    def __init__(self, workdir: Path, pki: PKI, extra: list[str]) -> None:
        self.port = _free_udp_port()
        srv = pki.server()
        self.log = workdir / f"openvpn-{self.port}.log"
        args = ["openvpn", "--dev", "null", "--tls-server", "--ca", str(pki.ca_path),
                "--cert", str(srv.cert_path), "--key", str(srv.key_path), "--dh", "none",
                "--local", "127.0.0.1", "--port", str(self.port), "--verb", "4",
                "--hand-window", "20", *extra]
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def server(tmp_path, pki):
    started: list[_Server] = []

    def start(*extra: str) -> _Server:
        s = _Server(tmp_path, pki, list(extra))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def _handshake(srv: _Server, wrap: ControlWrap, opcode: Opcode) -> ControlPacket:
    """Send a client reset (retrying until the server is up) and return its decoded reply."""
    sid = os.urandom(8)
    reset = ControlPacket(opcode, 0, sid, message_id=0).encode()
    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            assert srv.proc.poll() is None, f"openvpn exited:\n{srv.log_text()}"
            s.sendto(wrap.wrap(reset, time.time()), ("127.0.0.1", srv.port))
            try:
                data, _ = s.recvfrom(4096)
            except socket.timeout:
                continue
            reply = ControlPacket.decode(wrap.unwrap(data, time.time()))
            assert reply.opcode is Opcode.P_CONTROL_HARD_RESET_SERVER_V2
            assert reply.acks == (0,) and reply.remote_session_id == sid
            assert reply.message_id == 0
            return reply
    pytest.fail(f"no reply from openvpn:\n{srv.log_text()}")


def test_no_wrapping(server):
    reply = _handshake(server(), NoWrap(), Opcode.P_CONTROL_HARD_RESET_CLIENT_V2)
    assert reply.payload == b""


def test_tls_crypt_with_our_key_file(server, tmp_path):
    key = StaticKey.generate()
    key.save(tmp_path / "tc.key")
    srv = server("--tls-crypt", "tc.key")
    _handshake(srv, TLSCrypt(key, server=False), Opcode.P_CONTROL_HARD_RESET_CLIENT_V2)


@pytest.mark.parametrize("digest", ["SHA1", "SHA256", "SHA512"])
@pytest.mark.parametrize("server_dir,client_dir", [(0, 1), (1, 0), (None, None)])
def test_tls_auth_digests_and_directions(server, tmp_path, digest, server_dir, client_dir):
    key = StaticKey.generate()
    key.save(tmp_path / "ta.key")
    extra = ["--tls-auth", "ta.key"] + ([str(server_dir)] if server_dir is not None else [])
    srv = server(*extra, "--auth", digest)
    _handshake(srv, TLSAuth(key, client_dir, digest), Opcode.P_CONTROL_HARD_RESET_CLIENT_V2)


def test_tls_auth_wrong_direction_gets_no_answer(server, tmp_path):
    key = StaticKey.generate()
    key.save(tmp_path / "ta.key")
    srv = server("--tls-auth", "ta.key", "0")
    # establish that the server is up with a correct client first
    _handshake(srv, TLSAuth(key, 1), Opcode.P_CONTROL_HARD_RESET_CLIENT_V2)
    bad = TLSAuth(key, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(bad.wrap(ControlPacket(Opcode.P_CONTROL_HARD_RESET_CLIENT_V2, 0, os.urandom(8),
                                        message_id=0).encode(), time.time()),
                 ("127.0.0.1", srv.port))
        with pytest.raises(socket.timeout):
            s.recvfrom(4096)


@pytest.mark.parametrize("server_key_by", ["openvpn", "us"])
def test_tls_crypt_v2_client_key_we_generate_is_accepted(server, tmp_path, server_key_by):
    if server_key_by == "openvpn":
        subprocess.run(["openvpn", "--genkey", "tls-crypt-v2-server", "srv.key"], cwd=tmp_path,
                       check=True, capture_output=True, timeout=30)
    else:
        TLSCryptV2ServerKey.generate().save(tmp_path / "srv.key")
    sk = TLSCryptV2ServerKey.load(tmp_path / "srv.key")
    (tmp_path / "cli.key").write_text(generate_tls_crypt_v2_client_key(sk, b"host=test"))
    ck = TLSCryptV2ClientKey.load(tmp_path / "cli.key")
    srv = server("--tls-crypt-v2", "srv.key")
    client = TLSCryptV2Client(ck)
    _handshake(srv, client, Opcode.P_CONTROL_HARD_RESET_CLIENT_V3)
    assert "using tls-crypt-v2 key" in srv.log_text()


def test_tls_crypt_v2_real_client_key_unwraps_and_is_used(server, tmp_path):
    """A client key made by openvpn: we unwrap its WKc and use it against the real server."""
    subprocess.run(["openvpn", "--genkey", "tls-crypt-v2-server", "srv.key"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=30)
    subprocess.run(["openvpn", "--tls-crypt-v2", "srv.key", "--genkey", "tls-crypt-v2-client",
                    "cli.key"], cwd=tmp_path, check=True, capture_output=True, timeout=30)
    sk = TLSCryptV2ServerKey.load(tmp_path / "srv.key")
    ck = TLSCryptV2ClientKey.load(tmp_path / "cli.key")
    kc, meta = unwrap_client_key(sk, ck.wkc)
    assert kc == ck.kc and meta[0] == 1
    srv = server("--tls-crypt-v2", "srv.key")
    _handshake(srv, TLSCryptV2Client(ck), Opcode.P_CONTROL_HARD_RESET_CLIENT_V3)



# --- the other direction: a stock openvpn *client* talks to our receiving side ---------------

class _Client:
    """A stock openvpn p2p TLS client (dev null) sending to a UDP socket we own."""

    def __init__(self, workdir: Path, pki: PKI, extra: list[str]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        port = self.sock.getsockname()[1]
        cli = pki.client()
        self.log = workdir / f"openvpn-client-{port}.log"
        args = ["openvpn", "--dev", "null", "--tls-client", "--ca", str(pki.ca_path),
                "--cert", str(cli.cert_path), "--key", str(cli.key_path),
                "--remote", "127.0.0.1", str(port), "--nobind", "--verb", "4", *extra]
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)

    def recv(self) -> tuple[bytes, tuple]:
        try:
            return self.sock.recvfrom(4096)
        except socket.timeout:
            pytest.fail(f"nothing from openvpn client:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def client(tmp_path, pki):
    started: list[_Client] = []

    def start(*extra: str) -> _Client:
        c = _Client(tmp_path, pki, list(extra))
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def _serve_reset(cli: _Client, addr: tuple, plain: bytes, wrap: ControlWrap,
                 payload: bytes = b"", raw: list[bytes] | None = None) -> ControlPacket:
    """Answer the stock client's reset and return its next packet (the ClientHello)."""
    reset = ControlPacket.decode(plain)
    ssid = os.urandom(8)
    reply = ControlPacket(Opcode.P_CONTROL_HARD_RESET_SERVER_V2, 0, ssid, acks=(0,),
                          remote_session_id=reset.session_id, message_id=0, payload=payload)
    cli.sock.sendto(wrap.wrap(reply.encode(), time.time()), addr)
    while True:
        data, _ = cli.recv()
        if raw is not None:
            raw.append(data)
        pkt = ControlPacket.decode(wrap.unwrap(data, time.time()))
        if pkt.opcode in (Opcode.P_CONTROL_HARD_RESET_CLIENT_V2,
                          Opcode.P_CONTROL_HARD_RESET_CLIENT_V3):
            continue                      # a retransmitted reset that crossed our reply
        assert pkt.session_id == reset.session_id
        assert 0 in pkt.acks and pkt.remote_session_id == ssid
        assert pkt.message_id == 1 and pkt.payload[:1] == b"\x16"     # TLS handshake record
        return pkt


def test_stock_client_tls_crypt_to_our_server_side(client, tmp_path):
    key = StaticKey.generate()
    key.save(tmp_path / "tc.key")
    cli = client("--tls-crypt", "tc.key")
    wrap = TLSCrypt(key, server=True)
    data, addr = cli.recv()
    assert len(data) == 54                                  # spec §3.4 worked size
    plain = wrap.unwrap(data, time.time())
    assert ControlPacket.decode(plain).opcode is Opcode.P_CONTROL_HARD_RESET_CLIENT_V2
    _serve_reset(cli, addr, plain, wrap)


@pytest.mark.parametrize("digest,size", [("SHA1", 42), ("SHA512", 86)])
def test_stock_client_tls_auth_to_our_server_side(client, tmp_path, digest, size):
    key = StaticKey.generate()
    key.save(tmp_path / "ta.key")
    cli = client("--tls-auth", "ta.key", "1", "--auth", digest)
    wrap = TLSAuth(key, 0, digest)
    data, addr = cli.recv()
    assert len(data) == size
    _serve_reset(cli, addr, wrap.unwrap(data, time.time()), wrap)


def test_stock_client_plain_reset_is_14_bytes(client):
    cli = client()
    data, addr = cli.recv()
    assert len(data) == 14
    _serve_reset(cli, addr, NoWrap().unwrap(data, time.time()), NoWrap())


@pytest.mark.parametrize("resend_wkc", [False, True])
def test_stock_tls_crypt_v2_client_to_our_server(client, tmp_path, resend_wkc):
    sk = TLSCryptV2ServerKey.generate()
    sk.save(tmp_path / "srv.key")
    subprocess.run(["openvpn", "--tls-crypt-v2", "srv.key", "--genkey", "tls-crypt-v2-client",
                    "cli.key"], cwd=tmp_path, check=True, capture_output=True, timeout=30)
    ck = TLSCryptV2ClientKey.load(tmp_path / "cli.key")
    cli = client("--tls-crypt-v2", "cli.key")
    data, addr = cli.recv()
    assert data.endswith(ck.wkc) and len(data) == 54 + len(ck.wkc)
    assert early_negotiation_marker(data)
    plain, sess, meta = TLSCryptV2Server(sk).unwrap_client(data, time.time())
    assert ControlPacket.decode(plain).opcode is Opcode.P_CONTROL_HARD_RESET_CLIENT_V3
    assert sess.kc == ck.kc and meta[0] == 1
    payload = encode_tlvs([(TLV_EARLY_NEG_FLAGS, struct.pack(">H", EARLY_NEG_FLAG_RESEND_WKC))])
    raw: list[bytes] = []
    pkt = _serve_reset(cli, addr, plain, sess, payload if resend_wkc else b"", raw)
    if resend_wkc:   # spec §6.1 step 6: message id 1 goes out as P_CONTROL_WKC_V1 + WKc
        assert pkt.opcode is Opcode.P_CONTROL_WKC_V1 and raw[-1].endswith(ck.wkc)
    else:            # without the flag the next packet is a plain P_CONTROL_V1
        assert pkt.opcode is Opcode.P_CONTROL_V1 and not raw[-1].endswith(ck.wkc)
