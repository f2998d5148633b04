"""Transports: the kernel transport's availability checks and the RecordingTransport."""
from __future__ import annotations

import errno
import os
import sys

import pytest

from bsd_ovpn import binding, nv, transport
from bsd_ovpn.errors import IfOvpnError, UnsupportedPlatform, ValidationError
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.transport import KernelTransport, RecordingTransport, Transport


@pytest.mark.skipif(sys.platform.startswith("freebsd"), reason="non-FreeBSD behaviour")
def test_kernel_transport_refuses_off_freebsd():
    with pytest.raises(UnsupportedPlatform, match=r"^if_ovpn needs FreeBSD 14 or later \(this host is "):
        KernelTransport()


def test_both_transports_satisfy_the_protocol():
    assert isinstance(RecordingTransport(), Transport)
    for name in ("request", "query", "create_interface", "destroy_interface",
                 "rename_interface", "list_interfaces", "close"):
        assert callable(getattr(KernelTransport, name))


class _FakeBinding:
    """Kernel calls as KernelTransport makes them, without a FreeBSD kernel."""

    def __init__(self, cloners, kld_errno=None):
        self.cloners = cloners
        self.kld_errno = kld_errno
        self.calls = []
        self.fd = None

    def install(self, monkeypatch):
        monkeypatch.setattr(binding, "require_freebsd", lambda: None)
        monkeypatch.setattr(binding, "open_control_socket", self.open_control_socket)
        monkeypatch.setattr(binding, "kldload", self.kldload)
        monkeypatch.setattr(binding, "list_cloners", self.list_cloners)
        monkeypatch.setattr(binding, "drvspec_set", self.record("drvspec_set"))
        monkeypatch.setattr(binding, "drvspec_get", self.record("drvspec_get", b"reply"))
        monkeypatch.setattr(binding, "if_create", self.record("if_create", "ovpn0"))
        monkeypatch.setattr(binding, "if_destroy", self.record("if_destroy"))
        monkeypatch.setattr(binding, "if_rename", self.record("if_rename"))

    def open_control_socket(self):
        self.fd = os.open(os.devnull, os.O_RDONLY)
        return self.fd

    def kldload(self, name):
        self.calls.append(("kldload", name))
        return self.kld_errno

    def list_cloners(self, fd):
        self.calls.append(("list_cloners", fd))
        return list(self.cloners)

    def record(self, name, result=None):
        def call(*args):
            self.calls.append((name, *args))
            return result
        return call


def _fd_is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_kernel_transport_needs_the_openvpn_cloner(monkeypatch):
    fake = _FakeBinding(["lo", "tun"], kld_errno=errno.ENOENT)
    fake.install(monkeypatch)
    with pytest.raises(UnsupportedPlatform) as info:
        KernelTransport()
    assert "no 'openvpn' interface cloner" in str(info.value)
    assert "kldload if_ovpn failed: ENOENT" in str(info.value)
    assert not _fd_is_open(fake.fd)  # the control socket is not leaked


def test_kernel_transport_already_loaded_is_fine(monkeypatch):
    fake = _FakeBinding(["lo", "openvpn"], kld_errno=errno.EEXIST)
    fake.install(monkeypatch)
    with KernelTransport() as tr:
        fd = tr.fileno
        assert fake.calls[:2] == [("kldload", "if_ovpn"), ("list_cloners", fd)]
        tr.request("ovpn0", Command.OVPN_START_VPN, None, fd=12)
        assert tr.query("ovpn0", Command.OVPN_POLL_PKT, 128) == b"reply"
        assert tr.create_interface() == "ovpn0"
        tr.rename_interface("ovpn0", "tun0")
        tr.destroy_interface("tun0")
        assert fake.calls[2:] == [
            ("drvspec_set", fd, "ovpn0", Command.OVPN_START_VPN, None),
            ("drvspec_get", fd, "ovpn0", Command.OVPN_POLL_PKT, 128),
            ("if_create", fd, "ovpn"),
            ("if_rename", fd, "ovpn0", "tun0"),
            ("if_destroy", fd, "tun0"),
        ]
    assert not _fd_is_open(fd)
    with pytest.raises(ValueError):
        tr.request("ovpn0", Command.OVPN_START_VPN, None)


def test_kernel_transport_create_name_must_start_with_ovpn(monkeypatch):
    _FakeBinding(["openvpn"]).install(monkeypatch)
    with KernelTransport(load_module=False) as tr:
        with pytest.raises(ValidationError, match="starting with 'ovpn'"):
            tr.create_interface("tun0")
        assert tr.create_interface("ovpnc1") == "ovpn0"  # pfSense-style names are accepted


