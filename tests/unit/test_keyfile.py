"""Key files: OpenVPN's exact text formats, WKc wrap/unwrap, and keys made by the real openvpn."""
from __future__ import annotations

import base64
import logging
import os
import shutil
import struct
import subprocess

import pytest

from bsd_ovpn.errors import ConfigError, RemoteProtocolError
from bsd_ovpn.proto.keyfile import (
    MAX_METADATA_LEN, METADATA_TYPE_TIMESTAMP, METADATA_TYPE_USER, KeyFileError, StaticKey,
    TLSCryptV2ClientKey, TLSCryptV2ServerKey, WKcError, describe_metadata, genkey,
    generate_tls_crypt_v2_client_key, key_indices, parse_tls_crypt_v2_key, timestamp_metadata,
    unwrap_client_key, user_metadata, wrap_client_key,
)

KEY = bytes(range(256))


def test_static_key_format_is_openvpns():
    text = StaticKey(KEY).format()
    lines = text.split("\n")
    assert lines[:4] == ["#", "# 2048 bit OpenVPN static key", "#",
                         "-----BEGIN OpenVPN Static key V1-----"]
    assert lines[4] == "000102030405060708090a0b0c0d0e0f"
    assert len(lines[4:20]) == 16 and all(len(x) == 32 for x in lines[4:20])
    assert lines[20] == "-----END OpenVPN Static key V1-----"
    assert text.endswith("-----\n")
    assert StaticKey.parse(text) == StaticKey(KEY)


def test_static_key_slots():
    k = StaticKey(KEY)
    assert k.cipher(0) == KEY[0:64] and k.hmac(0) == KEY[64:128]
    assert k.cipher(1) == KEY[128:192] and k.hmac(1) == KEY[192:256]
    with pytest.raises(IndexError):
        k.cipher(2)
    assert "000102" not in repr(k)


def test_key_indices():
    assert key_indices(None) == (0, 0)
    assert key_indices(0) == (0, 1)
    assert key_indices(1) == (1, 0)
    with pytest.raises(ValueError):
        key_indices(2)


def test_static_key_parse_tolerates_comments_and_spacing():
    body = KEY.hex()
    text = ("# a comment\nsomething else\n-----BEGIN OpenVPN Static key V1-----\n"
            + " ".join(body[i:i + 64] for i in range(0, len(body), 64)).replace(" ", "\n  ")
            + "\n-----END OpenVPN Static key V1-----\n")
    assert StaticKey.parse(text).data == KEY
    assert StaticKey.parse(StaticKey(KEY).format().upper().replace("OPENVPN STATIC KEY V1",
                                                                    "OpenVPN Static key V1")
                           .replace("BIT OPENVPN", "bit OpenVPN")).data == KEY


@pytest.mark.parametrize("mutate,fragment", [
    (lambda t: t.replace("-----BEGIN OpenVPN Static key V1-----", ""), "no '-----BEGIN"),
    (lambda t: t.replace("-----END OpenVPN Static key V1-----", ""), "no '-----END"),
    (lambda t: t.replace("-----END OpenVPN Static key V1-----", "-----END garbage-----"),
     "expected"),
    (lambda t: t.replace("000102030405060708090a0b0c0d0e0f", "000102030405060708090a0b0c0d0e0g"),
     "non-hex character 'g'"),
    (lambda t: t.replace("000102030405060708090a0b0c0d0e0f\n", ""), "has 240 bytes"),
    (lambda t: t.replace("000102030405060708090a0b0c0d0e0f", "000102030405060708090a0b0c0d0e0"),
     "needs 256"),
    (lambda t: t.replace("000102030405060708090a0b0c0d0e0f", "000102030405060708090a0b0c0d0e0f00"),
     "more than 256"),
])
def test_static_key_parse_errors(mutate, fragment):
    with pytest.raises(KeyFileError) as info:
        StaticKey.parse(mutate(StaticKey(KEY).format()), "ta.key")
    assert fragment in str(info.value)
    assert str(info.value).startswith("ta.key:")
    assert isinstance(info.value, ConfigError)


def test_non_hex_error_names_line(tmp_path):
    p = tmp_path / "k.key"
    p.write_text(StaticKey(KEY).format().replace("101112", "10x112"))
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError) as info:
        StaticKey.load(p)
    assert info.value.path == str(p) and info.value.line == 6


def test_save_load_and_permission_warning(tmp_path, caplog):
    k = StaticKey.generate()
    p = tmp_path / "tc.key"
    k.save(p)
    assert (os.stat(p).st_mode & 0o777) == 0o600
    with caplog.at_level(logging.WARNING, logger="bsd_ovpn.proto.keyfile"):
        assert StaticKey.load(p) == k
    assert not caplog.records
    os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, logger="bsd_ovpn.proto.keyfile"):
        assert StaticKey.load(p) == k
    assert any("group or others" in r.getMessage() for r in caplog.records)


