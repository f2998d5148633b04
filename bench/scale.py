"""Scale: N simulated clients against ``ovpnctl server`` and stock OpenVPN 2.6, one run.

Not a test: it prints figures.  Two network namespaces joined by a veth pair:
the server at 192.0.2.1, the load generator (:mod:`bsd_ovpn.loadgen`) at
192.0.2.2 plus ``--sources`` more addresses from 192.0.2.0/24 (or, with
``--ipv6``, 2001:db8:2::1 and sources from 2001:db8:2::/64).  Each simulated
client has its own UDP socket (own source port), its own certificate (CN
client<i>, all sharing one ECDSA P-256 key, so certificate checks are real
and no two clients share a common name), does reset, TLS, key-method 2,
PUSH_REQUEST/PUSH_REPLY, then idles with keepalive pings encrypted with its
data-channel keys.

For each server, in that order: (a) stock ``openvpn``, (b) ``ovpnctl server``
(+ its userspace engine process, Linux), both from the *same* config file:

    proto udp, local 192.0.2.1, dev tun, topology subnet,
    server-ipv6 2001:db8:100::/64     (IPv6-only pool: see below)
    ca/cert/key (ECDSA P-256), dh none, tls-crypt, tls-groups X25519,
    data-ciphers AES-256-GCM, keepalive 10 60, max-clients 2000, rcvbuf 2097152,
    verb 1, disable-dco, status FILE 1

(``tls-groups X25519``: the generator's OpenSSL offers the X25519MLKEM768
post-quantum hybrid first; our server's OpenSSL (3.5+) would take it and
Debian's stock openvpn (OpenSSL 3.0) cannot, so without the line the two
servers would do different key exchanges -- the hybrid costs more CPU and
two more kilobytes per handshake.  The simulated clients offer the same
group only.  ``--tls-groups default`` leaves both out.)

(``ovpnctl server`` sizes its UDP receive buffer to 2 MiB by itself and
ignores ``rcvbuf``; the line gives stock the same buffer -- 4 MiB effective
for both, printed as "server UDP rcvbuf" -- so a burst costs both the same
drops.)

plus, for stock only, ``connect-freq-initial 100000 1``: stock 2.6 answers at
most 100 initial resets per 10 s by default (a reflection-attack guard), which
would make a 1000-client burst take ~100 s and measure that limit rather than
the server; ``ovpnctl server`` has no such limit (and its config parser does
not know the directive).

Why an IPv6-only pool: the only IPv4 range allowed here is 198.51.100.0/24,
whose pool holds 252 clients; a stock server with an exhausted IPv4 pool
still connects clients but without an address, which is not a fair
"connected".  OpenVPN 2.6 accepts ``server-ipv6`` without ``server``
(IPv6-only tunnel; ``topology subnet`` and an ``ifconfig-ipv6-pool`` of
2001:db8:100::1000/64 are implied).  ``--ipv4-pool`` uses
``server 198.51.100.0 255.255.255.0`` in addition (only sensible for N <= 252).

Phases per server: idle RSS -> connect all N (all at once unless ``--rate``)
-> RSS with N connected -> idle ``--idle`` s (keepalives) -> rekey all at once
(client-initiated soft reset, every client at the same moment) -> idle
``--verify`` s so the server's pings arrive on the new keys -> count clients
still up (generator side: not terminated and received data on the new key;
server side: CLIENT_LIST rows of the status file) -> EXIT from every client.

Figures: handshakes/s (N / time to all connected), time to all connected
(first reset sent .. last client's keys ready), p50/p99/max handshake latency
(one client's reset .. its keys ready after PUSH_REPLY), server RSS (VmRSS of
the server process(es) from /proc: idle, all connected, VmHWM; KB per client
above idle), rekey-all time and p99, dropped clients; then ours/stock ratios
against the targets (time and p99 <= 1.0x stock, RSS <= 40 KB/client, rekey
with no client dropped).  Measured figures are printed as measured.

Run as root from the checkout:  python3 bench/scale.py [--clients 1000 | --quick]
[--workers W] [--rate R] [--servers stock,ovpnctl] [--json FILE]
"""
from __future__ import annotations

