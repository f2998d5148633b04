"""The shipped service files: they parse, they run the right command, they are packaged.

The rc.d script's logic (instances, role detection, per-instance settings)
is run for real under a stand-in for FreeBSD's rc.subr that records what
rc.subr would execute; the command lines found in the rc.d script and the
systemd units are then parsed by ovpnctl's own CLI, so a renamed option
breaks this test instead of a boot.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bsd_ovpn import service
from bsd_ovpn.cli import cli

REPO = Path(__file__).resolve().parents[2]

# -------------------------------------------------------------------------- rc.d


def test_rc_script_is_valid_posix_sh() -> None:
    path = service.data_path("ovpnctl")
    shells = [s for s in ("sh", "dash", "bash") if shutil.which(s)]
    assert shells
    for sh in shells:
        argv = [sh, "--posix", "-n", str(path)] if sh == "bash" else [sh, "-n", str(path)]
        res = subprocess.run(argv, capture_output=True, text=True)
        assert res.returncode == 0, (sh, res.stderr)
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n")
    for needle in ("# PROVIDE: ovpnctl", "# KEYWORD: shutdown", 'rcvar="ovpnctl_enable"',
                   ". /etc/rc.subr", 'load_rc_config "${name}"', 'run_rc_command "$1"'):
        assert needle in text


STUB_RC_SUBR = r"""
# stand-in for FreeBSD's /etc/rc.subr: records what run_rc_command would do
load_rc_config() { [ -n "$RC_CONF" ] && . "$RC_CONF"; return 0; }
err() { _code=$1; shift; echo "ERR: $*" >&2; exit $_code; }
warn() { echo "WARN: $*" >&2; }
checkyesno() { eval _v=\$$1; case "$_v" in [Yy][Ee][Ss]|[Tt][Rr][Uu][Ee]|[Oo][Nn]|1) return 0;; esac; return 1; }
run_rc_command() {
    echo "cmd=$1"
    echo "rcvar=$rcvar"
    echo "pidfile=$pidfile"
    echo "procname=$procname"
    echo "command=$command"
    echo "command_args=$command_args"
    echo "required_files=$required_files"
    echo "required_modules=$required_modules"
    echo "reload_cmd=$reload_cmd"
    echo "start_precmd=$start_precmd"
    echo "---"
}
"""


@pytest.fixture
def rc(tmp_path: Path):
    """Run the rc.d script (with the stub rc.subr) as ``rc(rc_conf_text, *args)``."""
    stub = tmp_path / "rc.subr"
    stub.write_text(STUB_RC_SUBR)
    script = tmp_path / "rc.d" / "ovpnctl"
    script.parent.mkdir()
    text = service.render("ovpnctl", "/usr/local/bin/ovpnctl")
    assert text.count(". /etc/rc.subr") == 1
    script.write_text(text.replace(". /etc/rc.subr", f". {stub}"))
    script.chmod(0o755)
    confdir = tmp_path / "etc"
    confdir.mkdir()
    (confdir / "office.conf").write_text("# a server\nport 1194\nserver 198.51.100.0 255.255.255.0\n")
    (confdir / "home.conf").write_text("client\nremote 192.0.2.1 1194\n")
    (confdir / "tc.conf").write_text("  tls-client   \npull\nremote 192.0.2.1\n")
    (confdir / "commented.conf").write_text("# client\n;client\nclientx 1\nport 1194\n")

    def run(conf: str, *args: str) -> subprocess.CompletedProcess[str]:
        rcconf = tmp_path / "rc.conf"
        rcconf.write_text(f'ovpnctl_configdir="{confdir}"\n' + conf)
        return subprocess.run(["sh", str(script), *args], capture_output=True, text=True,
                              env={"PATH": os.environ["PATH"], "RC_CONF": str(rcconf)},
                              timeout=30)
    run.confdir = confdir  # type: ignore[attr-defined]
    return run


def _records(out: str) -> list[dict[str, str]]:
    recs, cur = [], {}
    for line in out.splitlines():
        if line == "---":
            recs.append(cur)
            cur = {}
        elif "=" in line:
            k, v = line.split("=", 1)
            cur[k] = v
    return recs


def _ovpnctl_args(command_args: str) -> list[str]:
    argv = shlex.split(command_args)
    return argv[argv.index("/usr/local/bin/ovpnctl") + 1:]


def test_rc_instance_role_comes_from_the_config(rc) -> None:
    for inst, role in (("office", "server"), ("home", "client"), ("tc", "client"),
                       ("commented", "server")):
        res = rc('ovpnctl_enable="YES"\n', "start", inst)
        assert res.returncode == 0, res.stderr
        [rec] = _records(res.stdout)
        args = _ovpnctl_args(rec["command_args"])
        assert args == [role, "-c", f"{rc.confdir}/{inst}.conf", "--engine", "kernel"], inst
        assert rec["pidfile"] == f"/var/run/ovpnctl.{inst}.pid"
        assert rec["command"] == rec["procname"] == "/usr/sbin/daemon"
        daemon_args = shlex.split(rec["command_args"])
        # supervised: restart, supervisor pidfile for rc.subr, child pidfile for SIGHUP, syslog
        assert daemon_args[:6] == ["-r", "-R", "5", "-P", rec["pidfile"], "-p"]
        assert daemon_args[6] == f"/var/run/ovpnctl.{inst}.child.pid"
        assert "-S" in daemon_args and f"ovpnctl.{inst}" in daemon_args
        assert rec["required_modules"] == "if_ovpn"
        assert rec["required_files"] == f"{rc.confdir}/{inst}.conf"
        assert rec["reload_cmd"] == "ovpnctl_reload"
        assert rec["rcvar"] == "ovpnctl_enable"


def test_rc_without_instance_runs_every_configured_one(rc) -> None:
    res = rc('ovpnctl_enable="YES"\novpnctl_configs="office home"\n', "status")
    assert res.returncode == 0, res.stderr
    recs = _records(res.stdout)
    assert [r["cmd"] for r in recs] == ["status", "status"]
    assert [_ovpnctl_args(r["command_args"])[0] for r in recs] == ["server", "client"]
    assert [r["pidfile"] for r in recs] == ["/var/run/ovpnctl.office.pid",
                                            "/var/run/ovpnctl.home.pid"]


def test_rc_per_instance_settings(rc) -> None:
    conf = ('ovpnctl_configs="my-vpn"\novpnctl_flags="-v"\novpnctl_engine="userspace"\n'
            'ovpnctl_my_vpn_config="/somewhere/x.conf"\novpnctl_my_vpn_role="client"\n')
    [rec] = _records(rc(conf, "start", "my-vpn").stdout)
    assert _ovpnctl_args(rec["command_args"]) == ["client", "-c", "/somewhere/x.conf",
                                                  "--engine", "userspace", "-v"]
    assert rec["required_modules"] == ""            # no kldload for the userspace engine
    [rec] = _records(rc('ovpnctl_flags="-v"\novpnctl_office_flags=""\n', "start",
                        "office").stdout)
    assert _ovpnctl_args(rec["command_args"])[-1] == "kernel"   # per-instance flags replace


@pytest.mark.parametrize("conf,args,message", [
    ("", ("start", "a;b"), "bad instance name"),
    ("", ("start", "../x"), "bad instance name"),
    ('ovpnctl_office_role="peer"\n', ("start", "office"), "must be server or client"),
    ('ovpnctl_engine="dco"\n', ("start", "office"), "ovpnctl_engine must be"),
])
def test_rc_refuses_bad_settings(rc, conf: str, args: tuple[str, ...], message: str) -> None:
    res = rc(conf, *args)
    assert res.returncode == 1
    assert message in res.stderr
    assert "command_args" not in res.stdout


def test_rc_with_no_instances_says_what_to_set(rc) -> None:
    [rec] = _records(rc('ovpnctl_enable="YES"\n', "start").stdout)
    assert rec["start_precmd"] == "ovpnctl_no_instances"
    assert "set ovpnctl_configs" in service.shipped_text("ovpnctl")


def test_rc_command_line_is_accepted_by_ovpnctl(rc) -> None:
    for inst in ("office", "home"):
        [rec] = _records(rc('ovpnctl_flags="-v"\n', "start", inst).stdout)
        _assert_cli_accepts(_ovpnctl_args(rec["command_args"]))


def _assert_cli_accepts(args: list[str]) -> None:
    """The CLI parses these arguments (with --help appended, so nothing runs)."""
    res = CliRunner().invoke(cli, [*args, "--help"])
    assert res.exit_code == 0, (args, res.output)


# -------------------------------------------------------------------------- systemd

def _units(tmp_path: Path, program: str) -> dict[str, Path]:
    out = {}
    for name in service.SYSTEMD_UNITS:
        p = tmp_path / name
        p.write_text(service.render(name, program))
        out[name] = p
    return out


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A strict systemd unit parse: known sections, Key=Value lines, repeats allowed."""
    sections: dict[str, dict[str, list[str]]] = {}
    cur: dict[str, list[str]] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {n}: continuation lines are not used"
        m = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if m:
            assert m.group(1) in ("Unit", "Service", "Install"), line
            assert m.group(1) not in sections, f"line {n}: section repeated"
            cur = sections.setdefault(m.group(1), {})
            continue
        m = re.fullmatch(r"([A-Z][A-Za-z]+)=(.*)", line)
        assert m and cur is not None, f"line {n}: not Key=Value inside a section: {line!r}"
        cur.setdefault(m.group(1), []).append(m.group(2))
    return sections