def test_kernel_list_interfaces_probes_with_poll_pkt(monkeypatch):
    _FakeBinding(["openvpn"]).install(monkeypatch)
    answers = {"ovpn0": None, "tun0": None, "em0": errno.EINVAL, "lo0": errno.ENOTSUP,
               "ovpn1": errno.EPERM}

    def fake_get(fd, name, cmd, bufsize):
        assert cmd == Command.OVPN_POLL_PKT and bufsize == 128
        if answers[name] is not None:
            raise binding.errno_error(answers[name], cmd.name, None, name)
        return b""

    monkeypatch.setattr(binding, "drvspec_get", fake_get)
    monkeypatch.setattr(transport.socket, "if_nameindex",
                        lambda: [(i, n) for i, n in enumerate(answers, 1)])
    with KernelTransport() as tr:
        assert tr.list_interfaces() == ["ovpn0", "tun0", "ovpn1"]


# -- RecordingTransport ----------------------------------------------------------

def test_recording_records_requests_in_order():
    tr = RecordingTransport()
    tr.request("ovpn0", Command.OVPN_DEL_PEER, b"abc")
    tr.request("ovpn0", Command.OVPN_NEW_PEER, b"def", fd=7)
    tr.request("ovpn0", Command.OVPN_START_VPN, None)
    assert tr.requests == [
        ("ovpn0", Command.OVPN_DEL_PEER, b"abc", None),
        ("ovpn0", Command.OVPN_NEW_PEER, b"def", 7),
        ("ovpn0", Command.OVPN_START_VPN, None, None),
    ]
    assert tr.calls[-1].nvlist() is None


def test_recorded_call_decodes_its_nvlist():
    tr = RecordingTransport()
    tr.request("ovpn0", Command.OVPN_SWAP_KEYS, nv.pack({"peerid": 7}))
    assert tr.calls[-1].nvlist() == {"peerid": 7}


def test_recording_scripted_errno_is_typed():
    tr = RecordingTransport().fail(Command.OVPN_NEW_PEER, errno.EEXIST)
    with pytest.raises(transport.IfOvpnExists) as info:
        tr.request("ovpn0", Command.OVPN_NEW_PEER, b"x")
    assert (info.value.errno, info.value.command, info.value.ifname) == \
        (errno.EEXIST, "OVPN_NEW_PEER", "ovpn0")
    tr.request("ovpn0", Command.OVPN_NEW_PEER, b"x")  # the script is used up: success
    assert len(tr.requests) == 2


def test_recording_scripted_exception():
    tr = RecordingTransport().script(Command.OVPN_GET_STATS, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        tr.query("ovpn0", Command.OVPN_GET_STATS, 4096)


def test_recording_query_enospc_consumes_the_reply_like_the_kernel():
    tr = RecordingTransport().script(Command.OVPN_GET_PKT, b"x" * 600, b"y" * 10)
    with pytest.raises(transport.IfOvpnBufferTooSmall):
        tr.query("ovpn0", Command.OVPN_GET_PKT, 512)
    assert tr.query("ovpn0", Command.OVPN_GET_PKT, 512) == b"y" * 10  # the first one is lost
    with pytest.raises(transport.IfOvpnNotFound):
        tr.query("ovpn0", Command.OVPN_GET_PKT, 512)  # empty queue
    assert tr.queries == [("ovpn0", Command.OVPN_GET_PKT, 512)] * 3


def test_recording_unscripted_queries():
    tr = RecordingTransport()
    with pytest.raises(LookupError):
        tr.query("ovpn0", Command.OVPN_GET_STATS, 4096)
    with pytest.raises(transport.IfOvpnNotSupported):
        tr.query("ovpn0", Command.OVPN_NEW_PEER, 4096)


def test_recording_interfaces_lifecycle():
    tr = RecordingTransport()
    assert tr.create_interface() == "ovpn0"
    assert tr.create_interface("ovpn") == "ovpn1"
    assert tr.create_interface("ovpns2") == "ovpns2"
    with pytest.raises(transport.IfOvpnExists):
        tr.create_interface("ovpns2")
    with pytest.raises(ValidationError):
        tr.create_interface("tun0")
    tr.rename_interface("ovpn0", "tun0")
    with pytest.raises(transport.IfOvpnExists):
        tr.rename_interface("ovpn1", "tun0")
    assert tr.list_interfaces() == ["tun0", "ovpn1", "ovpns2"]
    tr.destroy_interface("tun0")
    with pytest.raises(transport.IfOvpnNoSuchInterface):
        tr.destroy_interface("tun0")
    assert tr.create_interface() == "ovpn2"
    tr.close()
    with pytest.raises(ValueError):
        tr.list_interfaces()


def test_recording_validates_ifname():
    tr = RecordingTransport()
    with pytest.raises(ValidationError):
        tr.request("x" * 16, Command.OVPN_START_VPN, None)


def test_errors_are_ifovpn_errors():
    exc = transport.errno_error(errno.ENOLINK, "OVPN_SWAP_KEYS", "no key in the secondary slot",
                                "tun0")
    assert isinstance(exc, IfOvpnError)
    assert str(exc) == "OVPN_SWAP_KEYS on tun0: no key in the secondary slot (ENOLINK)"
