"""Key derivation: the PRF vector of the spec, key sources and the NEW_KEY slices."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from bsd_ovpn.errors import LocalProtocolError, ValidationError
from bsd_ovpn.ifovpn import CIPHER_KEY_SIZES
from bsd_ovpn.proto.keys import (EKM_LABEL, DataKeys, KeySource, derive_key2_prf, prf,
                                 split_key2)

SECRET = (b"Lorem ipsum dolor sit amet, consectetur adipisici elit, sed eiusmod tempor "
          b"incidunt ut labore et dolore magna aliqua.")
SEED = b"Quis aute iure reprehenderit in voluptate velit esse cillum dolore"


def test_prf_vector_from_spec() -> None:
    assert len(SECRET) == 117
    assert prf(SECRET, SEED, 32).hex() == (
        "d98c8518c85e946927916acfc2d592fbb1567e4b4b1459e6a904ac2ddab72d67")


def _p_hash_ref(name: str, secret: bytes, seed: bytes, n: int) -> bytes:
    # Written out a second time, differently (precomputed A(i) list), to catch
    # an off-by-one in the chaining of the module's version.
    a = [seed]
    for _ in range(n // 16 + 2):
        a.append(hmac.new(secret, a[-1], name).digest())
    return b"".join(hmac.new(secret, ai + seed, name).digest() for ai in a[1:])[:n]


@pytest.mark.parametrize("slen", [0, 1, 2, 47, 48, 117])
@pytest.mark.parametrize("n", [0, 1, 20, 48, 256])
def test_prf_matches_reference_split(slen: int, n: int) -> None:
    secret = bytes(range(slen))
    half = (slen + 1) // 2
    ref = bytes(x ^ y for x, y in zip(_p_hash_ref("md5", secret[:half], SEED, n),
                                     _p_hash_ref("sha1", secret[slen - half:], SEED, n)))
    assert prf(secret, SEED, n) == ref


def test_key_source_generate_and_validation() -> None:
    c = KeySource.generate(client=True)
    s = KeySource.generate(client=False)
    assert len(c.pre_master) == 48 and len(c.random1) == 32 and len(c.random2) == 32
    assert s.pre_master == b""
    assert c.random1 != s.random1
    assert "pre_master" not in repr(c) and c.random1.hex() not in repr(c)
    with pytest.raises(ValidationError, match="randoms"):
        KeySource(b"", b"x" * 31, b"y" * 32)
    with pytest.raises(ValidationError, match="pre_master"):
        KeySource(b"z" * 47, b"x" * 32, b"y" * 32)


def test_derive_key2_prf_structure() -> None:
    c = KeySource(bytes([1]) * 48, bytes([2]) * 32, bytes([3]) * 32)
    s = KeySource(b"", bytes([4]) * 32, bytes([5]) * 32)
    csid, ssid = bytes.fromhex("0102030405060708"), bytes.fromhex("1112131415161718")
    key2 = derive_key2_prf(c, s, csid, ssid)
    master = prf(c.pre_master, b"OpenVPN master secret" + c.random1 + s.random1, 48)
    assert key2 == prf(master, b"OpenVPN key expansion" + c.random2 + s.random2 + csid + ssid,
                       256)
    assert len(key2) == 256
    # Every input matters.
    assert derive_key2_prf(c, s, ssid, csid) != key2
    s2 = KeySource(b"", bytes([4]) * 32, bytes([6]) * 32)
    assert derive_key2_prf(c, s2, csid, ssid) != key2
    with pytest.raises(LocalProtocolError):
        derive_key2_prf(s, c, csid, ssid)
    with pytest.raises(ValidationError, match="session id"):
        derive_key2_prf(c, s, csid[:7], ssid)


def test_ekm_label() -> None:
    assert EKM_LABEL == b"EXPORTER-OpenVPN-datakeys"


KEY2 = bytes(range(256))


@pytest.mark.parametrize("cipher", sorted(CIPHER_KEY_SIZES))
def test_split_key2_slices(cipher: str) -> None:
    klen = CIPHER_KEY_SIZES[cipher]
    ivlen = 8 if klen else 0
    srv = split_key2(KEY2, cipher, server=True, key_id=3)
    cli = split_key2(KEY2, cipher, server=False, key_id=3)
    # dco spec §3.3: server TX key2[128:], TX iv key2[192:200]; RX key2[0:], iv key2[64:72].
    assert srv.encrypt_key == KEY2[128:128 + klen]
    assert srv.encrypt_iv == KEY2[192:192 + ivlen]
    assert srv.decrypt_key == KEY2[0:klen]
    assert srv.decrypt_iv == KEY2[64:64 + ivlen]
    # Mirrored on the client.
    assert (cli.encrypt_key, cli.encrypt_iv) == (srv.decrypt_key, srv.decrypt_iv)
    assert (cli.decrypt_key, cli.decrypt_iv) == (srv.encrypt_key, srv.encrypt_iv)
    assert srv.cipher == cipher and srv.key_id == 3


def test_split_key2_none_is_empty() -> None:
    k = split_key2(KEY2, "none", server=False, key_id=0)
    assert k.encrypt_key == k.encrypt_iv == k.decrypt_key == k.decrypt_iv == b""


def test_split_key2_rejects_bad_input() -> None:
    with pytest.raises(ValidationError, match="key2 must be 256"):
        split_key2(KEY2[:255], "AES-256-GCM", server=True, key_id=0)
    with pytest.raises(ValidationError, match="unknown data cipher 'aes-256-gcm'"):
        split_key2(KEY2, "aes-256-gcm", server=True, key_id=0)
    with pytest.raises(ValidationError, match="key_id"):
        split_key2(KEY2, "AES-256-GCM", server=True, key_id=8)


def test_data_keys_validates_lengths_and_hides_keys() -> None:
    with pytest.raises(ValidationError, match="encrypt_key for AES-128-GCM must be 16"):
        DataKeys("AES-128-GCM", 0, b"k" * 32, b"i" * 8, b"k" * 16, b"i" * 8)
    with pytest.raises(ValidationError, match="decrypt_iv"):
        DataKeys("AES-128-GCM", 0, b"k" * 16, b"i" * 8, b"k" * 16, b"i" * 12)
    k = split_key2(KEY2, "AES-256-GCM", server=True, key_id=1)
    assert KEY2[128:160].hex() not in repr(k)
    assert hashlib.sha256(k.encrypt_key).digest() != hashlib.sha256(k.decrypt_key).digest()


def test_prf_key2_matches_stock_openvpn_server() -> None:
    """Real vector: stock OpenVPN 2.6.14 server (verb 9) and our client without EKM.

    Key sources, both session ids (the server's is its stateless cookie) and the
    resulting keys are the server's own log lines: "Outgoing/Incoming Data Channel:
    CIPHER KEY" and the implicit IV tail of its "ENCRYPT IV" line.
    """
    h = bytes.fromhex
    client = KeySource(
        h("02affa704759cd964210aaeb62e87cbd5b93cde8c96ba9291a690d083446d6e8"
          "c6363f4a7d4223a60ab907f676e9624e"),
        h("9ad5d331ae845fb581913ae743ce379ce0090e9d8f9c6b3bb57c625b1a4ebc52"),
        h("9041f3e81669464e38d1ba563b61323b89a0f4a4a8f633c33ea7d61a78effb8d"))
    server = KeySource(
        b"",
        h("f0d227d0a905eb9e1c17a8fa7df4ca578f4fbe9a9dfc0174f5c93d735f5ca40e"),
        h("2093209c11d0e15c1dc398ff33b610993c7746119a8c7c51fbd1ac2351ff3d0e"))
    key2 = derive_key2_prf(client, server, h("fa18c7bcae50b7fa"), h("88f4d2147ab0cbd1"))
    srv = split_key2(key2, "AES-256-GCM", server=True, key_id=0)
    assert srv.encrypt_key.hex() == (
        "25b5768bcca377a450b8e761a9dce87d443e5483591b85c74bbb71d05e92aaa5")   # Outgoing
    assert srv.encrypt_iv.hex() == "9683cd8e1a10dd25"                          # ENCRYPT IV
    assert srv.decrypt_key.hex() == (
        "458ca4480250e8f210bad40b0d0b48c60783a6f640d9b40b85367162dd860908")   # Incoming
