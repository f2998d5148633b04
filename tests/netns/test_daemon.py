"""``ovpnctl server`` / ``ovpnctl client`` against stock OpenVPN 2.6 and each other.

Each side runs in its own network namespace with its own userspace engine
daemon (the if_ovpn stand-in on Linux); the daemons are started as real
processes with the real CLI, so signals, the control socket and cleanup are
tested the way an admin uses them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bsd_ovpn.testbed.fixtures import TwoHosts
from bsd_ovpn.testbed.hosts import Host, PingResult, parse_ping
from bsd_ovpn.testbed.stockovpn import OvpnConfig, WrapKeys
from bsd_ovpn.testbed.pki import PKI

pytestmark = [pytest.mark.netns, pytest.mark.openvpn]
REPO = Path(__file__).resolve().parents[2]
SERVER_VPN, FIRST_CLIENT_VPN = "198.51.100.1", "198.51.100.2"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {needle!r} within {timeout} s:\n"
                                     f"{self.text()[-4000:]}")
            time.sleep(0.1)


class Daemons:
    """Engine daemons and ovpnctl processes of one test; all stopped at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def _popen(self, host: Host, name: str, argv: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "w") as f:
            p = host.popen(argv, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(REPO))
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def engine(self, host: Host, name: str) -> str:
        path = str(self.workdir / f"{name}-engine.sock")
        p = self._popen(host, f"{name}-engine",
                        [sys.executable, "-m", "bsd_ovpn.engine", "--socket", path])
        deadline = time.monotonic() + 15
        while not os.path.exists(path):
            assert p.proc.poll() is None, p.text()
            assert time.monotonic() < deadline, "engine did not start"
            time.sleep(0.05)
        return path

    def ovpnctl(self, host: Host, name: str, role: str, config: Path, engine_sock: str) -> Proc:
        ctl = str(self.workdir / f"{name}.ctl")
        return self._popen(host, name, [
            sys.executable, "-c", "from bsd_ovpn.cli import main; main()", role, "-c",
            str(config), "--engine", "userspace", "--engine-socket", engine_sock,
            "--control-socket", ctl, "-v"])

    def stop(self, proc: Proc, timeout: float = 10.0) -> int:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGTERM)
        try:
            return proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.proc.kill()
            proc.proc.wait(5)
            raise AssertionError(f"{proc.name} did not exit on SIGTERM:\n{proc.text()[-3000:]}")

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
                try:
                    p.proc.wait(8)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait(5)


@pytest.fixture
def daemons(tmp_path: Path, request: pytest.FixtureRequest):
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.close()
        for p in d.procs:
            print(f"----- {p.name} log -----\n{p.text()[-3000:]}")


def status(daemons: Daemons, name: str, host: Host) -> dict:
    ctl = str(daemons.workdir / f"{name}.ctl")
    res = host.run([sys.executable, "-c", "from bsd_ovpn.cli import main; main()", "status",
                    "--json", "--control-socket", ctl], timeout=20)
    return json.loads(res.stdout)


def server_config(pki: PKI, keys: WrapKeys, two: TwoHosts, tmp: Path, **kw: object) -> Path:
    cfg = OvpnConfig.server(pki, keys, local=two.server_ip, topology="subnet",
                            keepalive=(2, 10), **kw)
    path = tmp / "server.conf"
    path.write_text(cfg.render())
    return path


def client_config(pki: PKI, keys: WrapKeys, two: TwoHosts, tmp: Path, name: str = "client",
                  **kw: object) -> Path:
    cfg = OvpnConfig.client(pki, keys, remote=two.server_ip, cert=pki.client(name), **kw)
    path = tmp / f"{name}.conf"
    path.write_text(cfg.render())
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_interfaces(path: str) -> list[str]:
    from bsd_ovpn.engine.transport import EngineTransport

    with EngineTransport(path) as tr:
        return tr.list_interfaces()


def ifaces_without_lo(host: Host) -> list[str]:
    return [i for i in host.interfaces() if i != "lo"]


# --------------------------------------------------------------------------- tests

