"""Key lifetime end to end: the engine's ROTATE_KEY makes ``ovpnctl server`` renegotiate.

Why: the unit tests prove the data planes raise ROTATE_KEY at the threshold
and refuse past 2**32-1; this proves the loop is closed in real processes --
engine daemon -> GET_PKT -> server daemon -> soft reset with a stock OpenVPN
client -> NEW_KEY/SWAP_KEYS -> traffic keeps flowing on the new key.  The
engine is started with a low threshold (a test-only wrapper that sets
``rotate_threshold`` on every data plane it creates), and time-based
renegotiation is off (``reneg-sec 0``), so only the packet counter can rotate.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from bsd_ovpn.testbed.daemons import DaemonProc, OvpnctlDaemon
from bsd_ovpn.testbed.fixtures import TwoHosts
from bsd_ovpn.testbed.hosts import Host
from bsd_ovpn.testbed.pki import PKI
from bsd_ovpn.testbed.stockovpn import OvpnConfig, WrapKeys

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]

SERVER_VPN = "198.51.100.1"

#: An engine daemon whose data planes rotate at argv[3] packets (argv[2]: data plane kind).
ENGINE_WITH_THRESHOLD = """
import logging, signal, sys
from bsd_ovpn.engine import daemon as d
path, kind, threshold = sys.argv[1], sys.argv[2], int(sys.argv[3])
logging.basicConfig(level=logging.INFO, format="%(asctime)s engine: %(message)s")
base = d.dataplane_factory(kind)
def factory():
    dp = base()
    dp.rotate_threshold = threshold
    return dp
srv = d.EngineDaemon(path, engine=d.Engine(d.LinuxHost(factory)))
signal.signal(signal.SIGTERM, srv.stop)
print("engine with rotate_threshold", threshold, "ready", flush=True)
srv.serve_forever()
"""


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sockdir = Path(tempfile.mkdtemp(prefix="bovpn-h14-"))
        self.procs: list[DaemonProc] = []

    def engine(self, host: Host, kind: str, threshold: int) -> str:
        sock = str(self.sockdir / f"e{len(self.procs)}.sock")
        p = DaemonProc(host, f"engine-{kind}", [sys.executable, "-c", ENGINE_WITH_THRESHOLD,
                                                 sock, kind, str(threshold)],
                       self.tmp / f"engine-{len(self.procs)}.log")
        self.procs.append(p)
        p.wait_for("ready", 20)
        return sock

    def server(self, host: Host, cfg: OvpnConfig, engine_sock: str,
               role: str = "server") -> OvpnctlDaemon:
        path = self.tmp / f"{role}.conf"
        path.write_text(cfg.render())
        d = OvpnctlDaemon(host, role, role, path, str(self.sockdir / f"{role}.ctl"),
                          ["--engine", "userspace", "--engine-socket", engine_sock],
                          self.tmp / f"{role}.log")
        self.procs.append(d)
        return d

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(8)
            except Exception:  # noqa: BLE001 - teardown: SIGKILLed by stop()
                pass
            print(f"----- {p.name} -----\n{p.log_tail(40)}")
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "fast"])
def test_rotate_key_renegotiates_with_stock_client(two_hosts: TwoHosts, pki: PKI,
                                                   wrap_keys: WrapKeys, stock_openvpn,
                                                   procs: Procs, kind: str) -> None:
    two = two_hosts
    if kind == "fast":
        pytest.importorskip("bsd_ovpn.engine.fastpath")
    threshold = 60
    eng = procs.engine(two.server, kind, threshold)
    cfg = OvpnConfig.server(pki, wrap_keys, local=two.server_ip, topology="subnet",
                            keepalive=(10, 60), reneg_sec=0,
                            extra=("hand-window 6",))
    srv = procs.server(two.server, cfg, eng)
    srv.wait_ready(30)
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("rot"),
                               reneg_sec=0)
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), srv.log_tail()
    [c] = srv.status()["clients"]
    assert c["key_id"] == 0
    # well past the threshold: the server's TX counter (echo replies) hits 60
    res = two.client.run(["ping", "-c", "150", "-i", "0.01", "-W", "1", SERVER_VPN],
                         check=False, timeout=30)
    assert " 0% packet loss" in res.stdout or "150 received" in res.stdout, res.stdout
    st = srv.wait_status(lambda s: s["clients"] and s["clients"][0]["key_id"] >= 1,
                         timeout=20, what="a renegotiated key (key_id >= 1)")
    print("after rotation:", st["clients"][0]["key_id"])
    # the stock client saw a server-initiated soft reset, and the tunnel works on the new key
    cli.wait_for(r"Data Channel: (using negotiated cipher|cipher)", timeout=5)
    assert two.client.ping(SERVER_VPN, count=5, timeout=15)
    # the new key has its own counter: another 60+ packets rotate again
    two.client.run(["ping", "-c", "150", "-i", "0.01", "-W", "1", SERVER_VPN],
                   check=False, timeout=30)
    srv.wait_status(lambda s: s["clients"] and s["clients"][0]["key_id"] >= 2,
                    timeout=20, what="a second rotation (key_id >= 2)")
    assert two.client.ping(SERVER_VPN, count=3, timeout=15)
    assert srv.count(r"Traceback") == 0, srv.log_tail()
    assert srv.stop() == 0
    # three keys were negotiated and installed at -v (DEBUG): no key-sized hex/base64 in any log
    for p in procs.procs:
        assert not re.search(r"[0-9a-fA-F]{32,}|[A-Za-z0-9+/]{43}=", p.log), \
            f"{p.name}: key-like material in the log"


@pytest.mark.slow
def test_rotate_key_renegotiates_ovpnctl_client_with_stock_server(
        two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys, stock_openvpn, procs: Procs) -> None:
    """The client side: its engine's TX counter hits the threshold, the client daemon
    starts the soft reset towards a stock server."""
    two = two_hosts
    stock_openvpn.server(two.server, local=two.server_ip, topology="subnet",
                         keepalive=(10, 60), reneg_sec=0).wait_ready(30)
    eng = procs.engine(two.client, "auto", 60)
    cfg = OvpnConfig.client(pki, wrap_keys, remote=two.server_ip, cert=pki.client("crot"),
                            reneg_sec=0, extra=("hand-window 6",))
    cli = procs.server(two.client, cfg, eng, role="client")
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), cli.log_tail()
    assert cli.status()["clients"][0]["key_id"] == 0
    two.client.run(["ping", "-c", "150", "-i", "0.01", "-W", "1", SERVER_VPN], check=False,
                   timeout=30)
    cli.wait_status(lambda s: s["clients"] and s["clients"][0]["key_id"] >= 1, timeout=25,
                    what="a client-initiated renegotiation (key_id >= 1)")
    assert two.client.ping(SERVER_VPN, count=5, timeout=15)
    assert cli.count("Traceback") == 0, cli.log_tail()
    assert cli.stop() == 0
