"""The one door to the compiled module ``bsd_ovpn._native`` (cffi).

Why a single module: everything that touches raw memory, struct layouts and
ioctl(2) sits here, so the rest of the package deals in ``bytes``, ``str`` and
typed exceptions only.  Sections:

* the FreeBSD LP64 structures (``struct ifdrv``, ``struct ifreq``,
  ``struct if_clonereq``) and ioctl numbers, declared in ``cdefs/ifovpn.h``;
* the kernel calls if_ovpn needs (SIOCSDRVSPEC/SIOCGDRVSPEC, clone create,
  destroy, rename, list cloners, kldload), which turn ``errno`` into
  :class:`~bsd_ovpn.errors.IfOvpnError` subclasses;
* (at the end) delimited sections for the engine fast path and for
  control-channel wrapping (tls-crypt's AES-256-CTR + HMAC-SHA256 in one call).

Importing this module, and reading the layout, works on every host: the
structs are defined in C under our own names with FreeBSD's layout.  Using a
kernel device off FreeBSD raises :class:`UnsupportedPlatform`.
"""
from __future__ import annotations

import errno as _errno
import os
import platform
import sys
from typing import Any

from .errors import IfOvpnError, UnsupportedPlatform, ValidationError
from .ifovpn import Command

try:  # the only import of the compiled module in the whole package
    from . import _native
except ImportError as exc:  # not built: say how to build it, on use
    _native = None
    _NATIVE_IMPORT_ERROR: ImportError | None = exc
else:
    _NATIVE_IMPORT_ERROR = None


class NativeModuleMissing(UnsupportedPlatform):
    """``bsd_ovpn._native`` was not compiled (run ``pip install -e .``)."""


def _require_native() -> Any:
    if _native is None:
        raise NativeModuleMissing(
            "the compiled module bsd_ovpn._native is missing; build it with "
            f"'pip install -e .' (needs a C compiler and OpenSSL headers): {_NATIVE_IMPORT_ERROR}")
    return _native


def native() -> Any:
    """The cffi module (``.ffi``, ``.lib``) for the other sections of this file."""
    return _require_native()


# --------------------------------------------------------------------------
# Layout and constants (FreeBSD LP64)
# --------------------------------------------------------------------------

IFNAMSIZ = 16
IFDRV_STRUCT = "struct bsd_ovpn_ifdrv"
IFREQ_STRUCT = "struct bsd_ovpn_ifreq"
CLONEREQ_STRUCT = "struct bsd_ovpn_if_clonereq"

#: The ioctl request numbers as FreeBSD LP64 defines them; the C side
#: computes the same values from the struct sizes, and tests compare both.
SIOCSDRVSPEC = 0x8028697B
SIOCGDRVSPEC = 0xC028697B
SIOCIFCREATE2 = 0xC020697C
SIOCIFDESTROY = 0x80206979
SIOCSIFNAME = 0x80206928
SIOCIFGCLONERS = 0xC0106978

#: if_ovpn first appeared in FreeBSD 14.0.
MIN_FREEBSD_MAJOR = 14
#: Upper bound on cloner names we accept from SIOCIFGCLONERS (there are ~20).
MAX_CLONERS = 4096


def layout() -> dict[str, dict[str, int]]:
    """Sizes and field offsets of the structs as compiled, for tests and ``ovpnctl``."""
    ffi = _require_native().ffi
    out: dict[str, dict[str, int]] = {}
    for struct, fields in (
        (IFDRV_STRUCT, ("ifd_name", "ifd_cmd", "ifd_len", "ifd_data")),
        (IFREQ_STRUCT, ("ifr_name", "ifr_ifru")),
        (CLONEREQ_STRUCT, ("ifcr_total", "ifcr_count", "ifcr_buffer")),
    ):
        entry = {"sizeof": ffi.sizeof(struct)}
        entry.update({f: ffi.offsetof(struct, f) for f in fields})
        out[struct] = entry
    return out