@pytest.mark.iperf3
def test_stock_client_to_ovpnctl_server(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                        stock_openvpn, daemons: Daemons, iperf,
                                        tmp_path: Path) -> None:
    two = two_hosts
    before = ifaces_without_lo(two.server)
    eng = daemons.engine(two.server, "srv")
    status_file = tmp_path / "openvpn-status.log"
    conf = server_config(pki, wrap_keys, two, tmp_path, subnet6="2001:db8:100::/64",
                         extra=(f"status {status_file} 1", "status-version 2"))
    srv = daemons.ovpnctl(two.server, "srv", "server", conf, eng)
    srv.wait_log("listening on")
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("alice"))
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), srv.text()[-3000:]
    assert two.server.ping(FIRST_CLIENT_VPN, count=3, timeout=10)
    assert two.client.ping("2001:db8:100::1", count=2, timeout=10)
    assert two.server.ping("2001:db8:100::1000", count=2, timeout=10)
    result = iperf.run(two.server, two.client, SERVER_VPN, seconds=2)
    assert result.received_bps > 1e6
    st = status(daemons, "srv", two.server)
    assert st["role"] == "server" and st["engine"] == "userspace"
    [c] = st["clients"]
    assert c["common_name"] == "alice"
    assert c["vpn_ipv4"] == FIRST_CLIENT_VPN
    assert c["real_address"].startswith(two.client_ip + ":")
    assert c["cipher"] == "AES-256-GCM" and c["key_id"] == 0
    assert c["packets_out"] > 3
    # GET_PEER_STATS counted at least what iperf3 pushed through the tunnel
    assert c["bytes_in"] >= 0.8 * result.received_bps * 2 / 8
    assert c["vpn_ipv6"] == "2001:db8:100::1000"
    time.sleep(1.2)
    rows = [r.split(",") for r in status_file.read_text().splitlines()]
    [row] = [r for r in rows if r[0] == "CLIENT_LIST"]
    assert row[1:5] == ["alice", c["real_address"], FIRST_CLIENT_VPN, "2001:db8:100::1000"]
    assert int(row[5]) >= c["bytes_in"]
    print(f"iperf3 through ovpnctl server: {result.received_bps / 1e6:.1f} Mbit/s; "
          f"status bytes_in {c['bytes_in']}")
    assert daemons.stop(srv) == 0
    cli.wait_for(r"RESTART|SIGUSR1|Inactivity|EXIT", timeout=15)
    assert ifaces_without_lo(two.server) == before
    assert engine_interfaces(eng) == []


@pytest.mark.slow
@pytest.mark.iperf3
def test_ovpnctl_client_to_stock_server(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                        stock_openvpn, daemons: Daemons, iperf,
                                        tmp_path: Path) -> None:
    two = two_hosts
    before = ifaces_without_lo(two.client)
    stock_openvpn.server(two.server, local=two.server_ip, topology="subnet",
                         keepalive=(2, 10)).wait_ready(30)
    eng = daemons.engine(two.client, "cli")
    cli = daemons.ovpnctl(two.client, "cli", "client",
                          client_config(pki, wrap_keys, two, tmp_path, "bob"), eng)
    cli.wait_log("Initialization Sequence Completed")
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), cli.text()[-3000:]
    assert two.server.ping(FIRST_CLIENT_VPN, count=3, timeout=10)
    st = status(daemons, "cli", two.client)
    assert st["role"] == "client" and st["state"] == "connected"
    [peer] = st["clients"]
    assert peer["real_address"] == f"{two.server_ip}:1194"
    assert peer["vpn_ipv4"] == FIRST_CLIENT_VPN and peer["packets_in"] >= 3
    # bulk data both ways through our client's data channel
    up = iperf.run(two.server, two.client, SERVER_VPN, seconds=2)
    down = iperf.run(two.server, two.client, SERVER_VPN, seconds=2, reverse=True)
    assert up.received_bps > 1e6 and down.received_bps > 1e6
    [peer] = status(daemons, "cli", two.client)["clients"]
    # GET_PEER_STATS saw (at least most of) what iperf3 carried
    assert peer["bytes_out"] >= 0.8 * up.received_bytes
    assert peer["bytes_in"] >= 0.8 * down.received_bytes
    print(f"iperf3 through ovpnctl client: up {up.received_bps / 1e6:.1f} Mbit/s, "
          f"down {down.received_bps / 1e6:.1f} Mbit/s")
    assert daemons.stop(cli) == 0
    assert ifaces_without_lo(two.client) == before


