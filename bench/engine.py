"""Engine throughput: our C data plane vs stock OpenVPN 2.6 userspace, in one run.

Not a test: it prints figures.  Two network namespaces joined by a veth pair
(192.0.2.1 <-> 192.0.2.2), then, on the same namespaces and addresses:

(a) our engine's data plane (bsd_ovpn.engine.fastpath, AES-256-GCM) in each
    namespace with keys installed by hand (no control plane), tunnel
    198.51.100.1 <-> 198.51.100.2;
(b) stock ``openvpn`` (Debian 2.6, ``disable-dco``, AES-256-GCM, TLS with a
    generated PKI) as server and client, same tunnel addresses;

and for each, iperf3 TCP and UDP from the client namespace to the server's
tunnel address.  Prints Mbit/s (receiver side), the ratio engine/openvpn, the
CPU time each tunnel's processes used per run, and the peak RSS of one engine
process with 1000 peers (each with an AES-256-GCM key) installed.

Run as root from the checkout:  python3 bench/engine.py [--seconds 5] [--rounds 1]

The MTUs are chosen so neither tunnel fragments on the 1500-byte veth: our tun
gets 1440 (1440 + 24 + 8 + 20 = 1492 on the wire, OpenVPN's default ``mssfix``
target) and stock OpenVPN keeps its defaults (tun-mtu 1500, mssfix 1492,
which clamps TCP to the same segment size); UDP runs use 1300-byte datagrams
at an unlimited rate (-b 0), so UDP figures are what the receiver got.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bsd_ovpn.testbed.hosts import Host, Lab  # noqa: E402
from bsd_ovpn.testbed.iperf import Iperf, IperfResult  # noqa: E402
from bsd_ovpn.testbed.pki import PKI  # noqa: E402
from bsd_ovpn.testbed.stockovpn import OvpnConfig, StockOpenVPN, WrapKeys  # noqa: E402

SERVER_OUTER, CLIENT_OUTER = "192.0.2.1", "192.0.2.2"
SERVER_TUN, CLIENT_TUN = "198.51.100.1", "198.51.100.2"
PORT = 1194
CIPHER = "AES-256-GCM"
ENGINE_MTU = 1440
UDP_LEN = 1300


class ManualEngine:
    """One ``python3 -m bsd_ovpn.engine.fastpath`` process in a host."""

    def __init__(self, host: Host, args: list[str], timeout: float = 30.0) -> None:
        self.host = host
        self.proc = host.popen([sys.executable, "-m", "bsd_ovpn.engine.fastpath", *args],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=str(HERE.parent))
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY "):
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"engine in {host.name} did not start: {line!r} {err[-2000:]}")
        self.ready = json.loads(line[6:])

    def stop(self) -> dict:
        """Close stdin, read the DONE report."""
        out, _ = self.proc.communicate(timeout=15)     # closes stdin first
        for line in out.splitlines():
            if line.startswith("DONE "):
                return json.loads(line[5:])
        return {}


def engine_args(tun: str, addr: str, bind: str, remote: str, enc: tuple[bytes, bytes],
                dec: tuple[bytes, bytes], extra_peers: int = 0) -> list[str]:
    return ["--tun", tun, "--mtu", str(ENGINE_MTU), "--tun-addr", addr,
            "--bind", f"{bind}:{PORT}", "--remote", f"{remote}:{PORT}", "--peer-id", "1",
            "--cipher", CIPHER, "--enc-key", enc[0].hex(), "--enc-iv", enc[1].hex(),
            "--dec-key", dec[0].hex(), "--dec-iv", dec[1].hex(),
            "--extra-peers", str(extra_peers)]


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds used so far by these processes (all their threads)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(iperf: Iperf, server: Host, client: Host, seconds: float,
            tunnel_pids: list[int]) -> dict[str, tuple[IperfResult, float]]:
    """iperf3 TCP then UDP; each with the CPU seconds the tunnel processes spent."""
    out = {}
    for proto in ("tcp", "udp"):
        cpu0 = cpu_seconds(tunnel_pids)
        if proto == "tcp":
            r = iperf.run(server, client, SERVER_TUN, seconds=seconds, omit=1)
        else:
            r = iperf.run(server, client, SERVER_TUN, seconds=seconds, omit=1, udp=True,
                          bitrate="0", length=UDP_LEN)
        out[proto] = (r, cpu_seconds(tunnel_pids) - cpu0)
    return out


def run_engine(lab: Lab, server: Host, client: Host, iperf: Iperf, seconds: float,
               ) -> dict[str, tuple[IperfResult, float]]:
    k_sc = (os.urandom(32), os.urandom(8))    # server -> client direction
    k_cs = (os.urandom(32), os.urandom(8))
    tag = lab.tag
    srv = ManualEngine(server, engine_args(f"fps{tag}", f"{SERVER_TUN}/24", SERVER_OUTER,
                                           CLIENT_OUTER, k_sc, k_cs))
    cli = None
    try:
        cli = ManualEngine(client, engine_args(f"fpc{tag}", f"{CLIENT_TUN}/24", CLIENT_OUTER,
                                               SERVER_OUTER, k_cs, k_sc))
        client.wait_ping(SERVER_TUN, timeout=10)
        return measure(iperf, server, client, seconds, [srv.proc.pid, cli.proc.pid])
    finally:
        if cli is not None:
            cli.stop()
        srv.stop()


def run_openvpn(server: Host, client: Host, iperf: Iperf, seconds: float, work: Path,
                ) -> dict[str, tuple[IperfResult, float]]:
    pki = PKI(work / "pki")
    keys = WrapKeys(work / "keys")
    scfg = OvpnConfig.server(pki, keys, data_ciphers=CIPHER, local=SERVER_OUTER,
                             keepalive=None)
    ccfg = OvpnConfig.client(pki, keys, remote=SERVER_OUTER, data_ciphers=CIPHER)
    srv = StockOpenVPN(server, scfg, work, "server").start()
    cli = None
    try:
        cli = StockOpenVPN(client, ccfg, work, "client").start()
        srv.wait_ready()
        cli.wait_ready()
        client.wait_ping(SERVER_TUN, timeout=15)
        return measure(iperf, server, client, seconds, [srv.proc.pid, cli.proc.pid])
    finally:
        if cli is not None:
            cli.stop()
        srv.stop()


def peak_rss(host: Host, tag: str, peers: int) -> dict:
    """READY report (VmHWM/VmRSS) of an engine process with ``peers`` keyed peers."""
    eng = ManualEngine(host, engine_args(f"fpm{tag}", "198.51.100.9/32", SERVER_OUTER,
                                         CLIENT_OUTER, (os.urandom(32), os.urandom(8)),
                                         (os.urandom(32), os.urandom(8)),
                                         extra_peers=peers - 1))
    info = dict(eng.ready)
    eng.stop()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="iperf3 time per run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternate engine/openvpn this many times (figures per round)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/engine.py needs root (network namespaces)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    results: list[tuple[str, dict[str, tuple[IperfResult, float]]]] = []
    with Lab("fpbench") as lab, tempfile.TemporaryDirectory(prefix="fpbench-") as tmp:
        server, client = lab.host("server"), lab.host("client")
        lab.link(server, client, f"{SERVER_OUTER}/24", f"{CLIENT_OUTER}/24")
        iperf = Iperf()
        try:
            for rnd in range(args.rounds):
                for name in ("engine", "openvpn"):
                    if name == "engine":
                        res = run_engine(lab, server, client, iperf, args.seconds)
                    else:
                        res = run_openvpn(server, client, iperf, args.seconds,
                                          Path(tmp) / f"ovpn{rnd}")
                    results.append((name, res))
            rss = (peak_rss(server, lab.tag, 1), peak_rss(server, lab.tag, 1000))
        finally:
            iperf.close()
    report(results, rss, args.seconds, time.monotonic() - t0)
    return 0


def report(results: list[tuple[str, dict[str, tuple[IperfResult, float]]]],
           rss: tuple[dict, dict],
           seconds: float, elapsed: float) -> None:
    print(f"# engine benchmark: iperf3 {seconds:g} s per run, {CIPHER}, "
          f"{os.cpu_count()} CPUs (shared), loadavg {os.getloadavg()[0]:.2f}")
    figures: dict[str, dict[str, list[float]]] = {}
    for i, (name, res) in enumerate(results):
        (tcp, tcp_cpu), (udp, udp_cpu) = res["tcp"], res["udp"]
        print(f"round {i // 2 + 1} {name:8s} TCP {tcp.received_mbps:7.1f} Mbit/s "
              f"(tunnel CPU {tcp_cpu:.2f} s)   UDP {udp.received_mbps:7.1f} Mbit/s received of "
              f"{udp.sent_bps / 1e6:.0f} offered (tunnel CPU {udp_cpu:.2f} s)")
        for proto, (r, _) in res.items():
            figures.setdefault(name, {}).setdefault(proto, []).append(r.received_mbps)
    for proto in ("tcp", "udp"):
        e = figures.get("engine", {}).get(proto, [])
        o = figures.get("openvpn", {}).get(proto, [])
        me, mo = (sum(e) / len(e) if e else 0.0), (sum(o) / len(o) if o else 0.0)
        ratio = me / mo if mo else float("nan")
        print(f"{proto.upper()} mean over {len(e)} round(s): engine {me:.1f} Mbit/s, "
              f"openvpn {mo:.1f} Mbit/s, ratio engine/openvpn {ratio:.3f}")
    one, many = rss
    print(f"engine process peak RSS (VmHWM, whole Python process): {one.get('vmhwm_kb')} KiB "
          f"with {one.get('peers')} peer, {many.get('vmhwm_kb')} KiB with {many.get('peers')} "
          f"peers ({CIPHER} key each); "
          f"UDP offload: GSO {one.get('gso')}, GRO {one.get('gro')}")
    print(f"# total {elapsed:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
