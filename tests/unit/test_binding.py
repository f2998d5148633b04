"""The cffi binding: FreeBSD LP64 layouts, ioctl numbers, marshalling, platform guard."""
from __future__ import annotations

import errno
import sys

import pytest

from bsd_ovpn import binding
from bsd_ovpn.errors import IfOvpnError, UnsupportedPlatform, ValidationError
from bsd_ovpn.ifovpn import Command

ffi = binding.native().ffi
lib = binding.native().lib
ON_FREEBSD = sys.platform.startswith("freebsd")


def _ioc(direction: int, group: str, num: int, size: int) -> int:
    """FreeBSD <sys/ioccom.h> encoding, written independently of the C side."""
    return direction | (size & 0x1FFF) << 16 | ord(group) << 8 | num


IOC_IN, IOC_INOUT = 0x80000000, 0xC0000000


def test_ifdrv_layout_is_freebsd_lp64():
    s = binding.IFDRV_STRUCT
    assert ffi.sizeof(s) == 40
    assert [ffi.offsetof(s, f) for f in ("ifd_name", "ifd_cmd", "ifd_len", "ifd_data")] == \
        [0, 16, 24, 32]
    assert ffi.sizeof(ffi.typeof(s).fields[0][1].type) == 16  # char ifd_name[16]


def test_ifreq_layout_is_freebsd_lp64():
    s = binding.IFREQ_STRUCT
    assert ffi.sizeof(s) == 32
    assert ffi.offsetof(s, "ifr_name") == 0
    assert ffi.offsetof(s, "ifr_ifru") == 16
    assert ffi.offsetof(s, "ifr_ifru", "ifru_data") == 16
    assert ffi.offsetof(s, "ifr_ifru", "ifru_buffer", "buffer") == 24
    assert ffi.offsetof(s, "ifr_ifru", "ifru_mtu") == 16
    assert ffi.sizeof("struct bsd_ovpn_sockaddr") == 16


def test_clonereq_layout_is_freebsd_lp64():
    s = binding.CLONEREQ_STRUCT
    assert ffi.sizeof(s) == 16
    assert [ffi.offsetof(s, f) for f in ("ifcr_total", "ifcr_count", "ifcr_buffer")] == [0, 4, 8]


def test_layout_report_matches():
    lay = binding.layout()
    assert lay[binding.IFDRV_STRUCT] == {"sizeof": 40, "ifd_name": 0, "ifd_cmd": 16,
                                         "ifd_len": 24, "ifd_data": 32}
    assert lay[binding.IFREQ_STRUCT]["sizeof"] == 32


def test_ioctl_numbers_three_ways():
    expected = {
        "SIOCSDRVSPEC": 0x8028697B, "SIOCGDRVSPEC": 0xC028697B, "SIOCIFCREATE2": 0xC020697C,
        "SIOCIFDESTROY": 0x80206979, "SIOCSIFNAME": 0x80206928, "SIOCIFGCLONERS": 0xC0106978,
    }
    assert binding.native_ioctl_numbers() == expected
    assert {k: getattr(binding, k) for k in expected} == expected
    assert _ioc(IOC_IN, "i", 123, 40) == expected["SIOCSDRVSPEC"]
    assert _ioc(IOC_INOUT, "i", 123, 40) == expected["SIOCGDRVSPEC"]
    assert _ioc(IOC_INOUT, "i", 124, 32) == expected["SIOCIFCREATE2"]
    assert _ioc(IOC_IN, "i", 121, 32) == expected["SIOCIFDESTROY"]
    assert _ioc(IOC_IN, "i", 40, 32) == expected["SIOCSIFNAME"]
    assert _ioc(IOC_INOUT, "i", 120, 16) == expected["SIOCIFGCLONERS"]