def native_ioctl_numbers() -> dict[str, int]:
    """The request numbers as the C side computed them from the struct sizes."""
    lib = _require_native().lib
    return {name: int(getattr(lib, "BSD_OVPN_" + name)) for name in (
        "SIOCSDRVSPEC", "SIOCGDRVSPEC", "SIOCIFCREATE2", "SIOCIFDESTROY",
        "SIOCSIFNAME", "SIOCIFGCLONERS")}


# --------------------------------------------------------------------------
# Platform check
# --------------------------------------------------------------------------

def host_description() -> str:
    return f"{platform.system() or sys.platform} {platform.release()}".strip()


def freebsd_major(release: str | None = None) -> int | None:
    """FreeBSD's major version from ``uname -r`` ("14.1-RELEASE" -> 14)."""
    release = platform.release() if release is None else release
    head = release.split(".", 1)[0].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def require_freebsd() -> None:
    """Raise UnsupportedPlatform unless this is FreeBSD 14+ with the native module.

    Called before every kernel call, so the FreeBSD request numbers are never
    sent to another kernel where they would mean something else.
    """
    lib = _require_native().lib
    if not sys.platform.startswith("freebsd") or not lib.bsd_ovpn_is_freebsd():
        raise UnsupportedPlatform(
            f"if_ovpn needs FreeBSD 14 or later (this host is {host_description()}); "
            "use the userspace engine instead")
    major = freebsd_major()
    if major is not None and major < MIN_FREEBSD_MAJOR:
        raise UnsupportedPlatform(
            f"if_ovpn needs FreeBSD 14 or later (this host is {host_description()})")


# --------------------------------------------------------------------------
# Typed errors: one IfOvpnError subclass per errno worth catching on its own
# --------------------------------------------------------------------------

class IfOvpnPermissionError(IfOvpnError, PermissionError):
    """EPERM: the caller lacks PRIV_NET_OVPN (not root, or a jail without it)."""


class IfOvpnNotFound(IfOvpnError, FileNotFoundError):
    """ENOENT: unknown peer id, or GET_PKT with an empty queue."""


class IfOvpnExists(IfOvpnError, FileExistsError):
    """EEXIST: peer id in use, or an interface of that name exists."""


class IfOvpnBusy(IfOvpnError):
    """EBUSY: another socket attached, interface already up, or crypto in flight."""


class IfOvpnNotSupported(IfOvpnError):
    """ENOTSUP/EOPNOTSUPP: this kernel does not know the command."""


class IfOvpnBufferTooSmall(IfOvpnError):
    """ENOSPC: a GET reply did not fit the buffer (the kernel gives no size)."""


class IfOvpnNoSuchInterface(IfOvpnError):
    """ENXIO: no interface of that name."""


_ERRNO_CLASSES: dict[int, type[IfOvpnError]] = {
    _errno.EPERM: IfOvpnPermissionError,
    _errno.ENOENT: IfOvpnNotFound,
    _errno.EEXIST: IfOvpnExists,
    _errno.EBUSY: IfOvpnBusy,
    _errno.ENOTSUP: IfOvpnNotSupported,
    _errno.EOPNOTSUPP: IfOvpnNotSupported,
    _errno.ENOSPC: IfOvpnBufferTooSmall,
    _errno.ENXIO: IfOvpnNoSuchInterface,
}


def errno_error(err: int, command: str, cause: str | None = None,
                ifname: str | None = None) -> IfOvpnError:
    """The IfOvpnError (subclass chosen by errno) for a failed if_ovpn call.

    Shared by the kernel transport and the userspace engine's transport, so a
    caller's ``except IfOvpnExists`` works with either.
    """
    cls = _ERRNO_CLASSES.get(err, IfOvpnError)
    return cls(err, command, cause, ifname)


def command_name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"ifd_cmd {cmd:#x}"


# --------------------------------------------------------------------------
# Kernel calls
# --------------------------------------------------------------------------

