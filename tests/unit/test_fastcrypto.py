"""The prepared AES-CTR / HMAC helpers give exactly what cryptography / hmac give.

CtrHmacKey (tls-crypt's SIV construction) is checked on both paths: the C one
(cdefs/ctlcrypt.c) and the pure one must give identical bytes, match an
independent hmac + cryptography computation, and reject every single-bit
change of a sealed packet.
"""
from __future__ import annotations

import hmac
import os
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings, strategies as st

from bsd_ovpn.binding import CtlCryptError, ctlcrypt_available
from bsd_ovpn.errors import ValidationError
from bsd_ovpn.proto import fastcrypto, keyfile, wrap
from bsd_ovpn.proto.fastcrypto import (
    CtlCryptAuthError, CtrHmacKey, CtrKey, NativeCtrHmacKey, PureCtrHmacKey, hmac_digest,
)
from bsd_ovpn.proto.keyfile import StaticKey, TLSCryptV2ServerKey, timestamp_metadata
from bsd_ovpn.proto.packet import ControlPacket, Opcode


def _reference_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), iv=st.binary(min_size=16, max_size=16),
       data=st.binary(max_size=1400))
def test_ctr_key_matches_cryptography_and_is_reusable(key, iv, data):
    k = CtrKey(key)
    once = k.apply(iv, data)
    assert once == _reference_ctr(key, iv, data)
    assert k.apply(iv, once) == data                 # the same object, again: decrypts


def test_ctr_counter_wraps_like_openssl():
    key, iv = bytes(range(32)), (2 ** 128 - 2).to_bytes(16, "big")
    data = bytes(100)
    assert CtrKey(key).apply(iv, data) == _reference_ctr(key, iv, data)


@settings(max_examples=200, deadline=None)
@given(key=st.binary(max_size=200), msg=st.binary(max_size=600),
       digest=st.sampled_from(["sha1", "sha256", "sha512"]))
def test_hmac_digest_matches_hmac_new(key, msg, digest):
    assert hmac_digest(key, msg, digest) == hmac.new(key, msg, digest).digest()


# ---- CtrHmacKey: native (cdefs/ctlcrypt.c) and pure paths, byte for byte ----


def _native_or_skip() -> type:
    """NativeCtrHmacKey; outside CI an unbuilt module skips, in CI it fails."""
    if not ctlcrypt_available():
        reason = "bsd_ovpn._native is not built with cdefs/ctlcrypt.c (pip install -e .)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return NativeCtrHmacKey


@pytest.fixture(params=["pure", "native"])
def impl(request):
    return PureCtrHmacKey if request.param == "pure" else _native_or_skip()


def _reference_seal(enc_key: bytes, hmac_key: bytes, header: bytes, plain: bytes) -> bytes:
    tag = hmac.new(hmac_key, header + plain, "sha256").digest()
    return tag + _reference_ctr(enc_key, tag[:16], plain)


# Computed once with hmac.new + cryptography's AES-CTR (see _reference_seal).
KAT_ENC, KAT_MAC = bytes(range(32)), bytes(range(32, 64))
KAT_HEADER = bytes.fromhex("380102030405060708000000011234abcd")
KAT_PLAIN = b"control channel plaintext, 41 bytes long"
KAT_SEALED = bytes.fromhex(
    "c7e76148a322d8d60f0fa0a10b9dcfd59ce16c0e2d80532f7d6d29baf288e14a"
    "82cf74dc82450c5b6b81cea63057338d7dbdbf401d48b59f7bf563b86b666f75db33cb53445b167b")


def test_known_answer(impl):
    k = impl(KAT_ENC, KAT_MAC)
    assert k.seal(KAT_HEADER, KAT_PLAIN) == KAT_SEALED
    assert k.open(KAT_HEADER, KAT_SEALED[:32], KAT_SEALED[32:]) == KAT_PLAIN
    assert _reference_seal(KAT_ENC, KAT_MAC, KAT_HEADER, KAT_PLAIN) == KAT_SEALED


