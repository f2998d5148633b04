"""``ovpnctl demo`` without root: refusals, engine choice, and its two config files.

The end-to-end run is tests/netns/test_demo.py; here the parts that decide
whether it may run and what it writes, which must be right on any host.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bsd_ovpn import config as configmod
from bsd_ovpn import demo
from bsd_ovpn.cli import cli
from bsd_ovpn.errors import UnsupportedPlatform


def test_non_root_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(demo.DemoError, match="must run as root.*sudo ovpnctl demo"):
        demo.preflight()


def test_cli_reports_the_refusal_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    res = CliRunner().invoke(cli, ["demo"])
    assert res.exit_code != 0
    assert isinstance(res.exception, demo.DemoError)


def test_unsupported_os_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UnsupportedPlatform, match="network namespaces or FreeBSD vnet jails"):
        demo.preflight()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux engine choice")
def test_engine_choice_on_linux() -> None:
    assert demo.choose_engine("auto") == "userspace"
    assert demo.choose_engine("userspace") == "userspace"
    with pytest.raises(UnsupportedPlatform, match="FreeBSD kernel module"):
        demo.choose_engine("kernel")
    with pytest.raises(demo.DemoError, match="--engine must be one of"):
        demo.choose_engine("dco")


def test_timeout_is_bounded() -> None:
    for bad in (0, -1, 601):
        with pytest.raises(demo.DemoError, match="timeout"):
            demo.Demo(timeout=bad)


def test_child_env_finds_this_package_and_drops_engine_overrides(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BSD_OVPN_ENGINE", "kernel")
    monkeypatch.setenv("BSD_OVPN_ENGINE_SOCKET", "/nowhere.sock")
    monkeypatch.setenv("PYTHONPATH", "/x")
    env = demo.child_env()
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert Path(parts[0], "bsd_ovpn", "demo.py").resolve() == Path(demo.__file__).resolve()
    assert parts[1:] == ["/x"]
    assert "BSD_OVPN_ENGINE" not in env and "BSD_OVPN_ENGINE_SOCKET" not in env
    argv = demo.ovpnctl_argv("status")
    assert argv[0] == sys.executable and argv[-1] == "status"


def test_demo_configs_pass_the_daemons_checks(tmp_path: Path) -> None:
    """The files the demo writes are what ovpnctl server/client accept (and stock 2.6 too)."""
    from bsd_ovpn.daemon.client import check_client_config
    from bsd_ovpn.daemon.server import check_server_config

    d = demo.Demo()
    d._pki(tmp_path)
    assert (tmp_path / "tc.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "server.conf").write_text(demo.server_config(tmp_path))
    (tmp_path / "client.conf").write_text(demo.client_config(tmp_path))
    srv = configmod.load(tmp_path / "server.conf")
    check_server_config(srv)
    assert srv.server == ("198.51.100.0", "255.255.255.0")
    assert srv.server_ipv6 == demo.TUNNEL_NET6 and srv.local == demo.SERVER_OUTER
    cli_cfg = configmod.load(tmp_path / "client.conf")
    check_client_config(cli_cfg)
    assert [(r.host, r.port) for r in cli_cfg.remotes] == [(demo.SERVER_OUTER, demo.PORT)]
    assert cli_cfg.remote_cert_tls == "server"
    # the client certificate carries the CN the demo checks in ovpnctl status
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate((tmp_path / f"{demo.CLIENT_CN}.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == demo.CLIENT_CN



def test_engine_choice_on_freebsd(monkeypatch: pytest.MonkeyPatch) -> None:
    """FreeBSD: load if_ovpn in the host (a vnet jail cannot), prefer it, else fall back."""
    import subprocess

    from bsd_ovpn import engines

    monkeypatch.setattr(sys, "platform", "freebsd14")
    loaded = {"if_ovpn": False}
    calls: list[list[str]] = []

    def fake_run(argv, **kw):
        calls.append(list(argv))
        loaded["if_ovpn"] = kldload_works
        return subprocess.CompletedProcess(argv, 0 if kldload_works else 1, b"", b"")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(engines, "kernel_available", lambda: loaded["if_ovpn"])
    kldload_works = True
    assert demo.choose_engine("auto") == "kernel"
    assert calls == [["kldload", "-n", "if_ovpn"]]
    assert demo.choose_engine("auto") == "kernel" and len(calls) == 1   # already loaded
    loaded["if_ovpn"], kldload_works = False, False
    assert demo.choose_engine("auto") == "userspace"
    with pytest.raises(UnsupportedPlatform, match="kldload if_ovpn failed"):
        demo.choose_engine("kernel")
    assert demo.choose_engine("userspace") == "userspace"