def encode_ifname(name: str) -> bytes:
    """An interface name as the kernel wants it: ASCII, 1..15 bytes, no NUL."""
    if not isinstance(name, str):
        raise ValidationError(f"interface name must be a str, not {type(name).__name__}")
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise ValidationError(f"interface name {name!r} is not ASCII") from None
    if not raw or len(raw) >= IFNAMSIZ or b"\0" in raw or b"/" in raw or raw.strip() != raw:
        raise ValidationError(
            f"interface name {name!r} must be 1..{IFNAMSIZ - 1} printable characters "
            "without NUL, '/' or surrounding spaces")
    return raw


def _ioctl(fd: int, request: int, arg: Any, what: str, ifname: str | None) -> None:
    lib = _require_native().lib
    ffi = _native.ffi
    if lib.bsd_ovpn_ioctl(fd, request, arg) != 0:
        err = ffi.errno
        raise errno_error(err, what, None, ifname)


def drvspec_set(fd: int, ifname: str, cmd: int, data: bytes | None) -> None:
    """SIOCSDRVSPEC: send one packed nvlist (None = ifd_len 0, no nvlist)."""
    require_freebsd()
    ffi = _native.ffi
    req = ffi.new(IFDRV_STRUCT + " *")
    req.ifd_name = encode_ifname(ifname)
    req.ifd_cmd = int(cmd)
    if data:
        buf = ffi.from_buffer(data)  # kept alive by this frame until the call returns
        req.ifd_len = len(data)
        req.ifd_data = buf
    else:
        req.ifd_len = 0
        req.ifd_data = ffi.NULL
    _ioctl(fd, SIOCSDRVSPEC, req, command_name(cmd), ifname)


def drvspec_get(fd: int, ifname: str, cmd: int, bufsize: int) -> bytes:
    """SIOCGDRVSPEC: the kernel packs its reply into a ``bufsize`` buffer."""
    require_freebsd()
    if not 0 < bufsize <= 1 << 30:
        raise ValueError(f"reply buffer size {bufsize} out of range")
    ffi = _native.ffi
    req = ffi.new(IFDRV_STRUCT + " *")
    buf = ffi.new("char[]", bufsize)
    req.ifd_name = encode_ifname(ifname)
    req.ifd_cmd = int(cmd)
    req.ifd_len = bufsize
    req.ifd_data = buf
    _ioctl(fd, SIOCGDRVSPEC, req, command_name(cmd), ifname)
    if req.ifd_len > bufsize:  # the kernel never does this; refuse to read past the buffer
        raise errno_error(_errno.EOVERFLOW, command_name(cmd),
                          f"kernel claimed a {req.ifd_len}-byte reply in a {bufsize}-byte buffer",
                          ifname)
    return bytes(ffi.buffer(buf, req.ifd_len))


def if_create(fd: int, name: str) -> str:
    """SIOCIFCREATE2: clone ``name`` (e.g. "ovpn"); returns the name the kernel chose."""
    require_freebsd()
    ffi = _native.ffi
    req = ffi.new(IFREQ_STRUCT + " *")
    req.ifr_name = encode_ifname(name)
    _ioctl(fd, SIOCIFCREATE2, req, "SIOCIFCREATE2", name)
    return ffi.string(req.ifr_name, IFNAMSIZ).decode("ascii")


def if_destroy(fd: int, name: str) -> None:
    """SIOCIFDESTROY: the only way to release peers, keys and the hooked socket."""
    require_freebsd()
    ffi = _native.ffi
    req = ffi.new(IFREQ_STRUCT + " *")
    req.ifr_name = encode_ifname(name)
    _ioctl(fd, SIOCIFDESTROY, req, "SIOCIFDESTROY", name)


def if_rename(fd: int, name: str, new_name: str) -> None:
    """SIOCSIFNAME: ``ifr_data`` points at the new NUL-terminated name."""
    require_freebsd()
    ffi = _native.ffi
    new = ffi.new("char[]", encode_ifname(new_name))
    req = ffi.new(IFREQ_STRUCT + " *")
    req.ifr_name = encode_ifname(name)
    req.ifr_ifru.ifru_data = new
    _ioctl(fd, SIOCSIFNAME, req, "SIOCSIFNAME", name)