@pytest.mark.slow
def test_ovpnctl_client_to_ovpnctl_server(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                          daemons: Daemons, tmp_path: Path) -> None:
    two = two_hosts
    before = {h.name: ifaces_without_lo(h) for h in (two.server, two.client)}
    # the server drops to nobody/nogroup after setup, as OpenVPN does with user/group
    srv = daemons.ovpnctl(two.server, "srv", "server",
                          server_config(pki, wrap_keys, two, tmp_path,
                                        extra=("user nobody", "group nogroup")),
                          daemons.engine(two.server, "srv"))
    srv.wait_log("dropped privileges")
    cli = daemons.ovpnctl(two.client, "cli", "client",
                          client_config(pki, wrap_keys, two, tmp_path, "carol"),
                          daemons.engine(two.client, "cli"))
    cli.wait_log("Initialization Sequence Completed")
    assert two.client.ping(SERVER_VPN, count=3, timeout=15), srv.text()[-2000:]
    assert two.server.ping(FIRST_CLIENT_VPN, count=3, timeout=10)
    sst = status(daemons, "srv", two.server)
    cst = status(daemons, "cli", two.client)
    [c] = sst["clients"]
    [s] = cst["clients"]
    assert c["common_name"] == "carol" and c["peer_id"] == s["peer_id"]
    assert c["cipher"] == s["cipher"] == "AES-256-GCM"
    # what one side sent, the other received (pings and keepalives both ways)
    assert c["packets_in"] >= 3 and s["packets_in"] >= 3
    # an idle tunnel costs (almost) no CPU in either daemon: no busy timer loop
    used = [cpu_seconds(p.proc.pid) for p in (srv, cli)]
    time.sleep(3)
    used = [cpu_seconds(p.proc.pid) - u for p, u in zip((srv, cli), used)]
    assert max(used) < 0.3, used
    # kill: RESTART to our client, which acks it (the server forgets it at once) and reconnects
    killed_at = time.monotonic()
    res = two.server.run([sys.executable, "-c", "from bsd_ovpn.cli import main; main()", "kill",
                          "carol", "--control-socket", str(daemons.workdir / "srv.ctl")])
    assert "disconnected peer id" in res.stdout
    srv.wait_log("disconnected: restart", timeout=5)
    forgotten = time.monotonic() - killed_at
    assert forgotten < 1.5, forgotten                  # the ACK, not RESTART_LINGER (2.5 s)
    cli.wait_log("server sent RESTART", timeout=5)
    deadline = time.monotonic() + 30
    while cli.text().count("Initialization Sequence Completed") < 2:
        assert time.monotonic() < deadline, cli.text()[-3000:]
        time.sleep(0.1)
    assert two.client.ping(SERVER_VPN, count=2, timeout=15)
    print(f"killed ovpnctl client forgotten after {forgotten:.2f} s")
    # SIGTERM on the client: EXIT reaches the server, which forgets it at once
    srv_mark = srv.text().count("disconnected")
    assert daemons.stop(cli) == 0
    deadline = time.monotonic() + 10
    while srv.text().count("disconnected") <= srv_mark:
        assert time.monotonic() < deadline, srv.text()[-3000:]
        time.sleep(0.1)
    assert status(daemons, "srv", two.server)["clients"] == []
    assert daemons.stop(srv) == 0
    for h in (two.server, two.client):
        assert ifaces_without_lo(h) == before[h.name]


