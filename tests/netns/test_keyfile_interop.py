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
import subprocess
import time
from pathlib import Path

import pytest

from bsd_ovpn.proto.keyfile import (
    StaticKey, TLSCryptV2ClientKey, TLSCryptV2ServerKey, generate_tls_crypt_v2_client_key,
    unwrap_client_key,
)
from bsd_ovpn.proto.packet import ControlPacket, Opcode
from bsd_ovpn.proto.wrap import (
    ControlWrap, NoWrap, TLSAuth, TLSCrypt, TLSCryptV2Client,
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