def test_units_parse_strictly_and_are_hardened(tmp_path: Path) -> None:
    # configparser (no repeated keys allowed there) as a second opinion on the syntax
    for name, path in _units(tmp_path, service.DEFAULT_PROGRAM).items():
        text = path.read_text()
        cp = configparser.RawConfigParser(strict=False, interpolation=None)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read_string(text)
        unit = _parse_unit(text)
        assert set(unit) == {"Unit", "Service", "Install"}, name
        svc = unit["Service"]
        [start] = svc["ExecStart"]
        assert start.startswith(service.DEFAULT_PROGRAM + " ")
        caps = set(" ".join(svc["CapabilityBoundingSet"]).split())
        assert {"CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"} <= caps
        assert not caps & {"CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE"}
        assert svc["NoNewPrivileges"] == ["yes"]
        assert svc["DevicePolicy"] == ["closed"] and "/dev/net/tun rw" in svc["DeviceAllow"]
        assert svc["RuntimeDirectory"] == ["bsd_ovpn"]
        assert svc["RuntimeDirectoryPreserve"] == ["yes"]   # shared by all the units
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]
        if name.startswith("ovpnctl-server@") or name.startswith("ovpnctl-client@"):
            role = name.split("-")[1].split("@")[0]
            assert {"CAP_SETUID", "CAP_SETGID"} <= caps    # user/group directives
            assert start.split()[1:4] == [role, "-c", f"/etc/openvpn/{role}/%i.conf"]
            assert unit["Unit"]["Requires"] == ["ovpnctl-engine.service"]
            assert "ovpnctl-engine.service" in unit["Unit"]["After"][0].split()
            assert unit["Unit"]["PartOf"] == ["ovpnctl-engine.service"]
            assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
            assert unit["Unit"]["ConditionPathExists"] == [f"/etc/openvpn/{role}/%i.conf"]