@pytest.mark.slow
def test_stock_client_rekey_kill_and_sighup(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                            stock_openvpn, daemons: Daemons,
                                            tmp_path: Path) -> None:
    """Server-initiated renegotiation (NEW_KEY slot 1, SWAP_KEYS) with a stock client,
    ``ovpnctl kill``, and SIGHUP keeping the client."""
    two = two_hosts
    conf = server_config(pki, wrap_keys, two, tmp_path, extra=("reneg-sec 6",))
    srv = daemons.ovpnctl(two.server, "srv", "server", conf, daemons.engine(two.server, "srv"))
    srv.wait_log("listening on")
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("dave"))
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=2, timeout=15)
    # reneg-sec 6: new key in slot 1 at ~6 s, TX moves at +3 s (reneg-sec/2)
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        [c] = status(daemons, "srv", two.server)["clients"]
        if c["key_id"] >= 1:
            break
        time.sleep(1)
    assert c["key_id"] >= 1, srv.text()[-3000:]
    assert two.client.ping(SERVER_VPN, count=3, timeout=10)
    assert two.server.ping(FIRST_CLIENT_VPN, count=2, timeout=10)
    # SIGHUP: config re-read, the client stays
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_log("reloaded")
    assert [c["common_name"] for c in status(daemons, "srv", two.server)["clients"]] == ["dave"]
    # kill: RESTART to the client, which reconnects
    mark = cli.mark()
    res = two.server.run([sys.executable, "-c", "from bsd_ovpn.cli import main; main()", "kill",
                          "dave", "--control-socket", str(daemons.workdir / "srv.ctl")])
    assert "disconnected peer id" in res.stdout
    killed_at = time.monotonic()
    # RESTART only (no EXIT after it): the old session ends when the RESTART is acked,
    # or after RESTART_LINGER (2.5 s) at the latest -- not after EXIT's 5 s
    # (a stock client never acks it: it restarts at once, so the old session goes at
    # 2.5 s or earlier, when the reconnecting client replaces it)
    srv.wait_log(f"dave ({c['real_address']}) disconnected", timeout=4)
    print(f"killed session gone after {time.monotonic() - killed_at:.2f} s")
    cli.wait_for(r"Initialization Sequence Completed", timeout=30, since=mark)
    assert two.client.ping(SERVER_VPN, count=2, timeout=15)
    assert daemons.stop(srv) == 0


@pytest.mark.slow
def test_ovpnctl_client_ping_restart_reconnects(two_hosts: TwoHosts, pki: PKI,
                                                wrap_keys: WrapKeys, stock_openvpn,
                                                daemons: Daemons, tmp_path: Path) -> None:
    """The server vanishes: the engine's keepalive deletes the peer (DEL_PEER/TIMEOUT), the
    client tears the tunnel down and reconnects once a server is back."""
    two = two_hosts
    first = stock_openvpn.server(two.server, local=two.server_ip, topology="subnet",
                                 keepalive=(1, 3))
    first.wait_ready(30)
    eng = daemons.engine(two.client, "cli")
    cli = daemons.ovpnctl(two.client, "cli", "client",
                          client_config(pki, wrap_keys, two, tmp_path, "erin"), eng)
    cli.wait_log("Initialization Sequence Completed")
    assert two.client.ping(SERVER_VPN, count=2, timeout=15)
    first.stop()
    cli.wait_log("keepalive timeout", timeout=20)
    assert engine_interfaces(eng) == []          # torn down while the server is away
    stock_openvpn.server(two.server, local=two.server_ip, topology="subnet",
                         keepalive=(1, 3), name="server2").wait_ready(30)
    deadline = time.monotonic() + 40
    while cli.text().count("Initialization Sequence Completed") < 2:
        assert time.monotonic() < deadline, cli.text()[-3000:]
        time.sleep(0.2)
    assert two.client.ping(SERVER_VPN, count=2, timeout=15)
    assert daemons.stop(cli) == 0
    assert engine_interfaces(eng) == []


@pytest.mark.parametrize("wrap", ["tls-auth", "tls-crypt-v2", "none"])
def test_stock_client_wrappings(two_hosts: TwoHosts, pki: PKI, wrap_keys: WrapKeys,
                                stock_openvpn, daemons: Daemons, tmp_path: Path,
                                wrap: str) -> None:
    two = two_hosts
    conf = server_config(pki, wrap_keys, two, tmp_path, wrap=wrap)
    srv = daemons.ovpnctl(two.server, "srv", "server", conf, daemons.engine(two.server, "srv"))
    srv.wait_log("listening on")
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("frank"),
                               wrap=wrap)
    cli.wait_ready(30)
    assert two.client.ping(SERVER_VPN, count=2, timeout=15), srv.text()[-3000:]
    res = two.server.run([sys.executable, "-c", "from bsd_ovpn.cli import main; main()",
                          "status", "--format", "prometheus", "--control-socket",
                          str(daemons.workdir / "srv.ctl")])
    assert 'ovpnctl_peers{role="server",' in res.stdout
    assert 'common_name="frank"' in res.stdout
    assert daemons.stop(srv) == 0


