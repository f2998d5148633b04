"""AES-256-CTR and HMAC for control-channel wrapping, prepared once per key.

tls-crypt (and tls-crypt-v2's wrapped client keys) cost one AES-CTR pass and
one HMAC-SHA256 per control packet, and a 1000-client connect burst is tens of
thousands of packets.  ``Cipher(algorithms.AES(key), ...)`` re-validates the
key every time and ``hmac.new`` builds two hash objects per call, so:

* :class:`CtrKey` holds the ``algorithms.AES`` object built once per key;
  each packet only creates its CTR context (the mode itself stays OpenSSL's);
* :func:`hmac_digest` is :func:`hmac.digest`, OpenSSL's one-shot HMAC.

Nothing is cached across keys: key material lives only in the wrap objects
that own it, and goes away with them.
"""
from __future__ import annotations

import hmac

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["CtrKey", "hmac_digest"]


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
