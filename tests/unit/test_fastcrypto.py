"""The prepared AES-CTR / HMAC helpers give exactly what cryptography / hmac give."""
from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings, strategies as st

from bsd_ovpn.proto.fastcrypto import CtrKey, hmac_digest


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