def test_unit_command_lines_are_accepted_by_ovpnctl(tmp_path: Path) -> None:
    for name, path in _units(tmp_path, service.DEFAULT_PROGRAM).items():
        [start] = _parse_unit(path.read_text())["Service"]["ExecStart"]
        args = shlex.split(start)[1:]
        _assert_cli_accepts([a.replace("%i", "office") for a in args])


def test_engine_socket_matches_the_default() -> None:
    """The units name the socket explicitly; it is the one every command finds by default."""
    from bsd_ovpn import engines

    text = service.shipped_text("ovpnctl-engine.service")
    assert "--socket /run/bsd_ovpn/engine.sock" in text
    assert os.path.normpath(engines.DEFAULT_ENGINE_SOCKET.replace("/var/run/", "/run/")) == \
        "/run/bsd_ovpn/engine.sock"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # the program must exist for verify; /bin/true stands in for ovpnctl
    _units(tmp_path, "/bin/true")
    names = ["ovpnctl-engine.service", "ovpnctl-server@office.service",
             "ovpnctl-client@home.service"]
    res = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          *(f"./{n}" for n in names)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    # verify exits 0 even for unknown keys; any line about our files is a failure
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines()
                  if "ovpnctl" in ln or str(tmp_path) in ln]
    assert res.returncode == 0 and complaints == [], res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a typo in a key is reported."""
    bad = service.render("ovpnctl-engine.service", "/bin/true").replace(
        "ProtectHome=yes", "ProtectHom=yes")
    (tmp_path / "ovpnctl-engine.service").write_text(bad)
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", "./ovpnctl-engine.service"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "ProtectHom" in res.stdout + res.stderr


# -------------------------------------------------------------------------- packaging

def test_files_are_in_the_built_package(tmp_path: Path) -> None:
    """setup.py's package_data puts every service file into the build (build_py is
    what bdist_wheel packs); the checkout is copied so the build leaves no trace in it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.rst", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "cdefs", src / "cdefs")
    shutil.copytree(REPO / "bsd_ovpn", src / "bsd_ovpn",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.c"))
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                          str(tmp_path / "out")], cwd=src, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    built = tmp_path / "out" / "bsd_ovpn" / "data"
    for name in (*service.SYSTEMD_UNITS, service.RC_SCRIPT):
        assert (built / name).read_text() == service.shipped_text(name), name


