"""``python3 -m bsd_ovpn.engine`` agrees with ``ovpnctl engine run`` (no root, no tun).

Both must find the same socket (``--socket``, else $BSD_OVPN_ENGINE_SOCKET,
else bsd_ovpn.paths.ENGINE_SOCKET), so a control plane started either way
reaches the engine; and the engine must say which data plane it runs.
"""
from __future__ import annotations

import logging

import pytest

from bsd_ovpn import engines, paths
from bsd_ovpn.engine import __main__ as engine_main
from bsd_ovpn.engine import daemon as daemon_mod
from bsd_ovpn.engine.dataplane import PythonDataPlane
from bsd_ovpn.engine.transport import DEFAULT_SOCKET


def test_one_default_socket_everywhere(monkeypatch):
    monkeypatch.delenv(engines.ENGINE_SOCKET_ENV, raising=False)
    assert paths.ENGINE_SOCKET == "/var/run/bsd_ovpn/engine.sock"
    assert DEFAULT_SOCKET == engines.DEFAULT_ENGINE_SOCKET == paths.ENGINE_SOCKET
    assert engine_main.build_parser().parse_args([]).socket == paths.ENGINE_SOCKET
    assert engines.engine_socket_path(None) == paths.ENGINE_SOCKET     # ovpnctl engine run


def test_environment_and_option_override_like_the_cli(monkeypatch, tmp_path):
    env_path = str(tmp_path / "env.sock")
    monkeypatch.setenv(engines.ENGINE_SOCKET_ENV, env_path)
    assert engine_main.build_parser().parse_args([]).socket == env_path
    assert engines.engine_socket_path(None) == env_path
    given = str(tmp_path / "given.sock")
    assert engine_main.build_parser().parse_args(["--socket", given]).socket == given
    assert engines.engine_socket_path(given) == given


class _FakeDaemon:
    made: list[_FakeDaemon] = []

    def __init__(self, path, *, group=None, dataplane="auto"):
        self.path, self.group, self.dataplane = path, group, dataplane
        self.engine = type("E", (), {"replay_protection": True})()
        self.served = False
        _FakeDaemon.made.append(self)

    def stop(self, *_args):
        pass

    def serve_forever(self):
        self.served = True


def test_main_passes_its_options_to_the_daemon(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(daemon_mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(daemon_mod, "EngineDaemon", _FakeDaemon)
    monkeypatch.setattr(daemon_mod.signal, "signal", lambda *a: None)
    monkeypatch.setenv(engines.ENGINE_SOCKET_ENV, str(tmp_path / "run" / "e.sock"))
    _FakeDaemon.made.clear()
    with caplog.at_level(logging.INFO, logger="bsd_ovpn.engine"):
        assert engine_main.main(["--dataplane", "python", "--no-replay-protection"]) == 0
    (d,) = _FakeDaemon.made
    assert (d.path, d.dataplane, d.served) == (str(tmp_path / "run" / "e.sock"), "python", True)
    assert d.engine.replay_protection is False
    assert (tmp_path / "run").is_dir()                        # the directory is created
    assert f"listening on {d.path}" in caplog.text


def test_main_refuses_without_root(monkeypatch, capsys):
    monkeypatch.setattr(daemon_mod.os, "geteuid", lambda: 1000)
    assert engine_main.main(["--socket", "/nonexistent/x.sock"]) == 1
    assert "must run as root" in capsys.readouterr().err


def test_dataplane_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="bsd_ovpn.engine"):
        assert daemon_mod.dataplane_factory("python") is PythonDataPlane
        auto = daemon_mod.dataplane_factory("auto")
    name = daemon_mod.dataplane_name(auto)
    try:
        from bsd_ovpn.engine.fastpath import FastDataPlane
        FastDataPlane().close()
        expected = "fast"
    except Exception:
        expected = "python"
    assert name == expected
    assert "data plane: python (--dataplane python)" in caplog.text
    assert f"data plane: {expected} (--dataplane auto)" in caplog.text
    with pytest.raises(ValueError, match="unknown data plane 'turbo'"):
        daemon_mod.dataplane_factory("turbo")
