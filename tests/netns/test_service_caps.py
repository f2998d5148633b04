"""The systemd units' privileges are enough: the daemons run under exactly those.

``CapabilityBoundingSet`` and ``NoNewPrivileges`` in the shipped units are
applied to real processes with util-linux ``setpriv`` (the same kernel
mechanisms systemd uses), and a tunnel must still come up: the engine under
ovpnctl-engine.service's set, the server (which also drops to nobody) and
the client under their units' sets.  A capability missing from a unit fails
here instead of at an admin's first boot.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bsd_ovpn import demo, service
from bsd_ovpn.testbed.hosts import Lab

pytestmark = [pytest.mark.netns]


def unit_caps(name: str) -> list[str]:
    text = service.shipped_text(name)
    [line] = re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert "NoNewPrivileges=yes" in text
    return line.split()


def setpriv(caps: list[str]) -> list[str]:
    spec = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
    return ["setpriv", "--bounding-set", spec, "--inh-caps", "-all", "--no-new-privs"]


def cap_bnd(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd")


def _wait(pred, proc: subprocess.Popen, log: Path, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"{what}: exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what}:\n{log.read_text()}"
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("setpriv") is None,
                    reason="needs Linux and util-linux setpriv")
def test_daemons_work_with_the_units_capabilities(tmp_path: Path) -> None:
    work = Path(os.environ.get("BOVPN_SHORT_TMP", "/tmp")) / f"bovpn-caps-{os.getpid()}"
    work.mkdir(mode=0o755)
    env = demo.child_env()
    procs: list[subprocess.Popen] = []
    try:
        with Lab() as lab:
            srv, cli = lab.host("server"), lab.host("client")
            lab.link(srv, cli, "192.0.2.1/24", "192.0.2.2/24")
            demo.Demo()._pki(work)
            (work / "server.conf").write_text(demo.server_config(work)
                                              + "user nobody\ngroup nogroup\n")
            (work / "client.conf").write_text(demo.client_config(work))

            def start(host, name: str, caps: list[str], *args: str) -> tuple[subprocess.Popen, Path]:
                log = work / f"{name}.log"
                with open(log, "wb") as fh:
                    p = host.popen([*setpriv(caps), *demo.ovpnctl_argv(*args)], stdout=fh,
                                   stderr=subprocess.STDOUT, env=env, cwd=str(work))
                procs.append(p)
                return p, log

            engine_caps = unit_caps("ovpnctl-engine.service")
            for host, role in ((srv, "server"), (cli, "client")):
                sock = work / f"{role}-engine.sock"
                p, log = start(host, f"{role}-engine", engine_caps, "engine", "run",
                               "--socket", str(sock))
                _wait(sock.exists, p, log, "engine socket")
                caps = unit_caps(f"ovpnctl-{role}@.service")
                d, dlog = start(host, role, caps, role, "-c", str(work / f"{role}.conf"),
                                "--engine", "userspace", "--engine-socket", str(sock),
                                "--control-socket", str(work / f"{role}.ctl"))
                ready = "dropped privileges" if role == "server" else "Initialization Sequence"
                _wait(lambda: ready in dlog.read_text(), d, dlog, ready)
            # the limits really applied: e.g. no CAP_SYS_ADMIN (bit 21) in any daemon
            for p in procs:
                kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                      text=True).stdout.split()
                for pid in [p.pid, *map(int, kids)]:
                    assert not cap_bnd(pid) & (1 << 21)
            assert cli.ping("198.51.100.1", count=2, timeout=15)
            assert srv.ping("198.51.100.2", count=1, timeout=10)
            for p in reversed(procs):
                p.terminate()
                assert p.wait(10) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        shutil.rmtree(work, ignore_errors=True)