def test_default_is_native_when_built():
    assert fastcrypto.NATIVE == ctlcrypt_available()
    assert CtrHmacKey is (NativeCtrHmacKey if ctlcrypt_available() else PureCtrHmacKey)


@settings(max_examples=300, deadline=None)
@given(enc=st.binary(min_size=32, max_size=32), mac=st.binary(min_size=32, max_size=32),
       header=st.binary(max_size=64), plain=st.binary(max_size=1600))
def test_native_and_pure_give_identical_bytes(enc, mac, header, plain):
    native = _native_or_skip()(enc, mac)
    pure = PureCtrHmacKey(enc, mac)
    sealed = native.seal(header, plain)
    assert sealed == pure.seal(header, plain) == _reference_seal(enc, mac, header, plain)
    assert native.open(header, sealed[:32], sealed[32:]) == plain
    assert pure.open(header, sealed[:32], sealed[32:]) == plain


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=300)),
                     min_size=2, max_size=12))
def test_one_key_object_many_packets_of_odd_sizes(msgs):
    """The C contexts are reused: a partial CTR block or HMAC state must not leak into the next."""
    enc, mac = os.urandom(32), os.urandom(32)
    native, pure = _native_or_skip()(enc, mac), PureCtrHmacKey(enc, mac)
    for header, plain in msgs:
        sealed = native.seal(header, plain)
        assert sealed == pure.seal(header, plain)
        assert native.open(header, sealed[:32], sealed[32:]) == plain


def test_every_single_bit_flip_fails_authentication(impl):
    k = impl(KAT_ENC, KAT_MAC)
    blob = KAT_HEADER + KAT_SEALED          # header || tag || ct, as on the wire
    h, t = len(KAT_HEADER), len(KAT_HEADER) + 32
    for bit in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CtlCryptAuthError, match="authentication failed"):
            k.open(bytes(bad[:h]), bytes(bad[h:t]), bytes(bad[t:]))
    # a wrong key, and a truncated or extended ciphertext, fail as well
    with pytest.raises(CtlCryptAuthError):
        impl(KAT_ENC, bytes(32)).open(KAT_HEADER, KAT_SEALED[:32], KAT_SEALED[32:])
    for ct in (KAT_SEALED[32:-1], KAT_SEALED[32:] + b"\0", b""):
        with pytest.raises(CtlCryptAuthError):
            k.open(KAT_HEADER, KAT_SEALED[:32], ct)
    assert k.open(KAT_HEADER, KAT_SEALED[:32], KAT_SEALED[32:]) == KAT_PLAIN


def test_empty_header_and_plain(impl):
    k = impl(KAT_ENC, KAT_MAC)
    for header, plain in ((b"", b""), (b"", b"x"), (b"hdr", b"")):
        sealed = k.seal(header, plain)
        assert sealed == _reference_seal(KAT_ENC, KAT_MAC, header, plain)
        assert k.open(header, sealed[:32], sealed[32:]) == plain


def test_bad_lengths_are_validation_errors(impl):
    with pytest.raises(ValidationError, match="AES-256-CTR key must be 32 bytes, got 31"):
        impl(bytes(31), bytes(32))
    with pytest.raises(ValidationError, match="HMAC-SHA256 key must be 32 bytes, got 64"):
        impl(bytes(32), bytes(64))
    k = impl(KAT_ENC, KAT_MAC)
    with pytest.raises(ValidationError, match="tag must be 32 bytes, got 16"):
        k.open(KAT_HEADER, KAT_SEALED[:16], KAT_SEALED[32:])
    assert issubclass(CtlCryptAuthError, CtlCryptError)


def test_accepts_bytes_like(impl):
    k = impl(bytearray(KAT_ENC), memoryview(KAT_MAC))
    assert k.seal(bytearray(KAT_HEADER), memoryview(KAT_PLAIN)) == KAT_SEALED
    assert k.open(memoryview(KAT_HEADER), bytearray(KAT_SEALED[:32]),
                  bytearray(KAT_SEALED[32:])) == KAT_PLAIN