import abc
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bsd_ovpn.loadgen import (  # noqa: E402
    ClientRecord, ClientSpec, LoadGenerator, LoadPlan, PhaseResult,
)
from bsd_ovpn.proto.keyfile import StaticKey  # noqa: E402
from bsd_ovpn.proto.tls import TLSConfig  # noqa: E402
from bsd_ovpn.proto.wrap import TLSCrypt  # noqa: E402
from bsd_ovpn.testbed.hosts import Host, Lab  # noqa: E402
from bsd_ovpn.testbed.pki import PKI  # noqa: E402
from bsd_ovpn.testbed.stockovpn import StockOpenVPN, WrapKeys, unique_dev_name  # noqa: E402

SERVER4, CLIENT4 = "192.0.2.1", "192.0.2.2"
SERVER6, CLIENT6 = "2001:db8:2::1", "2001:db8:2::2"
PORT = 1194
POOL6 = "2001:db8:100::/64"
TARGET_KB_PER_CLIENT = 40.0


# --------------------------------------------------------------------------- config

def server_config(*, pki: PKI, tls_crypt: Path, dev: str, status: Path, ipv6: bool,
                  ipv4_pool: bool, stock: bool, tls_groups: str | None = None) -> str:
    """The one server config both servers read (stock gets one extra line, see module doc)."""
    cred = pki.server()
    lines = [
        "# bench/scale.py server config",
        f"port {PORT}",
        f"proto {'udp6' if ipv6 else 'udp'}",
        f"local {SERVER6 if ipv6 else SERVER4}",
        f"dev {dev}",
        "dev-type tun",
        "topology subnet",
    ]
    if ipv4_pool:
        lines.append("server 198.51.100.0 255.255.255.0")
    lines += [
        f"server-ipv6 {POOL6}",
        f"ca {pki.ca_path}",
        f"cert {cred.cert_path}",
        f"key {cred.key_path}",
        "dh none",
        f"tls-crypt {tls_crypt}",
        *([f"tls-groups {tls_groups}"] if tls_groups else []),
        "data-ciphers AES-256-GCM",
        "keepalive 10 60",
        "max-clients 2000",
        # ovpnctl server asks for a 2 MiB receive buffer itself (and ignores this line);
        # stock gets the same, so the burst drops neither more nor fewer packets
        "rcvbuf 2097152",
        f"status {status} 1",
        "status-version 2",
        "verb 1",
        "disable-dco",
    ]
    if stock:
        lines.append("connect-freq-initial 100000 1")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- processes

