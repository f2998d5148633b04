"""``ovpnctl demo`` end to end: it proves the tunnel and leaves nothing behind.

The demo is run as a real command (a child process), the way a new user runs
it, including Ctrl-C / SIGTERM in the middle.  "Nothing behind" is checked
against what the demo itself printed: its namespace names, its veth names
and its temporary directory, plus every process whose command line mentions
that directory.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns]
REPO = Path(__file__).resolve().parents[2]
ARGV = [sys.executable, "-c", "from bsd_ovpn.cli import main; main()", "demo"]

_NETWORK = re.compile(r"^\[1/5\] network: (\S+) \((\S+) 192\.0\.2\.1\) <-> (\S+) \((\S+) "
                      r"192\.0\.2\.2\)$", re.M)
_WORKDIR = re.compile(r"^\[2/5\] .* configs in (\S+)$", re.M)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("BSD_OVPN_ENGINE", None)
    return env


def _namespaces() -> list[str]:
    from bsd_ovpn.testbed.hosts import default_backend

    return default_backend().list_idents()


def _root_links() -> list[str]:
    if sys.platform.startswith("freebsd"):
        return subprocess.run(["ifconfig", "-l"], capture_output=True, text=True,
                              check=True).stdout.split()
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines()]


def _procs_mentioning(needle: str) -> list[str]:
    out = subprocess.run(["ps", "-axww", "-o", "pid=,command="], capture_output=True,
                         text=True, check=True).stdout
    return [ln.strip() for ln in out.splitlines()
            if needle in ln and int(ln.split()[0]) != os.getpid() and "ps -axww" not in ln]


def assert_nothing_left(output: str) -> None:
    net = _NETWORK.search(output)
    assert net, output
    ns_server, if_server, ns_client, if_client = net.groups()
    left = set(_namespaces()) & {ns_server, ns_client}
    assert not left, f"namespaces left behind: {left}"
    links = set(_root_links()) & {if_server, if_client}
    assert not links, f"interfaces left behind: {links}"
    wd = _WORKDIR.search(output)
    if wd:
        assert not Path(wd.group(1)).exists(), f"{wd.group(1)} left behind"
        assert _procs_mentioning(wd.group(1)) == []
    # the daemons' argv all name the namespace or the workdir; nothing runs in a gone netns
    assert _procs_mentioning(ns_server) == [] and _procs_mentioning(ns_client) == []


def test_demo_proves_the_tunnel_and_cleans_up() -> None:
    t0 = time.monotonic()
    res = subprocess.run(ARGV, capture_output=True, text=True, timeout=90, env=_env(),
                         cwd="/")
    took = time.monotonic() - t0
    out = res.stdout + res.stderr
    print(out)
    assert res.returncode == 0, out
    assert re.search(r"ping 198\.51\.100\.1 through the tunnel: 3/3 replies", out), out
    assert "ping 2001:db8:100::1: ok" in out
    # the real `ovpnctl status` text of the server, with exactly one client
    assert re.search(r"^server \S+server\.conf  pid \d+  engine (userspace|kernel)  interface \w+  "
                     r"state running$", out, re.M), out
    assert "(1 peer)" in out
    [row] = [ln for ln in out.splitlines() if "demo-client" in ln and "AES-256-GCM" in ln]
    assert re.search(r"\b192\.0\.2\.2:\d+\s+198\.51\.100\.2,2001:db8:100::1000\b", row), row
    assert "demo passed" in out and "cleaned up" in out
    assert_nothing_left(out)
    assert took < 30, f"demo took {took:.1f} s"
    print(f"ovpnctl demo took {took:.1f} s")


@pytest.mark.parametrize("sig,after", [(signal.SIGINT, "[3/5]"), (signal.SIGINT, "[4/5]"),
                                       (signal.SIGTERM, "[1/5]")])
def test_demo_interrupted_removes_everything(sig: signal.Signals, after: str) -> None:
    """Ctrl-C (SIGINT) or SIGTERM at different steps: exit 130, nothing left."""
    p = subprocess.Popen(ARGV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(), cwd="/")
    out = ""
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 60
        while after not in out and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            out += line
        assert after in out, out
        p.send_signal(sig)
        rest, _ = p.communicate(timeout=60)
        out += rest
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    print(out)
    assert p.returncode == 130, out
    assert "everything it made was removed" in out
    assert "cleanup incomplete" not in out
    assert_nothing_left(out)


def test_demo_refuses_kernel_engine_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux-only refusal")
    res = subprocess.run([*ARGV, "--engine", "kernel"], capture_output=True, text=True,
                         timeout=60, env=_env(), cwd="/")
    assert res.returncode == 1
    assert "if_ovpn is a FreeBSD kernel module" in res.stderr
    assert "Traceback" not in res.stderr