def list_cloners(fd: int) -> list[str]:
    """SIOCIFGCLONERS: first ask for the count, then read that many names."""
    require_freebsd()
    ffi = _native.ffi
    req = ffi.new(CLONEREQ_STRUCT + " *")
    req.ifcr_count = 0
    req.ifcr_buffer = ffi.NULL
    _ioctl(fd, SIOCIFGCLONERS, req, "SIOCIFGCLONERS", None)
    total = req.ifcr_total
    if not 0 <= total <= MAX_CLONERS:
        raise errno_error(_errno.EOVERFLOW, "SIOCIFGCLONERS", f"kernel reported {total} cloners")
    if total == 0:
        return []
    buf = ffi.new("char[]", total * IFNAMSIZ)
    req.ifcr_count = total
    req.ifcr_buffer = buf
    _ioctl(fd, SIOCIFGCLONERS, req, "SIOCIFGCLONERS", None)
    count = min(total, req.ifcr_total)
    raw = ffi.buffer(buf, count * IFNAMSIZ)[:]
    names = []
    for i in range(count):
        entry = raw[i * IFNAMSIZ:(i + 1) * IFNAMSIZ].split(b"\0", 1)[0]
        names.append(entry.decode("ascii", "replace"))
    return names


def kldload(module: str) -> int | None:
    """kldload(2); returns None on success, else the errno (EEXIST = already loaded).

    Errors are returned, not raised: the module may be built in or loaded,
    and the cloner check after this is what decides.
    """
    require_freebsd()
    lib = _native.lib
    if lib.bsd_ovpn_kldload(module.encode("ascii")) < 0:
        return _native.ffi.errno
    return None


def open_control_socket() -> int:
    """An AF_LOCAL datagram socket: any socket carries ifnet ioctls (as OpenVPN does)."""
    require_freebsd()
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    return sock.detach()


def close_fd(fd: int) -> None:
    os.close(fd)


# --------------------------------------------------------------------------
# Heap housekeeping (cdefs/memory.c)
# --------------------------------------------------------------------------

def release_free_heap() -> bool | None:
    """Return the heap's free pages to the kernel (glibc malloc_trim).

    True if memory was released, False if there was none, None where the C
    library has no such call or the native module is not built (nothing to
    do then: it is an optimisation, never a requirement).
    """
    if _native is None:
        return None
    rc = _native.lib.bsd_ovpn_release_free_heap()
    return None if rc < 0 else bool(rc)


# ==========================================================================
# Engine fast path (cdefs/fastpath.h / fastpath.c).  Everything for it goes
# below this banner, using native() for ffi/lib; nothing above depends on it.
# ==========================================================================

# ---- begin fast path section (owned by the engine fast path, helper H7) ----
# Thin wrappers over cdefs/fastpath.h: they hold the C engine pointer, pass
# bytes and ints, and turn the C functions' negative errnos into the same
# typed IfOvpnError subclasses the kernel transport raises (named after the
# C function), so bsd_ovpn.engine.fastpath deals in Python values only.

FP_CIPHER_CODES: dict[str, int] = {
    "none": 0,
    "AES-128-GCM": 1,
    "AES-192-GCM": 1,
    "AES-256-GCM": 1,
    "CHACHA20-POLY1305": 2,
}
FP_EV_ROTATE_KEY = 1
FP_EV_FLOAT = 2
FP_PEER_COUNTER_FIELDS = ("pkt_in", "pkt_out", "bytes_in", "bytes_out")
FP_IFACE_COUNTER_FIELDS = (
    "lost_data_in", "lost_data_out", "nomem_data_in", "nomem_data_out",
    "data_in", "data_out", "tunnel_in", "tunnel_out", "transport_in", "transport_out",
)

def _fp_check(rc: int, what: str) -> int:
    if rc < 0:
        raise errno_error(-rc, what)
    return rc