def test_missing_file_is_keyfile_error(tmp_path):
    with pytest.raises(KeyFileError) as info:
        StaticKey.load(tmp_path / "nope.key")
    assert "nope.key" in str(info.value)


def test_server_key_pem_roundtrip():
    sk = TLSCryptV2ServerKey(bytes(range(128)))
    text = sk.format()
    assert text.startswith("-----BEGIN OpenVPN tls-crypt-v2 server key-----\n")
    assert text.endswith("-----END OpenVPN tls-crypt-v2 server key-----\n")
    body = text.splitlines()[1:-1]
    assert [len(x) for x in body] == [64, 64, 44]
    assert TLSCryptV2ServerKey.parse(text) == sk
    assert sk.cipher_key == bytes(range(32)) and sk.hmac_key == bytes(range(64, 96))
    assert parse_tls_crypt_v2_key(text) == sk


def test_server_key_wrong_size_and_name():
    bad = "-----BEGIN OpenVPN tls-crypt-v2 server key-----\n" + \
        base64.b64encode(bytes(100)).decode() + "\n-----END OpenVPN tls-crypt-v2 server key-----\n"
    with pytest.raises(KeyFileError, match="100 bytes"):
        TLSCryptV2ServerKey.parse(bad, "srv.key")
    with pytest.raises(KeyFileError, match="no '-----BEGIN OpenVPN tls-crypt-v2 server key"):
        TLSCryptV2ServerKey.parse(StaticKey(KEY).format())
    with pytest.raises(KeyFileError, match="neither"):
        parse_tls_crypt_v2_key(StaticKey(KEY).format())
    with pytest.raises(KeyFileError, match="base64"):
        TLSCryptV2ServerKey.parse(bad.replace("AAAA", "A*AA", 1))


def test_wkc_roundtrip_default_size_299():
    sk = TLSCryptV2ServerKey.generate()
    kc = StaticKey.generate()
    meta = timestamp_metadata(1_700_000_000)
    wkc = wrap_client_key(sk, kc, meta)
    assert len(wkc) == 299 and wkc[-2:] == b"\x01\x2b"
    kc2, meta2 = unwrap_client_key(sk, wkc)
    assert kc2 == kc and meta2 == meta
    assert describe_metadata(meta2) == (METADATA_TYPE_TIMESTAMP, 1_700_000_000)


def test_wkc_user_metadata_limits():
    sk = TLSCryptV2ServerKey.generate()
    kc = StaticKey.generate()
    meta = user_metadata(b"x" * (MAX_METADATA_LEN - 1))
    wkc = wrap_client_key(sk, kc, meta)
    assert len(wkc) == 1024
    assert unwrap_client_key(sk, wkc) == (kc, meta)
    assert describe_metadata(meta)[0] == METADATA_TYPE_USER
    with pytest.raises(KeyFileError, match="too long"):
        user_metadata(b"x" * MAX_METADATA_LEN)
    with pytest.raises(KeyFileError):
        wrap_client_key(sk, kc, b"")
    with pytest.raises(KeyFileError):
        wrap_client_key(sk, kc, b"\x00" * (MAX_METADATA_LEN + 1))


def test_wkc_unwrap_failures():
    sk = TLSCryptV2ServerKey.generate()
    kc = StaticKey.generate()
    wkc = wrap_client_key(sk, kc, timestamp_metadata(0))
    with pytest.raises(WKcError, match="does not authenticate"):
        unwrap_client_key(TLSCryptV2ServerKey.generate(), wkc)
    for i in (0, 40, 290):
        bad = bytearray(wkc)
        bad[i] ^= 1
        with pytest.raises(WKcError):
            unwrap_client_key(sk, bytes(bad))
    with pytest.raises(WKcError, match="length field"):
        unwrap_client_key(sk, wkc[:-3] + wkc[-2:])
    with pytest.raises(WKcError, match="shorter"):
        unwrap_client_key(sk, b"\x00\x05abc")
    with pytest.raises(WKcError, match="more than 1024"):
        unwrap_client_key(sk, bytes(1100))
    assert issubclass(WKcError, RemoteProtocolError)