def test_two_stock_clients_reach_each_other(lab, pki: PKI, wrap_keys: WrapKeys, stock_openvpn,
                                            daemons: Daemons, tmp_path: Path) -> None:
    """Several peers on one interface: the data channel picks the peer by VPN address."""
    srv_h, a, b = lab.host("srv"), lab.host("a"), lab.host("b")
    lab.segment([srv_h, a, b], ["192.0.2.1/24", "192.0.2.2/24", "192.0.2.3/24"])
    conf = OvpnConfig.server(pki, wrap_keys, local="192.0.2.1", topology="subnet",
                             keepalive=(2, 10), extra=("client-to-client",))
    path = tmp_path / "server.conf"
    path.write_text(conf.render())
    srv = daemons.ovpnctl(srv_h, "srv", "server", path, daemons.engine(srv_h, "srv"))
    srv.wait_log("listening on")
    ca = stock_openvpn.client(a, remote="192.0.2.1", cert=pki.client("gina"), name="a")
    cb = stock_openvpn.client(b, remote="192.0.2.1", cert=pki.client("hank"), name="b")
    ca.wait_ready(30)
    cb.wait_ready(30)
    clients = {c["common_name"]: c for c in status(daemons, "srv", srv_h)["clients"]}
    assert sorted(clients) == ["gina", "hank"]
    assert clients["gina"]["peer_id"] != clients["hank"]["peer_id"]
    ip_a, ip_b = clients["gina"]["vpn_ipv4"], clients["hank"]["vpn_ipv4"]
    assert srv_h.ping(ip_a, count=2, timeout=15) and srv_h.ping(ip_b, count=2, timeout=15)
    assert a.ping(ip_b, count=2, timeout=15)            # through the server, both peers
    assert daemons.stop(srv) == 0


def test_iroute_routes_a_network_behind_a_client(two_hosts: TwoHosts, pki: PKI,
                                                 wrap_keys: WrapKeys, stock_openvpn,
                                                 daemons: Daemons, tmp_path: Path) -> None:
    """client-config-dir iroute: a kernel route via the client's VPN address (metric 100),
    removed again when the client goes."""
    two = two_hosts
    ccd = tmp_path / "ccd"
    ccd.mkdir()
    (ccd / "ivan").write_text("iroute 198.51.100.192 255.255.255.192\n")
    conf = OvpnConfig.server(pki, wrap_keys, local=two.server_ip, topology="subnet",
                             subnet="198.51.100.0/25", keepalive=(2, 10),
                             extra=(f"client-config-dir {ccd}",))
    path = tmp_path / "server.conf"
    path.write_text(conf.render())
    srv = daemons.ovpnctl(two.server, "srv", "server", path, daemons.engine(two.server, "srv"))
    srv.wait_log("listening on")
    two.client.run(["ip", "addr", "add", "198.51.100.193/32", "dev", "lo"])
    cli = stock_openvpn.client(two.client, remote=two.server_ip, cert=pki.client("ivan"))
    cli.wait_ready(30)
    [c] = status(daemons, "srv", two.server)["clients"]
    assert c["iroutes"] == ["198.51.100.192/26"]
    route = two.server.run(["ip", "route", "show", "198.51.100.192/26"]).stdout
    assert f"via {c['vpn_ipv4']}" in route and "metric 100" in route
    assert two.server.ping("198.51.100.193", count=2, timeout=15), srv.text()[-2000:]
    cli.stop()                                   # so that it cannot come back at once
    res = two.server.run([sys.executable, "-c", "from bsd_ovpn.cli import main; main()", "kill",
                          "--json", "ivan", "--control-socket", str(daemons.workdir / "srv.ctl")])
    assert json.loads(res.stdout) == {"killed": [c["peer_id"]]}
    srv.wait_log("disconnected", timeout=15)
    assert two.server.run(["ip", "route", "show", "198.51.100.192/26"]).stdout.strip() == ""
    assert daemons.stop(srv) == 0


def _ping_all(jobs: list[tuple[Host, str]], count: int = 2, timeout: float = 20.0
              ) -> list[PingResult]:
    """Run many pings at once (one process each) and parse them; bounded by ``timeout``."""
    procs = []
    for host, addr in jobs:
        argv = host.ping_argv(addr, count, timeout, 0.2, None)
        procs.append(host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True))
    results = []
    for (host, addr), p in zip(jobs, procs):
        out, _ = p.communicate(timeout=timeout + 10)
        results.append(parse_ping(addr, p.returncode, out, count))
    return results


def _udp_ports(host: Host) -> set[str]:
    """Local ports of the UDP sockets in the host (ss; a nobind client has 0.0.0.0:PORT)."""
    out = host.run(["ss", "-Hnu", "-a"]).stdout
    return {line.split()[3].rsplit(":", 1)[1] for line in out.splitlines()
            if len(line.split()) >= 5}


