"""Key-method 2 messages, OCC strings, peer-info and NCP against the sizes of spec §8/§11."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsd_ovpn.errors import RemoteProtocolError, ValidationError
from bsd_ovpn.proto.keymethod import (CipherNegotiationError, IVProto, KeyMethod2,
                                      KeyMethodError, KeyMethodTruncated, PeerInfo, choose_cipher,
                                      options_cipher, options_string)
from bsd_ovpn.proto.keys import KeySource

SERVER_OCC = ("V4,dev-type tun,link-mtu 1541,tun-mtu 1500,proto UDPv4,auth SHA1,keysize 128,"
              "key-method 2,tls-server")
CLIENT_OCC = SERVER_OCC.replace("tls-server", "tls-client")
STOCK_PEER_INFO = ("IV_VER=2.6.14\nIV_PLAT=linux\nIV_TCPNL=1\nIV_MTU=1600\n"
                   "IV_CIPHERS=AES-256-GCM:CHACHA20-POLY1305\nIV_PROTO=990\nIV_LZO_STUB=1\n"
                   "IV_COMP_STUB=1\nIV_COMP_STUBv2=1\n")

CLIENT_SRC = KeySource(bytes(range(48)), bytes(range(100, 132)), bytes(range(150, 182)))
SERVER_SRC = KeySource(b"", bytes(range(200, 232)), bytes(range(10, 42)))


def test_options_strings_match_stock() -> None:
    assert options_string(server=True) == SERVER_OCC
    assert options_string(server=False) == CLIENT_OCC
    assert options_string(server=False, tls_auth_keydir=1) == (
        "V4,dev-type tun,link-mtu 1541,tun-mtu 1500,proto UDPv4,keydir 1,auth SHA1,"
        "keysize 128,tls-auth,key-method 2,tls-client")
    assert options_string(server=True, tls_auth_keydir=0).endswith(
        "keydir 0,auth SHA1,keysize 128,tls-auth,key-method 2,tls-server")
    assert "proto TCPv4_SERVER" in options_string(server=True, proto="tcp")
    assert "proto TCPv4_CLIENT" in options_string(server=False, proto="tcp6")
    gcm = options_string(server=False, cipher="AES-256-GCM")
    assert "cipher AES-256-GCM,auth [null-digest],keysize 256" in gcm
    assert options_cipher(gcm) == "AES-256-GCM"
    assert options_cipher(CLIENT_OCC) is None
    assert options_cipher(options_string(server=False, cipher="none")) == "none"
    with pytest.raises(ValidationError, match="proto"):
        options_string(server=True, proto="sctp")


def test_server_km2_is_178_bytes_and_exact_layout() -> None:
    km = KeyMethod2(SERVER_SRC, SERVER_OCC)
    wire = km.encode(client=False)
    assert len(wire) == 178
    assert wire[:5] == b"\x00\x00\x00\x00\x02"
    assert wire[5:37] == SERVER_SRC.random1 and wire[37:69] == SERVER_SRC.random2
    assert wire[69:71] == struct.pack("!H", len(SERVER_OCC) + 1)
    assert wire[71:71 + len(SERVER_OCC) + 1] == SERVER_OCC.encode() + b"\x00"
    assert wire[-6:] == b"\x00" * 6
    back = KeyMethod2.decode(wire, client_sent=False)
    assert back.key_source == SERVER_SRC
    assert (back.options, back.username, back.password, back.peer_info) == (
        SERVER_OCC, None, None, None)


def test_client_km2_is_378_bytes_and_round_trips() -> None:
    km = KeyMethod2(CLIENT_SRC, CLIENT_OCC, None, None, STOCK_PEER_INFO)
    wire = km.encode(client=True)
    assert len(wire) == 378  # 5 + 48 + 64 + 103 + 2 + 2 + 154 (spec §8)
    assert wire[5:53] == CLIENT_SRC.pre_master
    back = KeyMethod2.decode(wire, client_sent=True)
    assert back == km


def test_credentials_round_trip_and_empty_vs_absent() -> None:
    km = KeyMethod2(CLIENT_SRC, CLIENT_OCC, "alice", "", "IV_PROTO=2\n")
    back = KeyMethod2.decode(km.encode(True), True)
    assert back.username == "alice" and back.password == "" and back.peer_info == "IV_PROTO=2\n"
    assert "<set>" not in repr(back)
    km2 = KeyMethod2(CLIENT_SRC, CLIENT_OCC, "bob", "s3cret\udcff", None)
    back2 = KeyMethod2.decode(km2.encode(True), True)
    assert back2.password == "s3cret\udcff"  # non-UTF-8 byte survives
    assert "s3cret" not in repr(back2)


def test_decode_prefix_reports_consumed_bytes() -> None:
    wire = KeyMethod2(SERVER_SRC, SERVER_OCC).encode(False)
    km, used = KeyMethod2.decode_prefix(wire + b"PUSH_REPLY,ping 10\x00", False)
    assert used == 178 and km.options == SERVER_OCC
    with pytest.raises(KeyMethodError, match="unexpected bytes after peer-info"):
        KeyMethod2.decode(wire + b"x", False)
    # Every strict prefix is "truncated" (a stream reader waits for more) ...
    for cut in range(len(wire)):
        with pytest.raises(KeyMethodTruncated):
            KeyMethod2.decode_prefix(wire[:cut], False)
    # ... except when the message could never fit OpenVPN's 2048-byte read.
    huge = b"\0\0\0\0\x02" + bytes(64) + struct.pack("!H", 500) + b"V" * 499 + b"\0" \
        + b"\0\0\0\0" + struct.pack("!H", 3000) + b"X" * 2000
    with pytest.raises(KeyMethodError, match="exceeds the 2048-byte limit") as exc:
        KeyMethod2.decode_prefix(huge, False)
    assert not isinstance(exc.value, KeyMethodTruncated)


def _string(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def _client_wire(options: bytes = CLIENT_OCC.encode() + b"\0", user: bytes = b"",
                 pw: bytes = b"", pi: bytes = b"", method: int = 2) -> bytes:
    return (b"\0\0\0\0" + bytes([method]) + bytes(48 + 64) + _string(options) + _string(user)
            + _string(pw) + _string(pi))


@pytest.mark.parametrize("wire,field,text", [
    (b"\0\0\0", "header", "truncated"),
    (_client_wire(method=1), "key method", "unsupported key method"),
    (_client_wire()[:40], "pre_master", "truncated"),
    (_client_wire(options=b""), "options", "absent"),
    (_client_wire(options=b"V4" * 300 + b"\0"), "options", "limit of 512"),
    (_client_wire(options=b"V4,x"), "options", "not NUL-terminated"),
    (_client_wire(user=b"a" * 128 + b"\0"), "username", "129 bytes"),
    (_client_wire(pw=b"a\0b\0"), "password", "embedded NUL"),
    (_client_wire()[:-1], "peer-info", "truncated"),
])
def test_decode_errors_name_the_field(wire: bytes, field: str, text: str) -> None:
    with pytest.raises(KeyMethodError, match=text) as exc:
        KeyMethod2.decode(wire, client_sent=True)
    assert exc.value.field == field
    assert isinstance(exc.value, RemoteProtocolError)


def test_key_method_flags_in_high_bits_are_accepted() -> None:
    km = KeyMethod2.decode(_client_wire(method=0x12), client_sent=True)
    assert km.options == CLIENT_OCC


def test_encode_limits() -> None:
    with pytest.raises(ValidationError, match="username is 129 bytes"):
        KeyMethod2(CLIENT_SRC, CLIENT_OCC, "u" * 128, "p").encode(True)
    with pytest.raises(ValidationError, match="limit is 512"):
        KeyMethod2(CLIENT_SRC, "V" * 512).encode(True)
    with pytest.raises(ValidationError, match="2048"):
        KeyMethod2(CLIENT_SRC, CLIENT_OCC, None, None, "X=" + "y" * 2000).encode(True)
    with pytest.raises(ValidationError, match="pre_master"):
        KeyMethod2(SERVER_SRC, SERVER_OCC).encode(client=True)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_decode_only_documented_errors(data: bytes, client_sent: bool) -> None:
    try:
        KeyMethod2.decode(data, client_sent)
    except KeyMethodError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_fuzz_mutated_valid_message(noise: bytes, pos: int) -> None:
    wire = bytearray(KeyMethod2(CLIENT_SRC, CLIENT_OCC, "u", "p", STOCK_PEER_INFO).encode(True))
    wire[pos:pos + len(noise)] = noise
    try:
        km = KeyMethod2.decode(bytes(wire), True)
    except KeyMethodError:
        return
    try:
        PeerInfo.parse(km.peer_info)
    except KeyMethodError:
        pass


def test_peer_info_parse_build_stock() -> None:
    pi = PeerInfo.parse(STOCK_PEER_INFO)
    assert pi.version == "2.6.14" and pi.platform == "linux" and pi.tcpnl and pi.mtu == 1600
    assert pi.ncp is None and pi.ciphers == ("AES-256-GCM", "CHACHA20-POLY1305")
    assert pi.proto == 990
    assert pi.proto == (IVProto.DATA_V2 | IVProto.REQUEST_PUSH | IVProto.TLS_KEY_EXPORT
                        | IVProto.AUTH_PENDING_KW | IVProto.DNS_OPTION | IVProto.CC_EXIT_NOTIFY
                        | IVProto.AUTH_FAIL_TEMP | IVProto.DYN_TLS_CRYPT)
    assert IVProto.NCP_P2P not in pi.proto
    assert pi.build() == STOCK_PEER_INFO
    assert len(STOCK_PEER_INFO) == 151


def test_peer_info_for_python_client() -> None:
    proto = IVProto.DATA_V2 | IVProto.REQUEST_PUSH | IVProto.CC_EXIT_NOTIFY
    pi = PeerInfo.for_client(version="2.6.0", platform="linux",
                             ciphers=["AES-256-GCM", "AES-128-GCM"], proto=proto)
    assert pi.build() == ("IV_VER=2.6.0\nIV_PLAT=linux\nIV_TCPNL=1\nIV_NCP=2\n"
                          "IV_CIPHERS=AES-256-GCM:AES-128-GCM\nIV_PROTO=134\n")
    only_chacha = PeerInfo.for_client(version="2.6.0", platform="freebsd",
                                      ciphers=["CHACHA20-POLY1305"], proto=proto, mtu=1500)
    assert "IV_NCP" not in only_chacha.build() and "IV_MTU=1500\n" in only_chacha.build()
    with pytest.raises(ValidationError, match="DATA_V2"):
        PeerInfo.for_client(version="x", platform="linux", ciphers=[],
                            proto=IVProto.REQUEST_PUSH)


def test_peer_info_bad_numbers() -> None:
    with pytest.raises(KeyMethodError, match="IV_PROTO='x2' is not a decimal"):
        PeerInfo.parse("IV_PROTO=x2\n")
    with pytest.raises(KeyMethodError, match="IV_MTU"):
        PeerInfo.parse("IV_MTU=99999999999999999999\n")
    assert PeerInfo.parse("garbage line\nIV_PLAT=win\r\n").platform == "win"
    assert PeerInfo.parse(None).proto == 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_peer_info_parse(text: str) -> None:
    try:
        PeerInfo.parse(text)
    except KeyMethodError:
        pass


SERVER_CIPHERS = "AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305"


def test_choose_cipher_ncp() -> None:
    assert choose_cipher(SERVER_CIPHERS, STOCK_PEER_INFO, None) == "AES-256-GCM"
    assert choose_cipher(["CHACHA20-POLY1305", "AES-256-GCM"], STOCK_PEER_INFO,
                         None) == "CHACHA20-POLY1305"
    # Case-insensitive match, server spelling returned.
    assert choose_cipher(["CHACHA20-POLY1305"], "IV_CIPHERS=ChaCha20-Poly1305\n",
                         None) == "CHACHA20-POLY1305"
    # Legacy IV_NCP=2 without IV_CIPHERS: the two GCM ciphers.
    assert choose_cipher(["CHACHA20-POLY1305", "AES-128-GCM"], "IV_NCP=2\n",
                         None) == "AES-128-GCM"
    # No IV_CIPHERS: the OCC cipher is acceptable.
    assert choose_cipher(SERVER_CIPHERS, "IV_PROTO=2\n", None,
                         remote_cipher="CHACHA20-POLY1305") == "CHACHA20-POLY1305"
    # IV_CIPHERS present: the OCC cipher is ignored.
    with pytest.raises(CipherNegotiationError, match="no shared cipher"):
        choose_cipher(["AES-128-GCM"], "IV_CIPHERS=AES-256-GCM\n", "AES-128-GCM",
                      remote_cipher="AES-128-GCM")


def test_choose_cipher_fallback() -> None:
    assert choose_cipher(SERVER_CIPHERS, None, "AES-256-GCM") == "AES-256-GCM"
    assert choose_cipher(SERVER_CIPHERS, PeerInfo(), "none") == "none"
    with pytest.raises(CipherNegotiationError, match="no data-ciphers-fallback"):
        choose_cipher(SERVER_CIPHERS, "IV_PROTO=2\n", None)
    # Client named a cipher we do not have: no fallback (it would not accept it).
    with pytest.raises(CipherNegotiationError, match="client uses cipher 'BF-CBC'"):
        choose_cipher(SERVER_CIPHERS, None, "AES-256-GCM", remote_cipher="BF-CBC")
    # Client with a known list that does not intersect: AUTH_FAILED, not fallback.
    with pytest.raises(CipherNegotiationError, match="client supports 'AES-192-GCM'"):
        choose_cipher(SERVER_CIPHERS, "IV_CIPHERS=AES-192-GCM\n", "AES-256-GCM")