class FastpathEngine:
    """One C data plane (``bsd_ovpn_fp_engine``): its threads, peers and keys.

    ``close()`` (or garbage collection) stops the threads and frees it; the
    fds passed to ``attach`` stay owned by the caller.
    """

    def __init__(self) -> None:
        mod = _require_native()
        self._ffi, self._lib = mod.ffi, mod.lib
        ptr = self._lib.bsd_ovpn_fp_new()
        if ptr == self._ffi.NULL:
            raise MemoryError("bsd_ovpn_fp_new: out of memory")
        self._ptr = self._ffi.gc(ptr, self._lib.bsd_ovpn_fp_free)

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            self._ffi.release(ptr)

    def _e(self) -> Any:
        if self._ptr is None:
            raise ValidationError("the fast-path engine is closed")
        return self._ptr

    def attach(self, udp_fd: int, tun_fd: int, tun_hdr: int) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_attach(self._e(), udp_fd, tun_fd, tun_hdr),
                  "bsd_ovpn_fp_attach")

    def detach(self) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_detach(self._e()), "bsd_ovpn_fp_detach")

    def event_fd(self) -> int:
        return int(self._lib.bsd_ovpn_fp_event_fd(self._e()))

    def add_peer(self, peer_id: int, remote: tuple[int, bytes, int, int],
                 local: tuple[int, bytes, int, int] | None,
                 vpn4: bytes | None, vpn6: bytes | None) -> None:
        ffi = self._ffi
        lver, laddr, lport = (local[0], local[1], local[2]) if local else (0, ffi.NULL, 0)
        _fp_check(self._lib.bsd_ovpn_fp_add_peer(
            self._e(), peer_id, remote[0], remote[1], remote[2], remote[3],
            lver, laddr, lport, vpn4 if vpn4 else ffi.NULL, vpn6 if vpn6 else ffi.NULL),
            "bsd_ovpn_fp_add_peer")

    def del_peer(self, peer_id: int) -> dict[str, float]:
        out = self._ffi.new("struct bsd_ovpn_fp_peer_counters *")
        _fp_check(self._lib.bsd_ovpn_fp_del_peer(self._e(), peer_id, out), "bsd_ovpn_fp_del_peer")
        return self._peer_dict(out)

    def set_remote(self, peer_id: int, remote: tuple[int, bytes, int, int]) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_set_remote(
            self._e(), peer_id, remote[0], remote[1], remote[2], remote[3]),
            "bsd_ovpn_fp_set_remote")

    def set_key(self, peer_id: int, slot: int, key_id: int, cipher: str,
                enc_key: bytes, enc_iv: bytes, dec_key: bytes, dec_iv: bytes) -> None:
        code = FP_CIPHER_CODES.get(cipher)
        if code is None:
            raise ValidationError(f"unknown data-channel cipher {cipher!r}; "
                                  f"expected one of {sorted(FP_CIPHER_CODES)}")
        for name, iv in (("enc_iv", enc_iv), ("dec_iv", dec_iv)):
            if code and len(iv) != 8:
                raise ValidationError(f"{name} must be 8 bytes, got {len(iv)}")
        ffi = self._ffi
        _fp_check(self._lib.bsd_ovpn_fp_set_key(
            self._e(), peer_id, slot, key_id, code,
            enc_key or ffi.NULL, len(enc_key), enc_iv or ffi.NULL,
            dec_key or ffi.NULL, len(dec_key), dec_iv or ffi.NULL),
            "bsd_ovpn_fp_set_key")

    def swap_keys(self, peer_id: int) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_swap_keys(self._e(), peer_id), "bsd_ovpn_fp_swap_keys")

    def del_key(self, peer_id: int, slot: int) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_del_key(self._e(), peer_id, slot), "bsd_ovpn_fp_del_key")

    def set_tx_seq(self, peer_id: int, slot: int, next_seq: int) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_set_tx_seq(self._e(), peer_id, slot, next_seq),
                  "bsd_ovpn_fp_set_tx_seq")

    def send_ping(self, peer_id: int) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_send_ping(self._e(), peer_id), "bsd_ovpn_fp_send_ping")

    def _peer_dict(self, c: Any) -> dict[str, float]:
        d: dict[str, float] = {f: int(getattr(c, f)) for f in FP_PEER_COUNTER_FIELDS}
        d["last_active"] = float(c.last_active)
        return d

    def peer_counters(self, peer_id: int) -> dict[str, float]:
        out = self._ffi.new("struct bsd_ovpn_fp_peer_counters *")
        _fp_check(self._lib.bsd_ovpn_fp_peer_counters(self._e(), peer_id, out),
                  "bsd_ovpn_fp_peer_counters")
        return self._peer_dict(out)

    def iface_counters(self) -> dict[str, int]:
        out = self._ffi.new("struct bsd_ovpn_fp_iface_counters *")
        self._lib.bsd_ovpn_fp_iface_counters(self._e(), out)
        return {f: int(getattr(out, f)) for f in FP_IFACE_COUNTER_FIELDS}

    def pop_events(self) -> list[tuple[int, int, tuple[int, bytes, int, int] | None]]:
        """Drain the queue: (type, peer_id, address or None) per event."""
        ev = self._ffi.new("struct bsd_ovpn_fp_event *")
        out = []
        while self._lib.bsd_ovpn_fp_pop_event(self._e(), ev) == 1:
            addr = None
            if ev.type == FP_EV_FLOAT:
                n = 4 if ev.ipver == 4 else 16
                addr = (int(ev.ipver), bytes(self._ffi.buffer(ev.addr, n)), int(ev.port),
                        int(ev.scope_id))
            out.append((int(ev.type), int(ev.peer_id), addr))
        return out

    def peer_count(self) -> int:
        return int(self._lib.bsd_ovpn_fp_peer_count(self._e()))

    def set_replay_protection(self, on: bool) -> None:
        self._lib.bsd_ovpn_fp_set_replay_protection(self._e(), 1 if on else 0)

    def set_rotate_threshold(self, threshold: int) -> None:
        if not 0 <= threshold < 2**64:
            raise ValidationError(f"rotate threshold {threshold} is not a 64-bit unsigned value")
        self._lib.bsd_ovpn_fp_set_rotate_threshold(self._e(), threshold)

    def set_running(self, up: bool) -> None:
        self._lib.bsd_ovpn_fp_set_running(self._e(), 1 if up else 0)

    def set_offload(self, on: bool) -> None:
        self._lib.bsd_ovpn_fp_set_offload(self._e(), 1 if on else 0)

    def offload_state(self) -> tuple[bool, bool]:
        """(UDP GSO in use, UDP GRO in use) since the last attach."""
        v = int(self._lib.bsd_ovpn_fp_offload_state(self._e()))
        return bool(v & 1), bool(v & 2)

    def add_route(self, ipver: int, prefix: bytes, plen: int, gateway: bytes) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_add_route(self._e(), ipver, prefix, plen, gateway),
                  "bsd_ovpn_fp_add_route")

    def clear_routes(self) -> None:
        _fp_check(self._lib.bsd_ovpn_fp_del_route(self._e(), 0, self._ffi.NULL, -1),
                  "bsd_ovpn_fp_del_route")