def test_client_key_pem_roundtrip_and_genkey():
    sk = TLSCryptV2ServerKey.generate()
    text = genkey("tls-crypt-v2-client", server_key=sk, now=1234)
    ck = TLSCryptV2ClientKey.parse(text)
    assert len(ck.wkc) == 299
    assert unwrap_client_key(sk, ck.wkc) == (ck.kc, timestamp_metadata(1234))
    assert TLSCryptV2ClientKey.parse(ck.format()) == ck
    assert parse_tls_crypt_v2_key(text) == ck
    text2 = genkey("tls-crypt-v2-client", server_key=sk,
                   metadata_b64=base64.b64encode(b"alice").decode())
    ck2 = TLSCryptV2ClientKey.parse(text2)
    assert unwrap_client_key(sk, ck2.wkc)[1] == b"\x00alice"
    with pytest.raises(KeyFileError, match="base64"):
        genkey("tls-crypt-v2-client", server_key=sk, metadata_b64="!!!")
    with pytest.raises(KeyFileError, match="server key"):
        genkey("tls-crypt-v2-client")
    with pytest.raises(KeyFileError, match="unknown genkey kind"):
        genkey("bogus")
    for kind in ("tls-crypt", "tls-auth", "secret"):
        assert len(StaticKey.parse(genkey(kind)).data) == 256
    assert len(TLSCryptV2ServerKey.parse(genkey("tls-crypt-v2-server")).data) == 128


def test_client_key_bad_wkc():
    kc = StaticKey(KEY)
    with pytest.raises(KeyFileError):
        TLSCryptV2ClientKey(kc, b"\x00" * 10)
    pem = ("-----BEGIN OpenVPN tls-crypt-v2 client key-----\n"
           + base64.b64encode(KEY).decode()
           + "\n-----END OpenVPN tls-crypt-v2 client key-----\n")
    with pytest.raises(KeyFileError, match="no wrapped key"):
        TLSCryptV2ClientKey.parse(pem, "cli.key")


# --- against keys made by the real openvpn -------------------------------------------------

def _openvpn(*args: str, cwd) -> None:
    subprocess.run(["openvpn", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def real_keys(tmp_path):
    if shutil.which("openvpn") is None:
        pytest.skip("needs openvpn")
    _openvpn("--genkey", "tls-crypt", "tc.key", cwd=tmp_path)
    _openvpn("--genkey", "tls-auth", "ta.key", cwd=tmp_path)
    _openvpn("--genkey", "tls-crypt-v2-server", "srv.key", cwd=tmp_path)
    _openvpn("--tls-crypt-v2", "srv.key", "--genkey", "tls-crypt-v2-client", "cli.key",
             cwd=tmp_path)
    _openvpn("--tls-crypt-v2", "srv.key", "--genkey", "tls-crypt-v2-client", "meta.key",
             base64.b64encode(b"user=bob").decode(), cwd=tmp_path)
    return tmp_path


@pytest.mark.openvpn
def test_read_real_static_keys_byte_exact(real_keys):
    for name in ("tc.key", "ta.key"):
        text = (real_keys / name).read_text()
        k = StaticKey.load(real_keys / name)
        assert k.format() == text       # our writer reproduces openvpn's file exactly


@pytest.mark.openvpn
def test_read_real_v2_keys_and_unwrap_wkc(real_keys):
    import time
    srv_text = (real_keys / "srv.key").read_text()
    sk = TLSCryptV2ServerKey.load(real_keys / "srv.key")
    assert sk.format() == srv_text
    ck = TLSCryptV2ClientKey.load(real_keys / "cli.key")
    assert ck.format() == (real_keys / "cli.key").read_text()
    raw = base64.b64decode("".join((real_keys / "cli.key").read_text().splitlines()[1:-1]))
    kc, meta = unwrap_client_key(sk, ck.wkc)
    assert kc.data == raw[:256] == ck.kc.data
    typ, stamp = describe_metadata(meta)
    assert typ == METADATA_TYPE_TIMESTAMP and abs(stamp - time.time()) < 120
    assert len(ck.wkc) == 299
    ck2 = TLSCryptV2ClientKey.load(real_keys / "meta.key")
    assert unwrap_client_key(sk, ck2.wkc)[1] == b"\x00user=bob"


@pytest.mark.openvpn
def test_real_openvpn_accepts_our_static_key_file(real_keys):
    # openvpn --genkey tls-crypt-v2-client self-tests loading; use our server key for that
    ours = real_keys / "our_srv.key"
    TLSCryptV2ServerKey.generate().save(ours)
    _openvpn("--tls-crypt-v2", "our_srv.key", "--genkey", "tls-crypt-v2-client", "c2.key",
             cwd=real_keys)
    sk = TLSCryptV2ServerKey.load(ours)
    ck = TLSCryptV2ClientKey.load(real_keys / "c2.key")
    assert unwrap_client_key(sk, ck.wkc)[0] == ck.kc
    assert struct.unpack(">H", ck.wkc[-2:])[0] == len(ck.wkc)
