"""Data-channel key material: the OpenVPN PRF, key sources and the key2 split.

OpenVPN derives a 256-byte ``key2`` per key_state, either with the TLS 1.0 PRF
over the key-method-2 randoms (protocol spec §9.1) or with the RFC 5705
exporter (§9.2, label :data:`EKM_LABEL`).  Both results are cut the same way
(§9.3) into exactly the slices if_ovpn's OVPN_NEW_KEY takes (dco spec §3.3),
so this module ends in :class:`DataKeys`, which the kernel transport, the
userspace engine and :mod:`bsd_ovpn.proto.datachannel` all consume.
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from bsd_ovpn.errors import LocalProtocolError, ValidationError
from bsd_ovpn.ifovpn import CIPHER_KEY_SIZES, IMPLICIT_IV_SIZE, MAX_KEY_ID

__all__ = [
    "EKM_LABEL", "KEY2_SIZE", "PRE_MASTER_SIZE", "RANDOM_SIZE", "SESSION_ID_SIZE",
    "DataKeys", "KeySource", "derive_key2_prf", "prf", "split_key2",
]

#: RFC 5705 exporter label for the data-channel key2 (§9.2).
EKM_LABEL = b"EXPORTER-OpenVPN-datakeys"
KEY2_SIZE = 256
PRE_MASTER_SIZE = 48
RANDOM_SIZE = 32
SESSION_ID_SIZE = 8
MASTER_SECRET_SIZE = 48

_MASTER_LABEL = b"OpenVPN master secret"
_EXPANSION_LABEL = b"OpenVPN key expansion"
# key2 = two "struct key" of 128 bytes: 64-byte cipher slot then 64-byte HMAC slot.
_KEY_SIZE = 128
_HMAC_OFFSET = 64


def _p_hash(digest: str, secret: bytes, seed: bytes, length: int) -> bytes:
    """RFC 2246 §5 P_hash: HMAC chain A(i) = HMAC(secret, A(i-1)), A(0) = seed."""
    out = bytearray()
    a = seed
    while len(out) < length:
        a = hmac.new(secret, a, digest).digest()
        out += hmac.new(secret, a + seed, digest).digest()
    return bytes(out[:length])


def prf(secret: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.0/1.1 PRF: ``P_MD5(S1, seed) XOR P_SHA1(S2, seed)``.

    The secret halves overlap by one byte when its length is odd, exactly as
    RFC 2246 specifies (and OpenVPN's ``ssl_tls1_PRF`` does).  MD5 is used
    as an HMAC inside a PRF here, never as a bare hash, so ``usedforsecurity``
    does not apply; a FIPS-restricted hashlib would raise, which is the same
    limit stock OpenVPN has.
    """
    if length < 0:
        raise ValidationError(f"PRF output length must be >= 0, got {length}")
    half = (len(secret) + 1) // 2
    s1 = secret[:half]
    s2 = secret[len(secret) - half:]
    md5 = _p_hash("md5", s1, seed, length)
    sha1 = _p_hash("sha1", s2, seed, length)
    return bytes(x ^ y for x, y in zip(md5, sha1))


@dataclass(frozen=True)
class KeySource:
    """The random part of one side's key-method-2 message (§8).

    ``pre_master`` exists only on the client (48 bytes); the server sends
    just the two randoms, so its ``pre_master`` is ``b""``.
    """

    pre_master: bytes
    random1: bytes
    random2: bytes

    def __post_init__(self) -> None:
        if len(self.random1) != RANDOM_SIZE or len(self.random2) != RANDOM_SIZE:
            raise ValidationError(
                f"key source randoms must be {RANDOM_SIZE} bytes each, got "
                f"{len(self.random1)} and {len(self.random2)}")
        if len(self.pre_master) not in (0, PRE_MASTER_SIZE):
            raise ValidationError(
                f"key source pre_master must be {PRE_MASTER_SIZE} bytes (client) or empty "
                f"(server), got {len(self.pre_master)}")

    @classmethod
    def generate(cls, client: bool) -> KeySource:
        """Fresh randoms from the OS CSPRNG; pre_master only for a client."""
        # one getrandom() call for all of it (every handshake makes one per side)
        pre = PRE_MASTER_SIZE if client else 0
        raw = os.urandom(pre + 2 * RANDOM_SIZE)
        return cls(pre_master=raw[:pre], random1=raw[pre:pre + RANDOM_SIZE],
                   random2=raw[pre + RANDOM_SIZE:])

    def __repr__(self) -> str:  # never put key material into logs by accident
        return f"KeySource(client={bool(self.pre_master)})"