N_CLIENTS = 20


@pytest.mark.slow
def test_twenty_stock_clients_with_client_to_client(lab, pki: PKI, wrap_keys: WrapKeys,
                                                    stock_openvpn, daemons: Daemons,
                                                    tmp_path: Path) -> None:
    """20 stock clients (one namespace each) on one ``ovpnctl server``: every one pings the
    server and another client; status lists them all with what each client really has."""
    t0 = time.monotonic()
    srv_h = lab.host("srv")
    hosts = [lab.host(f"c{i}") for i in range(N_CLIENTS)]
    outer = {f"user{i:02d}": f"192.0.2.{10 + i}" for i in range(N_CLIENTS)}
    lab.segment([srv_h, *hosts], ["192.0.2.1/24", *[f"{ip}/24" for ip in outer.values()]])
    conf = OvpnConfig.server(pki, wrap_keys, local="192.0.2.1", topology="subnet",
                             keepalive=(2, 10), extra=("client-to-client",))
    path = tmp_path / "server.conf"
    path.write_text(conf.render())
    before = ifaces_without_lo(srv_h)
    eng = daemons.engine(srv_h, "srv")
    srv = daemons.ovpnctl(srv_h, "srv", "server", path, eng)
    srv.wait_log("listening on")
    certs = {cn: pki.client(cn) for cn in outer}
    peers = {cn: stock_openvpn.client(h, remote="192.0.2.1", cert=certs[cn], name=cn)
             for h, cn in zip(hosts, outer)}
    for cn, peer in peers.items():
        peer.wait_ready(max(5.0, 45 - (time.monotonic() - t0)))
    connected = time.monotonic() - t0

    st = status(daemons, "srv", srv_h)
    clients = {c["common_name"]: c for c in st["clients"]}
    assert sorted(clients) == sorted(outer), sorted(clients)
    assert len({c["peer_id"] for c in clients.values()}) == N_CLIENTS
    assert len({c["vpn_ipv4"] for c in clients.values()}) == N_CLIENTS
    for (cn, peer), host in zip(peers.items(), hosts):
        c = clients[cn]
        # the real address is the client's own socket (IP of its namespace, its port)
        ip, port = c["real_address"].rsplit(":", 1)
        assert ip == outer[cn], (cn, c["real_address"])
        assert port in _udp_ports(host), (cn, c["real_address"])
        # the VPN address is the one the client put on its tun, the peer id the pushed one
        addrs = host.addresses(peer.opened_dev)
        assert f"{c['vpn_ipv4']}/24" in addrs, (cn, c["vpn_ipv4"], addrs)
        pushed = peer.wait_for(r"PUSH_REPLY,[^']*peer-id (\d+)", timeout=1)
        assert int(pushed.group(1)) == c["peer_id"], cn
        assert c["cipher"] == "AES-256-GCM" and c["key_id"] == 0

    # every client pings the server and the next client (client-to-client via the server)
    cns = list(outer)
    jobs: list[tuple[Host, str]] = []
    for i, (cn, host) in enumerate(zip(cns, hosts)):
        jobs.append((host, SERVER_VPN))
        jobs.append((host, clients[cns[(i + 1) % N_CLIENTS]]["vpn_ipv4"]))
    results = _ping_all(jobs)
    failed = [(h.name, r.destination, r.received) for (h, _a), r in zip(jobs, results) if not r]
    assert not failed, (failed, srv.text()[-3000:])
    after = {c["common_name"]: c for c in status(daemons, "srv", srv_h)["clients"]}
    # each client sent >= 2 echo requests to the server and >= 2 to its neighbour, and
    # received the replies of its own pings and of its predecessor's
    for cn in cns:
        assert after[cn]["packets_in"] >= 4 and after[cn]["packets_out"] >= 4, after[cn]
    print(f"{N_CLIENTS} stock clients connected in {connected:.1f} s; "
          f"whole test so far {time.monotonic() - t0:.1f} s")
    # SIGTERM: nothing left behind on the server (interface, peers, process)
    assert daemons.stop(srv) == 0
    assert ifaces_without_lo(srv_h) == before
    assert engine_interfaces(eng) == []
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_vanished_stock_client_is_reaped_by_keepalive(lab, pki: PKI, wrap_keys: WrapKeys,
                                                      stock_openvpn, daemons: Daemons,
                                                      tmp_path: Path) -> None:
    """kill -9 of a stock client: no EXIT, no RESTART; the engine's keepalive deletes the
    peer (DEL_PEER/TIMEOUT) and the server forgets the client; the others stay."""
    srv_h, a, b = lab.host("srv"), lab.host("a"), lab.host("b")
    lab.segment([srv_h, a, b], ["192.0.2.1/24", "192.0.2.2/24", "192.0.2.3/24"])
    # keepalive 1 3: clients get ping 1 / ping-restart 3; the server's peers time out
    # after 6 s (OpenVPN doubles the timeout on the server)
    conf = OvpnConfig.server(pki, wrap_keys, local="192.0.2.1", topology="subnet",
                             keepalive=(1, 3))
    path = tmp_path / "server.conf"
    path.write_text(conf.render())
    srv = daemons.ovpnctl(srv_h, "srv", "server", path, daemons.engine(srv_h, "srv"))
    srv.wait_log("listening on")
    ca = stock_openvpn.client(a, remote="192.0.2.1", cert=pki.client("kate"), name="a")
    cb = stock_openvpn.client(b, remote="192.0.2.1", cert=pki.client("liam"), name="b")
    ca.wait_ready(30)
    cb.wait_ready(30)
    clients = {c["common_name"]: c for c in status(daemons, "srv", srv_h)["clients"]}
    assert sorted(clients) == ["kate", "liam"]
    assert a.ping(SERVER_VPN, count=2, timeout=15) and b.ping(SERVER_VPN, count=2, timeout=15)
    gone = clients["kate"]["peer_id"]
    assert ca.proc is not None
    ca.proc.kill()                                # SIGKILL: the client says nothing
    ca.proc.wait(5)
    killed_at = time.monotonic()
    srv.wait_log(f"peer {gone} kate: keepalive timeout", timeout=15)
    srv.wait_log("disconnected: ping-restart", timeout=5)
    took = time.monotonic() - killed_at
    # the last packet from kate was < 1 s before the kill: the peer goes at ~6 s
    assert 4.0 <= took <= 6 + 4, took
    assert [c["common_name"] for c in status(daemons, "srv", srv_h)["clients"]] == ["liam"]
    # the survivor still works (the keepalive did not touch it)
    assert b.ping(SERVER_VPN, count=2, timeout=10)
    print(f"killed client reaped after {took:.1f} s")
    assert daemons.stop(srv) == 0


