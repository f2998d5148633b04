"""Engine selection (bsd_ovpn.engines): one place decides, with errors a person can act on."""
from __future__ import annotations

import os
import tempfile
import threading

import pytest

from bsd_ovpn import engines
from bsd_ovpn.engines import (
    DEFAULT_ENGINE_SOCKET, EngineNotRunning, IfOvpnNotLoaded, engine_kind, needs_reuseport,
    open_transport,
)
from bsd_ovpn.errors import OvpnError, UnsupportedPlatform, ValidationError
from bsd_ovpn.transport import RecordingTransport


@pytest.fixture
def running_engine():
    """An engine daemon on a temp socket (its Engine has no interfaces; no root needed)."""
    from bsd_ovpn.engine.commands import Engine
    from bsd_ovpn.engine.daemon import EngineDaemon

    d = tempfile.mkdtemp(prefix="ove")
    path = os.path.join(d, "e.sock")
    daemon = EngineDaemon(path, engine=Engine(host=None))  # type: ignore[arg-type]
    t = threading.Thread(target=daemon.serve_forever, daemon=True)
    t.start()
    yield path
    daemon.stop()
    t.join(5)
    os.rmdir(d)


def test_unknown_engine():
    with pytest.raises(ValidationError, match="auto, kernel, userspace"):
        open_transport("dco")


def test_kernel_on_linux_says_so():
    with pytest.raises(IfOvpnNotLoaded, match="FreeBSD kernel module.*--engine userspace"):
        open_transport("kernel")


def test_userspace_not_running_names_path_and_command(tmp_path, monkeypatch):
    monkeypatch.delenv("BSD_OVPN_ENGINE_SOCKET", raising=False)
    path = str(tmp_path / "x.sock")
    with pytest.raises(EngineNotRunning) as info:
        open_transport("userspace", socket_path=path)
    assert str(info.value) == (f"userspace engine not running at {path}; "
                               f"start it with `ovpnctl engine run --socket {path}`")
    assert info.value.path == path
    assert isinstance(info.value, OvpnError) and isinstance(info.value, ConnectionError)


def test_default_socket_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("BSD_OVPN_ENGINE_SOCKET", raising=False)
    assert engines.engine_socket_path() == DEFAULT_ENGINE_SOCKET == \
        "/var/run/bsd_ovpn/engine.sock"
    if not os.path.exists(DEFAULT_ENGINE_SOCKET):
        with pytest.raises(EngineNotRunning) as info:
            open_transport("userspace")
        assert str(info.value).endswith("start it with `ovpnctl engine run`")
    env = str(tmp_path / "env.sock")
    monkeypatch.setenv("BSD_OVPN_ENGINE_SOCKET", env)
    assert engines.engine_socket_path() == env
    assert engines.engine_socket_path("/explicit.sock") == "/explicit.sock"
    with pytest.raises(EngineNotRunning, match=f"at {env};"):
        open_transport("auto")


def test_auto_and_userspace_reach_a_running_engine(running_engine):
    for name in ("auto", "userspace"):
        tr = open_transport(name, socket_path=running_engine)
        try:
            assert engine_kind(tr) == "userspace"
            assert needs_reuseport(tr) is True
            assert tr.list_interfaces() == []
        finally:
            tr.close()


class FakeKernel:
    made: list[bool] = []
    fail = False

    def __init__(self, *, load_module: bool = True) -> None:
        FakeKernel.made.append(load_module)
        if FakeKernel.fail:
            raise UnsupportedPlatform("if_ovpn is not available: no 'openvpn' interface cloner")

    def close(self) -> None:
        pass


@pytest.fixture
def freebsd(monkeypatch):
    monkeypatch.setattr(engines, "_is_freebsd", lambda: True)
    monkeypatch.setattr(engines, "KernelTransport", FakeKernel)
    FakeKernel.made = []
    FakeKernel.fail = False
    return FakeKernel


def test_freebsd_auto_prefers_a_loaded_kernel_without_loading(freebsd, tmp_path):
    tr = open_transport("auto", socket_path=str(tmp_path / "none.sock"))
    assert isinstance(tr, FakeKernel) and freebsd.made == [False]
    assert engines.kernel_available() is True


def test_freebsd_kernel_loads_the_module(freebsd):
    assert isinstance(open_transport("kernel"), FakeKernel)
    assert freebsd.made == [True]


def test_freebsd_kernel_missing(freebsd):
    freebsd.fail = True
    with pytest.raises(IfOvpnNotLoaded, match=r"^if_ovpn is not loaded \(kldload if_ovpn\)"):
        open_transport("kernel")
    assert engines.kernel_available() is False


def test_freebsd_auto_falls_back_to_the_engine(freebsd, running_engine):
    freebsd.fail = True
    tr = open_transport("auto", socket_path=running_engine)
    try:
        assert engine_kind(tr) == "userspace"
    finally:
        tr.close()


def test_freebsd_auto_with_neither(freebsd, tmp_path):
    freebsd.fail = True
    path = str(tmp_path / "none.sock")
    with pytest.raises(EngineNotRunning) as info:
        open_transport("auto", socket_path=path)
    assert str(info.value) == (
        "if_ovpn is not loaded (kldload if_ovpn) and the userspace engine is not running "
        f"at {path}; start it with `ovpnctl engine run --socket {path}`")


def test_engine_kind():
    assert engine_kind(RecordingTransport()) == "test"
    assert engine_kind(object()) == "unknown"
    assert needs_reuseport(RecordingTransport()) is True


def test_engine_socket_permission(monkeypatch, tmp_path):
    from bsd_ovpn.binding import IfOvpnPermissionError
    from bsd_ovpn.engine import transport as et

    def refuse(path):
        raise IfOvpnPermissionError(1, "connect", f"no permission on {path}")
    monkeypatch.setattr(et, "EngineTransport", refuse)
    with pytest.raises(PermissionError) as info:
        open_transport("userspace", socket_path="/x/e.sock")
    assert str(info.value) == ("connect: no permission to use the userspace engine at /x/e.sock: "
                               "run as root, or as a member of the group given to "
                               "`ovpnctl engine run --group` (EPERM)")
    assert isinstance(info.value, OvpnError)