# ---- end fast path section ----


# ==========================================================================
# Control-channel wrapping (cdefs/ctlcrypt.h / ctlcrypt.c).  Everything for
# it goes below this banner; nothing above depends on it.
# ==========================================================================

# ---- begin ctlcrypt section (tls-crypt AES-256-CTR + HMAC-SHA256, helper N3) ----
# One C key object per (cipher key, HMAC key) pair keeps the AES key schedule
# and the HMAC pads prepared, so sealing or opening a control packet is one
# C call instead of a cryptography CTR context plus an HMAC per packet.
# bsd_ovpn.proto.fastcrypto picks this when the module is built and falls
# back to its pure path otherwise; both give identical bytes.

from .errors import OvpnError as _OvpnError  # noqa: E402  (kept inside this section)

CC_KEY_LEN = 32
CC_TAG_LEN = 32


class CtlCryptError(_OvpnError):
    """libcrypto failed inside a ctlcrypt call (not an authentication failure)."""


class CtlCryptAuthError(CtlCryptError):
    """A sealed packet's tag did not match: wrong key or tampered data."""


def ctlcrypt_available() -> bool:
    """True if the compiled module is built and has the ctlcrypt functions.

    (A module compiled before cdefs/ctlcrypt.c existed lacks them.)
    """
    return _native is not None and hasattr(_native.lib, "bsd_ovpn_cc_new")