def test_install_service_writes_refuses_and_forces(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["install-service", "--system", "linux", "--dest", str(tmp_path),
            "--program", "/opt/bin/ovpnctl"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.count("installed ") == 3
    unit = (tmp_path / "ovpnctl-server@.service").read_text()
    assert "ExecStart=/opt/bin/ovpnctl server -c /etc/openvpn/server/%i.conf" in unit
    assert "/usr/local/bin/ovpnctl" not in unit
    assert (tmp_path / "ovpnctl-server@.service").stat().st_mode & 0o777 == 0o644
    # same content again: unchanged; a local edit is not overwritten without --force
    assert runner.invoke(cli, args).output.count("unchanged ") == 3
    (tmp_path / "ovpnctl-engine.service").write_text("# edited\n")
    res = runner.invoke(cli, args)
    assert res.exit_code != 0 and "--force" in str(res.exception or res.output)
    assert (tmp_path / "ovpnctl-engine.service").read_text() == "# edited\n"
    res = runner.invoke(cli, [*args, "--force"])
    assert res.exit_code == 0 and "installed " in res.output
    assert "ExecStart=/opt/bin/ovpnctl engine run" in \
        (tmp_path / "ovpnctl-engine.service").read_text()


def test_install_service_freebsd_and_dry_run(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["install-service", "--system", "freebsd", "--dest",
                              str(tmp_path), "--program", "/usr/local/bin/ovpnctl"])
    assert res.exit_code == 0, res.output
    rc = tmp_path / "ovpnctl"
    assert rc.stat().st_mode & 0o777 == 0o555
    res = runner.invoke(cli, ["install-service", "--system", "linux", "--dest",
                              str(tmp_path / "nope"), "--program", "/x/ovpnctl", "--dry-run"])
    assert res.exit_code == 0 and "ExecStart=/x/ovpnctl engine run" in res.output
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("program", ["relative/ovpnctl", "/a b/ovpnctl", "/x/ovpnctl;rm"])
def test_install_service_rejects_unsafe_program_paths(tmp_path: Path, program: str) -> None:
    res = CliRunner().invoke(cli, ["install-service", "--system", "linux", "--dest",
                                   str(tmp_path), "--program", program])
    assert res.exit_code != 0
    assert list(tmp_path.iterdir()) == []


def test_engine_unit_waits_for_its_socket(tmp_path: Path) -> None:
    """ExecStartPost makes the engine "started" only once its socket exists (so units
    ordered After= it do not race it), and gives up instead of hanging."""
    import socket

    [post] = _parse_unit(service.shipped_text("ovpnctl-engine.service"))["Service"]["ExecStartPost"]
    assert "$" not in post                      # no systemd variable expansion surprises
    argv = shlex.split(post)
    assert argv[:2] == ["/usr/bin/timeout", "10"]
    sock_path = tmp_path / "engine.sock"
    argv = [a.replace("/run/bsd_ovpn/engine.sock", str(sock_path)) for a in argv]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(sock_path))
        assert subprocess.run(argv, timeout=20).returncode == 0
    finally:
        s.close()
    sock_path.unlink()
    fast = ["timeout", "0.5", *argv[2:]]        # no socket: the bound ends it, non-zero
    assert subprocess.run(fast, timeout=20).returncode != 0