def read_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/VmSize of ``pid`` in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "VmSize"):
            out[k] = int(v.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` (s)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def udp_counters(host: Host) -> dict[str, int]:
    """The Udp/Udp6 lines of /proc/net/snmp(6) inside ``host`` (drops show as RcvbufErrors)."""
    out: dict[str, int] = {}
    try:
        text = host.run(["cat", "/proc/net/snmp"], timeout=10).stdout
        text6 = host.run(["cat", "/proc/net/snmp6"], timeout=10).stdout
    except Exception:  # noqa: BLE001 - informational only
        return out
    lines = [ln.split() for ln in text.splitlines() if ln.startswith("Udp:")]
    if len(lines) == 2:
        out.update({k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])})
    for ln in text6.splitlines():
        parts = ln.split()
        if len(parts) == 2 and parts[0].startswith("Udp6"):
            out[parts[0]] = int(parts[1])
    return out


def udp_datagrams(before: dict[str, int], after: dict[str, int]) -> tuple[int, int]:
    """(received, sent) UDP datagrams (IPv4 + IPv6) between two samples."""
    def delta(*keys: str) -> int:
        return sum(after.get(k, 0) - before.get(k, 0) for k in keys)
    return delta("InDatagrams", "Udp6InDatagrams"), delta("OutDatagrams", "Udp6OutDatagrams")


def udp_drops(before: dict[str, int], after: dict[str, int]) -> int:
    """Datagrams the kernel dropped for a full socket buffer between two samples."""
    keys = ("RcvbufErrors", "Udp6RcvbufErrors")
    return sum(after.get(k, 0) - before.get(k, 0) for k in keys)


def udp_rcvbufs(host: Host) -> list[int]:
    """Receive-buffer sizes (skmem rb, bytes) of the UDP sockets on PORT inside ``host``."""
    try:
        out = host.run(["ss", "-uamnH", f"sport = :{PORT}"], timeout=10).stdout
    except Exception:  # noqa: BLE001 - informational only
        return []
    return [int(m) for m in re.findall(r"\brb(\d+)", out)]


def status_clients(path: Path) -> int | None:
    """CLIENT_LIST rows of an OpenVPN status-version 2 file (None if unreadable)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return sum(1 for line in text.splitlines() if line.startswith("CLIENT_LIST,"))


class ServerUnderTest(abc.ABC):
    """One server implementation: start, its pids (for RSS), stop, log tail."""

    name = "?"

    def __init__(self, host: Host, workdir: Path, config: str) -> None:
        self.host, self.workdir, self.config = host, workdir, config
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "server.conf"
        self.config_path.write_text(config)

    @abc.abstractmethod
    def start(self) -> None:
        """Implemented by each server under test."""

    @abc.abstractmethod
    def pids(self) -> list[int]:
        """Implemented by each server under test."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Implemented by each server under test."""

    @abc.abstractmethod
    def log_tail(self, n: int = 30) -> str:
        """Implemented by each server under test."""

    def rss(self) -> dict[str, int]:
        """VmRSS/VmHWM summed over the server's processes, plus VmRSS per process."""
        tot: dict[str, int] = {"VmRSS": 0, "VmHWM": 0}
        for pid, role in zip(self.pids(), self.roles()):
            st = read_status(pid)
            for k in ("VmRSS", "VmHWM"):
                tot[k] += st.get(k, 0)
            tot[f"VmRSS:{role}"] = st.get("VmRSS", 0)
        return tot

    def roles(self) -> list[str]:
        return ["server"]

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids())

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per process, so a split server (daemon + engine) shows where it goes."""
        return {role: cpu_seconds(pid) for pid, role in zip(self.pids(), self.roles())}


class StockServer(ServerUnderTest):
    name = "stock openvpn"

    def start(self) -> None:
        self.peer = StockOpenVPN(self.host, self.config, self.workdir, "stock").start()
        self.peer.wait_ready(30)

    def pids(self) -> list[int]:
        # ``ip netns exec`` execs openvpn: the Popen pid is openvpn's pid
        return [self.peer.proc.pid] if self.peer.running else []

    def stop(self) -> None:
        self.peer.stop()

    def log_tail(self, n: int = 30) -> str:
        return self.peer.log_tail(n)


class OvpnctlServer(ServerUnderTest):
    """``ovpnctl server`` plus the userspace engine daemon it drives (Linux)."""

    name = "ovpnctl server"

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.engine_sock = str(self.workdir / "engine.sock")
        self.engine_log = self.workdir / "engine.log"
        self.server_log = self.workdir / "ovpnctl.log"
        self._logs = [open(self.engine_log, "w"), open(self.server_log, "w")]
        self.engine = self.host.popen(
            [sys.executable, "-m", "bsd_ovpn.engine", "--socket", self.engine_sock],
            stdout=self._logs[0], stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = time.monotonic() + 20
        while not os.path.exists(self.engine_sock):
            if self.engine.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"userspace engine did not start:\n{self._tail(self.engine_log)}")
            time.sleep(0.05)
        self.proc = self.host.popen(
            [sys.executable, "-c", "from bsd_ovpn.cli import main; main()", "server", "-c",
             str(self.config_path), "--engine", "userspace", "--engine-socket", self.engine_sock,
             "--control-socket", str(self.workdir / "ctl.sock")],
            stdout=self._logs[1], stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        # ready = the UDP port is bound (the daemon logs "listening on")
        deadline = time.monotonic() + 30
        while "listening on" not in self._tail(self.server_log, 200):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ovpnctl server did not start:\n{self._tail(self.server_log)}")
            time.sleep(0.05)

    @staticmethod
    def _tail(path: Path, n: int = 30) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _procs(self) -> list[tuple[str, Any]]:
        return [(r, p) for r, p in (("daemon", getattr(self, "proc", None)),
                                    ("engine", getattr(self, "engine", None)))
                if p is not None and p.poll() is None]

    def pids(self) -> list[int]:
        return [p.pid for _, p in self._procs()]

    def roles(self) -> list[str]:
        return [r for r, _ in self._procs()]

    def stop(self) -> None:
        for p in (getattr(self, "proc", None), getattr(self, "engine", None)):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for fh in getattr(self, "_logs", []):
            fh.close()

    def log_tail(self, n: int = 30) -> str:
        return (f"--- ovpnctl server\n{self._tail(self.server_log, n)}\n"
                f"--- engine\n{self._tail(self.engine_log, n)}")


# --------------------------------------------------------------------------- one run

@dataclass
class RunResult:
    server: str
    n: int
    connect: PhaseResult | None = None
    rekey: PhaseResult | None = None
    rss_idle: dict[str, int] = field(default_factory=dict)
    rss_connected: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    server_cpu_connect: float = math.nan
    server_cpu_connect_by_role: dict[str, float] = field(default_factory=dict)
    gen_cpu_connect: float = math.nan
    status_connected: int | None = None
    status_after_rekey: int | None = None
    alive_after_rekey: int = 0
    new_key_data: int = 0
    dropped_after_rekey: int = 0
    peer_ids: int = 0
    loadavg: tuple[float, ...] = ()
    rcvbufs: list[int] = field(default_factory=list)
    server_label: str = ""
    any_data_after: int = 0
    server_udp_drops: int = 0
    server_datagrams: tuple[int, int] = (0, 0)
    client_udp_drops: int = 0
    error: str | None = None

    @property
    def kb_per_client(self) -> float:
        if not self.rss_idle or not self.rss_connected or not self.n:
            return math.nan
        return (self.rss_connected["VmRSS"] - self.rss_idle["VmRSS"]) / self.n

    def as_dict(self) -> dict[str, Any]:
        def ph(p: PhaseResult | None) -> dict[str, Any] | None:
            if p is None:
                return None
            return {"done": p.done, "total": p.total, "failed": p.failed, "wall_s": p.wall,
                    "rate_per_s": p.rate, "p50_ms": p.p50 * 1000, "p99_ms": p.p99 * 1000,
                    "max_ms": max(p.latencies) * 1000 if p.latencies else None,
                    "failures": p.failures}
        return {"server": self.server, "n": self.n, "connect": ph(self.connect),
                "rekey": ph(self.rekey), "rss_idle_kb": self.rss_idle,
                "rss_connected_kb": self.rss_connected, "rss_after_kb": self.rss_after,
                "kb_per_client": self.kb_per_client,
                "server_cpu_connect_s": self.server_cpu_connect,
                "server_cpu_connect_s_by_process": self.server_cpu_connect_by_role,
                "generator_cpu_connect_s": self.gen_cpu_connect,
                "status_connected": self.status_connected,
                "status_after_rekey": self.status_after_rekey,
                "alive_after_rekey": self.alive_after_rekey,
                "clients_with_data_on_new_key": self.new_key_data,
                "clients_with_any_data_after_rekey": self.any_data_after,
                "dropped_after_rekey": self.dropped_after_rekey,
                "distinct_peer_ids": self.peer_ids, "loadavg_at_start": self.loadavg,
                "server_udp_rcvbuf_bytes": self.rcvbufs,
                "server_udp_rcvbuf_drops_connect": self.server_udp_drops,
                "server_datagrams_in_out_connect": list(self.server_datagrams),
                "client_udp_rcvbuf_drops_connect": self.client_udp_drops,
                "error": self.error}


def _alive(records: list[ClientRecord]) -> int:
    return sum(1 for r in records if r.connected is not None and r.failed is None)


def run_one(kind: str, lab_hosts: tuple[Host, Host], workdir: Path, args: argparse.Namespace,
            plan: LoadPlan, pki: PKI, tls_crypt: Path, netns_path: str) -> RunResult:
    srv_host, cli_host = lab_hosts
    status = workdir / "status.txt"
    conf = server_config(pki=pki, tls_crypt=tls_crypt, dev=unique_dev_name(), status=status,
                         ipv6=args.ipv6, ipv4_pool=args.ipv4_pool, stock=(kind == "stock"),
                         tls_groups=None if args.tls_groups == "default" else args.tls_groups)
    server: ServerUnderTest = (StockServer if kind == "stock" else OvpnctlServer)(
        srv_host, workdir, conf)
    res = RunResult(server.name, len(plan.clients))
    res.loadavg = os.getloadavg()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n== {server.name}: {len(plan.clients)} clients, {args.workers} generator "
          f"worker(s), start rate {args.rate or 'all at once'}; load average {load} on "
          f"{os.cpu_count()} CPUs", flush=True)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported in the table
        res.error = f"server did not start: {exc}"
        print(res.error)
        try:
            server.stop()
        except Exception:  # noqa: BLE001
            pass
        return res
    gen = LoadGenerator(plan, workers=args.workers, netns=netns_path)
    try:
        time.sleep(1.0)
        res.rss_idle = server.rss()
        res.rcvbufs = udp_rcvbufs(srv_host)
        gen.start()
        cpu0, gcpu0 = server.cpu(), sum(cpu_seconds(p) for p in gen.pids)
        roles0 = server.cpu_by_role()
        su0, cu0 = udp_counters(srv_host), udp_counters(cli_host)
        res.connect = gen.connect(timeout=args.timeout)
        res.server_cpu_connect = server.cpu() - cpu0
        res.server_cpu_connect_by_role = {r: round(c - roles0.get(r, 0.0), 3)
                                          for r, c in server.cpu_by_role().items()}
        res.gen_cpu_connect = sum(cpu_seconds(p) for p in gen.pids) - gcpu0
        su1 = udp_counters(srv_host)
        res.server_udp_drops = udp_drops(su0, su1)
        res.server_datagrams = udp_datagrams(su0, su1)
        res.client_udp_drops = udp_drops(cu0, udp_counters(cli_host))
        print("  " + res.connect.summary(), flush=True)
        recs = gen.records
        res.peer_ids = len({r.peer_id for r in recs if r.peer_id is not None})
        no_pid = sum(1 for r in recs if r.connected is not None and r.peer_id is None)
        if no_pid:
            print(f"  WARNING: {no_pid} connected clients got no peer-id")
        time.sleep(1.5)                              # status file refreshes every second
        res.rss_connected = server.rss()
        res.status_connected = status_clients(status)
        parts = ", ".join(f"{k.split(':')[1]} {res.rss_idle.get(k, 0)} -> {v} KiB"
                          for k, v in res.rss_connected.items() if ":" in k)
        print(f"  server RSS idle {res.rss_idle.get('VmRSS')} KiB, connected "
              f"{res.rss_connected.get('VmRSS')} KiB ({res.kb_per_client:.1f} KiB/client; "
              f"{parts}), status file lists {res.status_connected}", flush=True)
        if args.idle > 0:
            recs = gen.idle(args.idle)
            print(f"  after {args.idle:g} s idle: {_alive(recs)} clients up, "
                  f"{sum(r.pings_sent for r in recs)} pings sent, "
                  f"{sum(r.data_received for r in recs)} data packets received", flush=True)
        if not args.no_rekey:
            up_before = _alive(gen.records)
            rx_before = {r.index: r.data_received for r in gen.records}
            res.rekey = gen.rekey_all(timeout=args.timeout)
            print("  " + res.rekey.summary(), flush=True)
            recs = gen.idle(args.verify)
            res.alive_after_rekey = _alive(recs)
            res.dropped_after_rekey = up_before - res.alive_after_rekey
            res.new_key_data = sum(1 for r in recs if r.new_key_data > 0)
            res.any_data_after = sum(1 for r in recs if r.data_received > rx_before.get(r.index, 0))
            time.sleep(1.5)
            res.status_after_rekey = status_clients(status)
            print(f"  {args.verify:g} s after the rekey: {res.alive_after_rekey} clients up "
                  f"({res.dropped_after_rekey} dropped), {res.new_key_data} received server "
                  f"data on the new key ({res.any_data_after} received any server data), status file lists "
                  f"{res.status_after_rekey}", flush=True)
        res.rss_after = server.rss()
        gen.close(linger=2.0)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        res.error = f"{type(exc).__name__}: {exc}"
        print(f"  ERROR: {res.error}\n{server.log_tail()}", flush=True)
    finally:
        gen.terminate()
        server.stop()
    fails = (res.connect.failures if res.connect else {})
    if fails:
        print(f"  connect failures: {fails}; server log tail:\n{server.log_tail(15)}")
    return res


# --------------------------------------------------------------------------- table

def _fmt(v: float, unit: str = "", digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}{unit}"


def _ratio(ours: float | None, stock: float | None) -> str:
    if ours is None or stock is None or not stock or math.isnan(ours) or math.isnan(stock):
        return "n/a"
    return f"{ours / stock:.2f}x"


def print_table(results: list[RunResult]) -> None:
    def get(r: RunResult) -> dict[str, str]:
        c, k = r.connect, r.rekey
        return {
            "connected": f"{c.done}/{c.total}" if c else "n/a",
            "handshakes/s": _fmt(c.rate if c else math.nan),
            "time to all connected": _fmt(c.wall if c and c.all_done else math.nan, " s", 3)
            if c and c.all_done else (f"not all ({c.done}/{c.total})" if c else "n/a"),
            "latency p50": _fmt(c.p50 * 1000 if c else math.nan, " ms"),
            "latency p99": _fmt(c.p99 * 1000 if c else math.nan, " ms"),
            "latency max": _fmt(max(c.latencies) * 1000 if c and c.latencies else math.nan, " ms"),
            "server CPU during connect": _fmt(r.server_cpu_connect, " s", 2),
            "server CPU per handshake": _fmt(r.server_cpu_connect / c.done * 1000
                                             if c and c.done else math.nan, " ms", 2),
            "  of which per process": " ".join(
                f"{role} {cpu / c.done * 1000:.2f}"
                for role, cpu in r.server_cpu_connect_by_role.items()) if c and c.done else "n/a",
            "generator CPU during connect": _fmt(r.gen_cpu_connect, " s", 2),
            "UDP rcvbuf drops srv/gen": f"{r.server_udp_drops}/{r.client_udp_drops}",
            "server datagrams in/out": (f"{r.server_datagrams[0] / r.n:.1f}/"
                                        f"{r.server_datagrams[1] / r.n:.1f} per client"
                                        if r.n else "n/a"),
            "server UDP rcvbuf": "/".join(f"{b // 1024} KiB" for b in r.rcvbufs) or "n/a",
            "server RSS idle": f"{r.rss_idle.get('VmRSS', 'n/a')} KiB",
            "server RSS connected": f"{r.rss_connected.get('VmRSS', 'n/a')} KiB",
            "server VmHWM (end)": f"{r.rss_after.get('VmHWM', 'n/a')} KiB",
            "RSS per client": _fmt(r.kb_per_client, " KiB"),
            "status file clients": str(r.status_connected),
            "rekey all: done": f"{k.done}/{k.total}" if k else "n/a",
            "rekey all: time": _fmt(k.wall if k else math.nan, " s", 3),
            "rekey all: p99": _fmt(k.p99 * 1000 if k else math.nan, " ms"),
            "dropped after rekey": str(r.dropped_after_rekey) if k else "n/a",
            "clients w/ data on new key": f"{r.new_key_data}" if k else "n/a",
            "clients w/ data after rekey": f"{r.any_data_after}" if k else "n/a",
            "error": (r.error or "").splitlines()[0][:90] if r.error else "",
        }
    cols = [get(r) for r in results]
    keys = list(cols[0]) if cols else []
    w0 = max(len(k) for k in keys) if keys else 10
    labels = [r.server_label or r.server for r in results]
    widths = [max(len(lb), *(len(c[k]) for k in keys)) for lb, c in zip(labels, cols)]
    print()
    print(" " * w0 + " | " + " | ".join(lb.ljust(w) for lb, w in zip(labels, widths)))
    print("-" * (w0 + sum(w + 3 for w in widths)))
    for k in keys:
        print(k.ljust(w0) + " | " + " | ".join(c[k].ljust(w) for c, w in zip(cols, widths)))
    for r in results:
        if r.connect and r.connect.done and r.gen_cpu_connect > r.server_cpu_connect:
            print(f"NOTE: against {r.server} the generator used more CPU "
                  f"({r.gen_cpu_connect:.2f} s) than the server ({r.server_cpu_connect:.2f} s): "
                  "on 2 shared cores its figures are a lower bound of what the server can do")
    if any(r.server == "ovpnctl server" and r.rekey and r.new_key_data == 0
           and r.any_data_after == r.n for r in results):
        print("NOTE: 'clients w/ data on new key' is 0 for ovpnctl server by design: like OpenVPN "
              "2.6 with DCO (dco-freebsd-openvpn.md §5 step 3) it installs the new key at once "
              "(clients send on it) but moves its own sending to it only at the new key's "
              "auth_deferred_expire, min(hand-window, reneg-sec/2) = 60 s after the rekey; the "
              "--verify window ends before that (every client did get data after the rekey, "
              "on the old key)")
    print()
    stock = [r for r in results if r.server == "stock openvpn" and r.connect is not None]
    ours = [r for r in results if r.server == "ovpnctl server" and r.connect is not None]
    if not stock or not ours:
        print("ratios: n/a (both servers must have run)")
        return
    if len(stock) > 1 or len(ours) > 1:
        print(f"ratios of medians over {len(stock)} stock and {len(ours)} ovpnctl rounds")

    def med(runs: list[RunResult], f: Any) -> float:
        vals = [f(r) for r in runs]
        return statistics.median(vals) if vals else math.nan

    def t_all(r: RunResult) -> float:
        return r.connect.wall if r.connect and r.connect.all_done else math.inf

    def cpu_hs(r: RunResult) -> float:
        return r.server_cpu_connect / max(r.connect.done, 1) if r.connect else math.nan

    t_ours, t_stock = med(ours, t_all), med(stock, t_all)
    p99_ours = med(ours, lambda r: r.connect.p99)
    p99_stock = med(stock, lambda r: r.connect.p99)
    kb_ours, kb_stock = med(ours, lambda r: r.kb_per_client), med(stock, lambda r: r.kb_per_client)
    dropped = [r.dropped_after_rekey if r.rekey and r.rekey.all_done else None for r in ours]
    rekey_ok: bool | None = bool(dropped) and all(d == 0 for d in dropped)
    if all(r.rekey is None for r in ours):
        rekey_ok = None                         # --no-rekey: nothing to judge
    checks = [
        ("time to all connected, ours/stock", _ratio(t_ours, t_stock), "<= 1.00x",
         t_ours <= t_stock if math.isfinite(t_ours) and math.isfinite(t_stock) else False),
        ("p99 handshake latency, ours/stock", _ratio(p99_ours, p99_stock), "<= 1.00x",
         p99_ours <= p99_stock),
        ("handshakes/s, ours/stock", _ratio(med(ours, lambda r: r.connect.rate),
                                           med(stock, lambda r: r.connect.rate)), "", None),
        ("server CPU per handshake, ours/stock", _ratio(med(ours, cpu_hs), med(stock, cpu_hs)),
         "", None),
        ("RSS per client (ours)", _fmt(kb_ours, " KiB"), f"<= {TARGET_KB_PER_CLIENT:g}",
         kb_ours <= TARGET_KB_PER_CLIENT),
        ("RSS per client, ours/stock", _ratio(kb_ours, kb_stock), "", None),
        ("rekey all, no client dropped (ours)",
         ("/".join("n/a" if d is None else str(d) for d in dropped) + " dropped")
         if rekey_ok is not None else "not run", "0 dropped",
         rekey_ok),
    ]
    for name, val, target, ok in checks:
        verdict = "" if ok is None else ("MET" if ok else "MISSED")
        print(f"{name:40s} {val:>14s}  {target:10s} {verdict}")


# --------------------------------------------------------------------------- main

def build_plan(args: argparse.Namespace, pki: PKI, tls_crypt: Path) -> LoadPlan:
    creds = pki.clients(args.clients)
    ca = pki.ca_pem
    key = StaticKey.load(tls_crypt)
    sources = [CLIENT6 if args.ipv6 else CLIENT4] + source_addresses(args)
    # the clients offer the servers' group only: a ClientHello carrying an unused ML-KEM
    # key share as well is 1.2 KB (one control packet) larger for both servers alike
    groups = None if args.tls_groups == "default" else args.tls_groups
    specs = [ClientSpec(TLSConfig(ca=ca, cert=c.cert_pem, key=c.key_pem, remote_cert_tls="server",
                                  tls_groups=groups),
                        sources[i % len(sources)]) for i, c in enumerate(creds)]
    return LoadPlan(remote=(SERVER6 if args.ipv6 else SERVER4, PORT), clients=specs,
                    wrap_factory=lambda: TLSCrypt(key, server=False),
                    start_rate=args.rate, hand_window=60.0)


def source_addresses(args: argparse.Namespace) -> list[str]:
    """Extra client source addresses: 192.0.2.10.. or 2001:db8:2::1:0.."""
    if args.ipv6:
        return [f"2001:db8:2::1:{i:x}" for i in range(args.sources)]
    return [f"192.0.2.{10 + i}" for i in range(args.sources)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="N = 50")
    ap.add_argument("--workers", type=int, default=2,
                    help="generator processes (default 2: one Python client costs more CPU "
                         "per handshake than stock openvpn's server side, so one process "
                         "would be the bottleneck)")
    ap.add_argument("--rate", type=float, default=None,
                    help="client starts per second (default: all at once)")
    ap.add_argument("--sources", type=int, default=15,
                    help="extra source addresses on the client side (default 15)")
    ap.add_argument("--ipv6", action="store_true", help="outer link over IPv6")
    ap.add_argument("--ipv4-pool", action="store_true",
                    help="also an IPv4 pool 198.51.100.0/24 (N <= 252 only)")
    ap.add_argument("--servers", default="stock,ovpnctl",
                    help="comma list of stock, ovpnctl (default both, in that order)")
    ap.add_argument("--timeout", type=float, default=180.0, help="per phase (s)")
    ap.add_argument("--idle", type=float, default=3.0, help="idle seconds before the rekey")
    ap.add_argument("--verify", type=float, default=12.0,
                    help="idle seconds after the rekey (> keepalive 10 s: the server's pings "
                         "prove the new keys)")
    ap.add_argument("--tls-groups", default="X25519",
                    help="the tls-groups line both servers get (default X25519: the same key "
                         "exchange on both sides; 'default' = no line, each server's OpenSSL "
                         "picks: ours, on OpenSSL 3.5+, the X25519MLKEM768 hybrid the generator "
                         "offers first, which costs more CPU and bytes; Debian's stock openvpn "
                         "on OpenSSL 3.0 has no ML-KEM and picks X25519)")
    ap.add_argument("--no-rekey", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the servers this many times (ratios use the medians)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients = 50
    if not 1 <= args.clients <= 5000:
        ap.error("--clients must be 1..5000")
    if args.ipv4_pool and args.clients > 252:
        ap.error("--ipv4-pool holds 252 clients at most")
    if not 1 <= args.rounds <= 20:
        ap.error("--rounds must be 1..20")
    if not 0 <= args.sources <= 200:
        ap.error("--sources must be 0..200")
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    if not kinds or any(k not in ("stock", "ovpnctl") for k in kinds):
        ap.error("--servers: comma list of stock, ovpnctl")
    if os.geteuid() != 0:
        print("bench/scale.py must run as root (network namespaces)", file=sys.stderr)
        return 1
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="bovpn-scale-") as tmp, Lab("bscale") as lab:
        tmpd = Path(tmp)
        t = time.monotonic()
        pki = PKI(tmpd / "pki")
        keys = WrapKeys(tmpd / "keys")
        tls_crypt = keys.tls_crypt
        plan = build_plan(args, pki, tls_crypt)
        print(f"PKI: CA + server + {args.clients} client certificates (ECDSA P-256) in "
              f"{time.monotonic() - t:.1f} s", flush=True)
        srv, cli = lab.host("srv"), lab.host("cli")
        if args.ipv6:
            _, cif = lab.link(srv, cli, f"{SERVER6}/64", f"{CLIENT6}/64")
        else:
            _, cif = lab.link(srv, cli, f"{SERVER4}/24", f"{CLIENT4}/24")
        plen = 64 if args.ipv6 else 24
        for a in source_addresses(args):
            cli.add_address(cif, f"{a}/{plen}")
        netns_path = f"/run/netns/{cli.ident}"
        for rnd in range(args.rounds):
            for kind in kinds:
                res = run_one(kind, (srv, cli), tmpd / f"{kind}-{rnd}", args, plan, pki,
                              tls_crypt, netns_path)
                if args.rounds > 1:
                    res.server_label = f"{res.server} #{rnd + 1}"
                results.append(res)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2,
                                              default=str))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
