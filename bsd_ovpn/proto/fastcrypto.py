"""AES-256-CTR and HMAC for control-channel wrapping, prepared once per key.

tls-crypt (and tls-crypt-v2's wrapped client keys) cost one AES-CTR pass and
one HMAC-SHA256 per control packet, and a 1000-client connect burst is tens of
thousands of packets.  ``Cipher(algorithms.AES(key), ...)`` re-validates the
key every time and ``hmac.new`` builds two hash objects per call, so:

* :class:`CtrKey` holds the ``algorithms.AES`` object built once per key;
  each packet only creates its CTR context (the mode itself stays OpenSSL's);
* :func:`hmac_digest` is :func:`hmac.digest`, OpenSSL's one-shot HMAC;
* :class:`CtrHmacKey` is the whole SIV-style construction (tls-crypt's
  ``tag = HMAC(header || plain)``, ``ct = AES-CTR(iv = tag[:16], plain)``,
  also tls-crypt-v2's WKc) for one key pair.  When the compiled module is
  built it is :class:`bsd_ovpn.binding.NativeCtrHmacKey`, one C call per
  packet (~1.4 us instead of ~7 us); otherwise :class:`PureCtrHmacKey`, built
  from the two helpers above, so the protocol core works without a C
  compiler.  Both give identical bytes and raise the same
  :class:`CtlCryptAuthError` on a bad tag.

Nothing is cached across keys: key material lives only in the wrap objects
that own it, and goes away with them.
"""
from __future__ import annotations

import hmac
from typing import Union

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bsd_ovpn.binding import (
    CC_KEY_LEN, CC_TAG_LEN, CtlCryptAuthError, NativeCtrHmacKey, ctlcrypt_available,
)
from bsd_ovpn.errors import ValidationError

__all__ = ["CtrKey", "hmac_digest", "CtrHmacKey", "AnyCtrHmacKey", "PureCtrHmacKey",
           "NativeCtrHmacKey", "CtlCryptAuthError", "NATIVE"]


class CtrKey:
    """One AES key for CTR mode (``apply`` encrypts and decrypts alike)."""

    __slots__ = ("_algorithm",)

    def __init__(self, key: bytes) -> None:
        self._algorithm = algorithms.AES(bytes(key))

    def apply(self, iv: bytes, data: bytes) -> bytes:
        """AES-CTR of ``data`` from the 16-byte initial counter block ``iv``."""
        ctx = Cipher(self._algorithm, modes.CTR(iv)).encryptor()
        return ctx.update(data) + ctx.finalize()


def hmac_digest(key: bytes, msg: bytes, digest: str = "sha256") -> bytes:
    """``hmac.new(key, msg, digest).digest()`` in one OpenSSL call."""
    return hmac.digest(key, msg, digest)


class PureCtrHmacKey:
    """The pure-Python path of :class:`CtrHmacKey` (cryptography + hmac)."""

    __slots__ = ("_ctr", "_hmac_key")

    def __init__(self, enc_key: bytes, hmac_key: bytes) -> None:
        enc_key, hmac_key = bytes(enc_key), bytes(hmac_key)
        for name, key in (("AES-256-CTR key", enc_key), ("HMAC-SHA256 key", hmac_key)):
            if len(key) != CC_KEY_LEN:
                raise ValidationError(f"the {name} must be {CC_KEY_LEN} bytes, got {len(key)}")
        self._ctr = CtrKey(enc_key)
        self._hmac_key = hmac_key

    def seal(self, header: bytes, plain: bytes) -> bytes:
        """``tag(32) || ciphertext`` of ``plain``, authenticating ``header`` too."""
        plain = bytes(plain)
        tag = hmac.digest(self._hmac_key, bytes(header) + plain, "sha256")
        return tag + self._ctr.apply(tag[:16], plain)

    def open(self, header: bytes, tag: bytes, ct: bytes) -> bytes:
        """The plaintext of ``ct``; :class:`CtlCryptAuthError` if ``tag`` does not match."""
        tag = bytes(tag)
        if len(tag) != CC_TAG_LEN:
            raise ValidationError(f"the tag must be {CC_TAG_LEN} bytes, got {len(tag)}")
        plain = self._ctr.apply(tag[:16], bytes(ct))
        if not hmac.compare_digest(tag, hmac.digest(self._hmac_key, bytes(header) + plain,
                                                    "sha256")):
            raise CtlCryptAuthError("authentication failed (wrong key or tampered data)")
        return plain


#: True when :class:`CtrHmacKey` is the native (C) implementation.
NATIVE: bool = ctlcrypt_available()

#: The type of a :data:`CtrHmacKey` instance, for annotations.
AnyCtrHmacKey = Union[NativeCtrHmacKey, PureCtrHmacKey]

#: ``CtrHmacKey(enc_key, hmac_key)`` with ``seal(header, plain) -> tag + ct``
#: and ``open(header, tag, ct) -> plain`` (raises :class:`CtlCryptAuthError`).
CtrHmacKey: type[NativeCtrHmacKey] | type[PureCtrHmacKey] = (
    NativeCtrHmacKey if NATIVE else PureCtrHmacKey)
