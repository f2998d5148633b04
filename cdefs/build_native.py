"""cffi build script for ``bsd_ovpn._native``, the project's only compiled module.

Every ``cdefs/*.h`` file holds declarations in the subset of C that cffi's
``cdef`` parses; every ``cdefs/*.c`` file is compiled into the module.  Each
C feature (the ioctl layer, the engine fast path) is one .h/.c pair, so adding
one never touches another.  Only ``bsd_ovpn/binding.py`` imports the result.
"""
from __future__ import annotations

import glob
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(pattern: str) -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, pattern))):
        with open(path, encoding="utf-8") as f:
            out.append(f"/* {os.path.basename(path)} */\n" + f.read())
    return out


ffibuilder = FFI()
ffibuilder.cdef("\n".join(_read("*.h")))
ffibuilder.set_source(
    "bsd_ovpn._native",
    "\n".join(_read("*.c")),
    # libcrypto (OpenSSL) backs the engine's AEAD fast path; it is in FreeBSD's
    # base system and in Debian's libssl-dev.
    libraries=["crypto"],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