class NativeCtrHmacKey:
    """An AES-256-CTR key plus an HMAC-SHA256 key, SIV style, in C.

    ``seal(header, plain)`` returns ``tag || AES-CTR(iv=tag[:16], plain)``
    with ``tag = HMAC(header || plain)``; ``open(header, tag, ct)`` reverses
    it and raises :class:`CtlCryptAuthError` when the tag does not match.
    The C object (key material cleansed on free) goes away with this one.
    """

    __slots__ = ("_ptr", "_ffi", "_lib")

    def __init__(self, enc_key: bytes, hmac_key: bytes) -> None:
        if not ctlcrypt_available():
            _require_native()
            raise NativeModuleMissing("bsd_ovpn._native was built without cdefs/ctlcrypt.c; "
                                      "rebuild it with 'pip install -e .'")
        if type(enc_key) is not bytes:
            enc_key = bytes(enc_key)
        if type(hmac_key) is not bytes:
            hmac_key = bytes(hmac_key)
        if len(enc_key) != CC_KEY_LEN or len(hmac_key) != CC_KEY_LEN:
            name, key = (("AES-256-CTR key", enc_key) if len(enc_key) != CC_KEY_LEN
                         else ("HMAC-SHA256 key", hmac_key))
            raise ValidationError(f"the {name} must be {CC_KEY_LEN} bytes, got {len(key)}")
        self._ffi, self._lib = _native.ffi, _native.lib
        ptr = self._lib.bsd_ovpn_cc_new(enc_key, hmac_key)
        if ptr == self._ffi.NULL:
            raise CtlCryptError("bsd_ovpn_cc_new failed: out of memory, or libcrypto "
                                "lacks AES-256-CTR / HMAC-SHA256")
        self._ptr = self._ffi.gc(ptr, self._lib.bsd_ovpn_cc_free)

    def seal(self, header: bytes, plain: bytes) -> bytes:
        """``tag(32) || ciphertext`` of ``plain``, authenticating ``header`` too."""
        if type(header) is not bytes:
            header = bytes(header)
        if type(plain) is not bytes:
            plain = bytes(plain)
        out = bytearray(CC_TAG_LEN + len(plain))   # (cheaper than ffi.new + buffer copy)
        if self._lib.bsd_ovpn_cc_seal(self._ptr, header, len(header), plain, len(plain),
                                      self._ffi.from_buffer(out)):
            raise CtlCryptError("bsd_ovpn_cc_seal: libcrypto failed")
        return bytes(out)

    def open(self, header: bytes, tag: bytes, ct: bytes) -> bytes:
        """The plaintext of ``ct``; :class:`CtlCryptAuthError` if ``tag`` does not match."""
        if type(header) is not bytes:
            header = bytes(header)
        if type(tag) is not bytes:
            tag = bytes(tag)
        if type(ct) is not bytes:
            ct = bytes(ct)
        if len(tag) != CC_TAG_LEN:
            raise ValidationError(f"the tag must be {CC_TAG_LEN} bytes, got {len(tag)}")
        out = bytearray(len(ct))
        rc = self._lib.bsd_ovpn_cc_open(self._ptr, header, len(header), tag, ct, len(ct),
                                        self._ffi.from_buffer(out))
        if rc:
            if rc == self._lib.BSD_OVPN_CC_ERR_AUTH:
                raise CtlCryptAuthError("authentication failed (wrong key or tampered data)")
            raise CtlCryptError("bsd_ovpn_cc_open: libcrypto failed")
        return bytes(out)
# ---- end ctlcrypt section ----