@pytest.mark.skipif(ON_FREEBSD, reason="checks the refusal on non-FreeBSD hosts")
class TestNotFreeBSD:
    def test_require_freebsd_names_the_host(self):
        with pytest.raises(UnsupportedPlatform) as info:
            binding.require_freebsd()
        msg = str(info.value)
        assert msg.startswith("if_ovpn needs FreeBSD 14 or later (this host is ")
        assert binding.host_description() in msg

    @pytest.mark.parametrize("call", [
        lambda: binding.drvspec_set(0, "ovpn0", Command.OVPN_START_VPN, None),
        lambda: binding.drvspec_get(0, "ovpn0", Command.OVPN_POLL_PKT, 128),
        lambda: binding.if_create(0, "ovpn"),
        lambda: binding.if_destroy(0, "ovpn0"),
        lambda: binding.if_rename(0, "ovpn0", "tun0"),
        lambda: binding.list_cloners(0),
        lambda: binding.kldload("if_ovpn"),
        binding.open_control_socket,
    ])
    def test_every_kernel_call_refuses(self, call):
        with pytest.raises(UnsupportedPlatform):
            call()

    def test_c_guard_never_issues_the_ioctl(self):
        # Defence in depth: even bypassing Python, the C side refuses off FreeBSD.
        assert lib.bsd_ovpn_is_freebsd() == 0
        req = ffi.new(binding.IFDRV_STRUCT + " *")
        assert lib.bsd_ovpn_ioctl(0, binding.SIOCSDRVSPEC, req) == -1
        assert ffi.errno == errno.ENOSYS
        assert lib.bsd_ovpn_kldload(b"if_ovpn") == -1
        assert ffi.errno == errno.ENOSYS


@pytest.mark.parametrize("release,major", [
    ("14.1-RELEASE", 14), ("15.0-CURRENT", 15), ("13.2-RELEASE-p4", 13), ("6.1.0-18-amd64", 6),
    ("weird", None),
])
def test_freebsd_major(release, major):
    assert binding.freebsd_major(release) == major


@pytest.mark.parametrize("name", ["", "a" * 16, "tun\0", "tün0", " ovpn", "a/b", 5])
def test_bad_interface_names(name):
    with pytest.raises(ValidationError):
        binding.encode_ifname(name)


def test_good_interface_name():
    assert binding.encode_ifname("a" * 15) == b"a" * 15


@pytest.mark.parametrize("err,cls,builtin", [
    (errno.EPERM, binding.IfOvpnPermissionError, PermissionError),
    (errno.ENOENT, binding.IfOvpnNotFound, FileNotFoundError),
    (errno.EEXIST, binding.IfOvpnExists, FileExistsError),
    (errno.EBUSY, binding.IfOvpnBusy, IfOvpnError),
    (errno.ENOTSUP, binding.IfOvpnNotSupported, IfOvpnError),
    (errno.ENOSPC, binding.IfOvpnBufferTooSmall, IfOvpnError),
    (errno.ENXIO, binding.IfOvpnNoSuchInterface, IfOvpnError),
    (errno.EINVAL, IfOvpnError, OSError),
])
def test_errno_error_classes(err, cls, builtin):
    exc = binding.errno_error(err, "OVPN_NEW_PEER", "because", "ovpn0")
    assert type(exc) is cls
    assert isinstance(exc, builtin) and isinstance(exc, IfOvpnError)
    assert exc.errno == err and exc.command == "OVPN_NEW_PEER" and exc.ifname == "ovpn0"
    assert str(exc) == f"OVPN_NEW_PEER on ovpn0: because ({errno.errorcode[err]})"


class _FakeKernel:
    """Stands in for ioctl(2): reads the structs the binding filled in."""

    def __init__(self, reply: bytes = b"", err: int = 0) -> None:
        self.reply = reply
        self.err = err
        self.seen: list[dict] = []

    def __call__(self, fd, request, arg, what, ifname):
        if request in (binding.SIOCSDRVSPEC, binding.SIOCGDRVSPEC):
            rec = {"fd": fd, "request": request, "what": what,
                   "name": ffi.string(arg.ifd_name), "cmd": arg.ifd_cmd, "len": arg.ifd_len,
                   "null": arg.ifd_data == ffi.NULL}
            if request == binding.SIOCSDRVSPEC and arg.ifd_len:
                rec["data"] = ffi.buffer(ffi.cast("char *", arg.ifd_data), arg.ifd_len)[:]
            self.seen.append(rec)
            if self.err:
                raise binding.errno_error(self.err, what, None, ifname)
            if request == binding.SIOCGDRVSPEC:
                if len(self.reply) > arg.ifd_len:
                    raise binding.errno_error(errno.ENOSPC, what, None, ifname)
                ffi.memmove(arg.ifd_data, self.reply, len(self.reply))
                arg.ifd_len = len(self.reply)
        elif request == binding.SIOCIFCREATE2:
            self.seen.append({"request": request, "name": ffi.string(arg.ifr_name)})
            arg.ifr_name = b"ovpn3"
        elif request == binding.SIOCSIFNAME:
            self.seen.append({"request": request, "name": ffi.string(arg.ifr_name),
                              "new": ffi.string(arg.ifr_ifru.ifru_data)})
        elif request == binding.SIOCIFGCLONERS:
            names = [b"lo", b"openvpn", b"tun"]
            arg.ifcr_total = len(names)
            self.seen.append({"request": request, "count": arg.ifcr_count})
            if arg.ifcr_count:
                for i, n in enumerate(names[:arg.ifcr_count]):
                    ffi.memmove(arg.ifcr_buffer + 16 * i, n, len(n))