@pytest.mark.slow
def test_host_forwarding_decides_client_to_client(lab, pki: PKI, wrap_keys: WrapKeys,
                                                  stock_openvpn, daemons: Daemons,
                                                  tmp_path: Path) -> None:
    """What docs/daemon.md says: ovpnctl never forwards between clients itself; with if_ovpn
    the host's IP stack does, with or without ``client-to-client``."""
    srv_h, a, b = lab.host("srv"), lab.host("a"), lab.host("b")
    lab.segment([srv_h, a, b], ["192.0.2.1/24", "192.0.2.2/24", "192.0.2.3/24"])
    conf = OvpnConfig.server(pki, wrap_keys, local="192.0.2.1", topology="subnet",
                             keepalive=(2, 10))                  # no client-to-client
    path = tmp_path / "server.conf"
    path.write_text(conf.render())
    srv = daemons.ovpnctl(srv_h, "srv", "server", path, daemons.engine(srv_h, "srv"))
    srv.wait_log("listening on")
    assert "no client-to-client, but this host's IP stack forwards" in srv.text()
    ca = stock_openvpn.client(a, remote="192.0.2.1", cert=pki.client("mona"), name="a")
    cb = stock_openvpn.client(b, remote="192.0.2.1", cert=pki.client("nick"), name="b")
    ca.wait_ready(30)
    cb.wait_ready(30)
    clients = {c["common_name"]: c for c in status(daemons, "srv", srv_h)["clients"]}
    ip_b = clients["nick"]["vpn_ipv4"]
    assert a.ping(ip_b, count=2, timeout=15)            # forwarding on: they meet
    srv_h.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    assert not a.ping(ip_b, count=1, timeout=3)         # off: nobody forwards
    assert a.ping(SERVER_VPN, count=1, timeout=10) and b.ping(SERVER_VPN, count=1, timeout=10)
    assert daemons.stop(srv) == 0