def derive_key2_prf(client_src: KeySource, server_src: KeySource,
                    client_sid: bytes, server_sid: bytes) -> bytes:
    """The 256-byte key2 of §9.1 from both key sources and both session ids.

    Session ids are the tls_session ids (the server's may be its stateless
    cookie); they stay the same across renegotiations while the randoms change.
    """
    if len(client_src.pre_master) != PRE_MASTER_SIZE:
        raise LocalProtocolError("PRF key derivation needs the client's 48-byte pre_master")
    for name, sid in (("client", client_sid), ("server", server_sid)):
        if len(sid) != SESSION_ID_SIZE:
            raise ValidationError(f"{name} session id must be {SESSION_ID_SIZE} bytes, "
                                  f"got {len(sid)}")
    master = prf(client_src.pre_master,
                 _MASTER_LABEL + client_src.random1 + server_src.random1,
                 MASTER_SECRET_SIZE)
    return prf(master,
               _EXPANSION_LABEL + client_src.random2 + server_src.random2
               + client_sid + server_sid,
               KEY2_SIZE)


@dataclass(frozen=True)
class DataKeys:
    """One key_state's data-channel keys, shaped like OVPN_NEW_KEY's two key dirs.

    ``encrypt_*`` is this side's TX direction, ``decrypt_*`` its RX direction.
    For cipher ``"none"`` all four byte strings are empty (the kernel omits
    ``key``/``iv`` then).
    """

    cipher: str
    key_id: int
    encrypt_key: bytes
    encrypt_iv: bytes
    decrypt_key: bytes
    decrypt_iv: bytes

    def __post_init__(self) -> None:
        if self.cipher not in CIPHER_KEY_SIZES:
            raise ValidationError(f"unknown data cipher {self.cipher!r}; the kernel knows "
                                  f"{', '.join(CIPHER_KEY_SIZES)}")
        if not 0 <= self.key_id <= MAX_KEY_ID:
            raise ValidationError(f"key_id must be 0..{MAX_KEY_ID}, got {self.key_id}")
        klen = CIPHER_KEY_SIZES[self.cipher]
        ivlen = IMPLICIT_IV_SIZE if klen else 0
        for name in ("encrypt_key", "decrypt_key"):
            if len(getattr(self, name)) != klen:
                raise ValidationError(f"{name} for {self.cipher} must be {klen} bytes, "
                                      f"got {len(getattr(self, name))}")
        for name in ("encrypt_iv", "decrypt_iv"):
            if len(getattr(self, name)) != ivlen:
                raise ValidationError(f"{name} for {self.cipher} must be {ivlen} bytes, "
                                      f"got {len(getattr(self, name))}")

    def __repr__(self) -> str:  # keys stay out of reprs / logs
        return f"DataKeys(cipher={self.cipher!r}, key_id={self.key_id})"


def split_key2(key2: bytes, cipher: str, *, server: bool, key_id: int) -> DataKeys:
    """Cut key2 into this side's TX/RX key and implicit IV (§9.3, dco §3.3).

    keys[0] (bytes 0..127) is client→server, keys[1] (128..255) server→client;
    each direction's AEAD implicit IV is the first 8 bytes of its HMAC slot.
    """
    if len(key2) != KEY2_SIZE:
        raise ValidationError(f"key2 must be {KEY2_SIZE} bytes, got {len(key2)}")
    if cipher not in CIPHER_KEY_SIZES:
        raise ValidationError(f"unknown data cipher {cipher!r}; the kernel knows "
                              f"{', '.join(CIPHER_KEY_SIZES)}")
    klen = CIPHER_KEY_SIZES[cipher]
    ivlen = IMPLICIT_IV_SIZE if klen else 0

    def direction(index: int) -> tuple[bytes, bytes]:
        base = index * _KEY_SIZE
        return (key2[base:base + klen],
                key2[base + _HMAC_OFFSET:base + _HMAC_OFFSET + ivlen])

    tx = direction(1 if server else 0)
    rx = direction(0 if server else 1)
    return DataKeys(cipher=cipher, key_id=key_id, encrypt_key=tx[0], encrypt_iv=tx[1],
                    decrypt_key=rx[0], decrypt_iv=rx[1])