@pytest.fixture
def fake_kernel(monkeypatch):
    fake = _FakeKernel()
    monkeypatch.setattr(binding, "require_freebsd", lambda: None)
    monkeypatch.setattr(binding, "_ioctl", fake)
    return fake


def test_drvspec_set_fills_ifdrv(fake_kernel):
    binding.drvspec_set(9, "ovpn0", Command.OVPN_DEL_PEER, b"\x6c\x00abc")
    rec = fake_kernel.seen[-1]
    assert rec == {"fd": 9, "request": binding.SIOCSDRVSPEC, "what": "OVPN_DEL_PEER",
                   "name": b"ovpn0", "cmd": 0x20004402, "len": 5, "null": False,
                   "data": b"\x6c\x00abc"}


def test_drvspec_set_without_nvlist_is_len_zero_null(fake_kernel):
    binding.drvspec_set(9, "tun0", Command.OVPN_START_VPN, None)
    rec = fake_kernel.seen[-1]
    assert (rec["len"], rec["null"], rec["cmd"]) == (0, True, 0x20004408)


def test_drvspec_get_returns_ifd_len_bytes(fake_kernel):
    fake_kernel.reply = b"reply-bytes"
    assert binding.drvspec_get(3, "ovpn0", Command.OVPN_POLL_PKT, 128) == b"reply-bytes"
    rec = fake_kernel.seen[-1]
    assert (rec["request"], rec["len"], rec["cmd"]) == (binding.SIOCGDRVSPEC, 128, 0x2000440A)


def test_drvspec_get_enospc(fake_kernel):
    fake_kernel.reply = b"x" * 200
    with pytest.raises(binding.IfOvpnBufferTooSmall) as info:
        binding.drvspec_get(3, "ovpn0", Command.OVPN_GET_PEER_STATS, 128)
    assert info.value.command == "OVPN_GET_PEER_STATS"


def test_drvspec_get_rejects_silly_buffer(fake_kernel):
    with pytest.raises(ValueError):
        binding.drvspec_get(3, "ovpn0", Command.OVPN_GET_PKT, 0)


def test_errno_passes_through_typed(fake_kernel):
    fake_kernel.err = errno.EPERM
    with pytest.raises(binding.IfOvpnPermissionError) as info:
        binding.drvspec_set(3, "ovpn0", Command.OVPN_SWAP_KEYS, b"..")
    assert info.value.ifname == "ovpn0"


def test_create_reads_back_kernel_name(fake_kernel):
    assert binding.if_create(3, "ovpn") == "ovpn3"
    assert fake_kernel.seen[-1]["name"] == b"ovpn"


def test_rename_points_ifr_data_at_new_name(fake_kernel):
    binding.if_rename(3, "ovpn3", "tun7")
    assert fake_kernel.seen[-1] == {"request": binding.SIOCSIFNAME, "name": b"ovpn3",
                                    "new": b"tun7"}


def test_list_cloners_two_calls(fake_kernel):
    assert binding.list_cloners(3) == ["lo", "openvpn", "tun"]
    assert [r["count"] for r in fake_kernel.seen] == [0, 3]


def test_command_name_unknown():
    assert binding.command_name(0x20004401) == "OVPN_NEW_PEER"
    assert binding.command_name(0x99) == "ifd_cmd 0x99"