def test_native_key_is_safe_across_threads():
    k = _native_or_skip()(KAT_ENC, KAT_MAC)
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(400):
            plain = bytes([n]) * (i % 97)
            header = bytes([i & 0xFF]) * (n + 1)
            sealed = k.seal(header, plain)
            if sealed != _reference_seal(KAT_ENC, KAT_MAC, header, plain) or \
                    k.open(header, sealed[:32], sealed[32:]) != plain:
                errors.append(f"thread {n} packet {i}")
                return

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_tls_crypt_and_wkc_same_bytes_on_both_paths(monkeypatch):
    """TLSCrypt wrap/unwrap and WKc wrap/unwrap give the same bytes natively and in Python."""
    _native_or_skip()
    raw, sk_raw = os.urandom(256), os.urandom(128)
    kc, meta = StaticKey(os.urandom(256)), timestamp_metadata(1_700_000_000)
    pkt = ControlPacket(Opcode.P_CONTROL_V1, 0, bytes(range(8)), message_id=3,
                        payload=os.urandom(300)).encode()
    out = {}
    for name, cls in (("native", NativeCtrHmacKey), ("pure", PureCtrHmacKey)):
        monkeypatch.setattr(keyfile, "CtrHmacKey", cls)
        key = StaticKey(raw)                  # prepared keys are kept per StaticKey
        sk = TLSCryptV2ServerKey(sk_raw)      # ... and per server key
        tx, rx = wrap.TLSCrypt(key, server=True), wrap.TLSCrypt(key, server=False)
        assert isinstance(key.tls_crypt_keys(True)[0], cls) and isinstance(sk.wkc_key(), cls)
        w = tx.wrap(pkt, 1_700_000_000.0)
        assert rx.unwrap(w, 1_700_000_000.0) == pkt
        bad = bytearray(w)
        bad[-1] ^= 1
        with pytest.raises(wrap.WrapError, match="tls-crypt authentication failed"):
            rx.unwrap(bytes(bad), 1_700_000_000.0)
        wkc = keyfile.wrap_client_key(sk, kc, meta)
        assert keyfile.unwrap_client_key(sk, wkc) == (kc, meta)
        with pytest.raises(keyfile.WKcError, match="does not authenticate"):
            keyfile.unwrap_client_key(sk, wkc[:40] + bytes([wkc[40] ^ 1]) + wkc[41:])
        out[name] = (w, wkc)
    assert out["native"] == out["pure"]


def test_wraps_of_one_key_share_its_prepared_keys():
    """Every session of a server wraps with its one --tls-crypt key: one prepared pair
    per side for all of them (memory per client), and replay state stays per wrap."""
    key = StaticKey(os.urandom(256))
    a, b = wrap.TLSCrypt(key, server=True), wrap.TLSCrypt(key, server=True)
    peer = wrap.TLSCrypt(key, server=False)
    pkt = ControlPacket(Opcode.P_CONTROL_V1, 0, bytes(range(8)), message_id=1,
                        payload=b"x" * 40).encode()
    wa, wb = a.wrap(pkt, 1_700_000_000.0), b.wrap(pkt, 1_700_000_000.0)
    assert wa == wb                               # same packet id 1 in each wrap's own state
    assert peer.unwrap(wa, 1_700_000_000.0) == pkt
    with pytest.raises(wrap.WrapError):           # ...but the peer's replay window remembers it
        peer.unwrap(wb, 1_700_000_000.0)
    assert a._keys is b._keys is key.tls_crypt_keys(True)          # noqa: SLF001
    assert peer._keys is key.tls_crypt_keys(False) is not a._keys  # noqa: SLF001
    assert StaticKey(key.data).tls_crypt_keys(True) is not a._keys  # noqa: SLF001
