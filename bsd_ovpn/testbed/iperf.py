"""iperf3 throughput runs between two test hosts.

Benchmarks and throughput tests need one number they can trust: the JSON
report (``-J``) of a time-bounded iperf3 client against a one-shot server
(``-s -1``) in another host.  The server is always stopped afterwards, even
when the client fails, so no iperf3 process outlives a run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from bsd_ovpn.errors import OvpnError, ValidationError
from bsd_ovpn.testbed.hosts import Host, HostCommandError, ip_version


class IperfError(OvpnError):
    """iperf3 could not run or reported an error (message from its JSON or log)."""


@dataclass(frozen=True)
class IperfResult:
    """Throughput figures from one iperf3 run (bits per second)."""

    protocol: str
    seconds: float
    sent_bps: float
    received_bps: float
    sent_bytes: int
    received_bytes: int
    retransmits: int | None = None
    lost_percent: float | None = None
    jitter_ms: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def received_mbps(self) -> float:
        return self.received_bps / 1e6


def parse_result(report: dict[str, Any]) -> IperfResult:
    """Turn an iperf3 ``-J`` client report (TCP or UDP) into an IperfResult."""
    if report.get("error"):
        raise IperfError(f"iperf3: {report['error']}")
    try:
        end = report["end"]
        proto = report["start"]["test_start"]["protocol"]
    except (KeyError, TypeError):
        raise IperfError("iperf3 JSON report lacks start/end sections") from None
    if proto == "UDP":
        s = end.get("sum_sent") or end["sum"]
        r = end.get("sum_received") or end["sum"]
        return IperfResult("UDP", float(r.get("seconds", 0.0)), float(s["bits_per_second"]),
                           float(r["bits_per_second"]), int(s["bytes"]), int(r["bytes"]),
                           lost_percent=float(r.get("lost_percent", 0.0)),
                           jitter_ms=float(r.get("jitter_ms", 0.0)), raw=report)
    s, r = end["sum_sent"], end["sum_received"]
    return IperfResult("TCP", float(r.get("seconds", 0.0)), float(s["bits_per_second"]),
                       float(r["bits_per_second"]), int(s["bytes"]), int(r["bytes"]),
                       retransmits=s.get("retransmits"), raw=report)


class Iperf:
    """Runs iperf3 client/server pairs; ``close()`` stops any server still running."""

    def __init__(self, binary: str | None = None) -> None:
        path = binary or shutil.which("iperf3")
        if path is None:
            raise IperfError("the iperf3 program is not installed (apt-get install iperf3)")
        self.binary = path
        self._servers: list[subprocess.Popen[bytes]] = []

    def run(self, server: Host, client: Host, address: str, *, seconds: float = 3.0,
            port: int = 5201, udp: bool = False, bitrate: str | None = None,
            parallel: int = 1, reverse: bool = False, length: int | None = None,
            omit: float = 0.0) -> IperfResult:
        """Measure ``client`` -> ``server`` (``reverse``: server -> client) to ``address``.

        ``address`` is the server's address as the client reaches it (e.g. a
        tunnel address).  ``bitrate`` is iperf3 ``-b`` syntax ("100M"; UDP's
        default is only 1 Mbit/s).  Time is bounded by ``seconds`` + 30 s.
        """
        ip_version(address)
        if not 0 < seconds <= 600:
            raise ValidationError(f"seconds must be in (0, 600], got {seconds}")
        if not 1 <= parallel <= 128:
            raise ValidationError(f"parallel must be 1..128, got {parallel}")
        if not 1 <= port <= 65535:
            raise ValidationError(f"port must be 1..65535, got {port}")
        if bitrate is not None and not re.fullmatch(r"\d+(\.\d+)?[KMG]?", bitrate):
            raise ValidationError(f"bitrate must look like 100M, got {bitrate!r}")
        fd, log_name = tempfile.mkstemp(prefix="iperf3-server-", suffix=".log")
        os.close(fd)
        with open(log_name, "wb") as log:
            srv = server.popen([self.binary, "-s", "-1", "-p", str(port), "--forceflush"],
                               stdout=log, stderr=subprocess.STDOUT)
        self._servers.append(srv)
        try:
            self._wait_listening(srv, log_name, port)
            argv = [self.binary, "-c", address, "-p", str(port), "-J", "-t", f"{seconds:g}",
                    "--connect-timeout", "5000"]
            if omit:
                argv += ["-O", f"{omit:g}"]
            if udp:
                argv.append("-u")
            if bitrate:
                argv += ["-b", bitrate]
            if parallel > 1:
                argv += ["-P", str(parallel)]
            if reverse:
                argv.append("-R")
            if length:
                argv += ["-l", str(int(length))]
            try:
                proc = client.run(argv, check=False, timeout=seconds + omit + 30)
            except HostCommandError as exc:
                raise IperfError(f"iperf3 client did not finish: {exc}") from None
            try:
                report = json.loads(proc.stdout)
            except ValueError:
                raise IperfError(f"iperf3 client exited {proc.returncode} without a JSON "
                                 f"report: {(proc.stderr or proc.stdout).strip()[-1000:]}") from None
            return parse_result(report)
        finally:
            self._stop(srv)
            try:
                os.unlink(log_name)
            except OSError:
                pass

    @staticmethod
    def _wait_listening(srv: subprocess.Popen[bytes], log_name: str, port: int,
                        timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with open(log_name, "rb") as fh:
                text = fh.read().decode(errors="replace")
            if f"listening on {port}" in text:
                return
            if srv.poll() is not None:
                raise IperfError(f"iperf3 server exited {srv.returncode}: {text.strip()[-1000:]}")
            if time.monotonic() > deadline:
                raise IperfError(f"iperf3 server did not listen on {port} within {timeout:g} s")
            time.sleep(0.05)

    def _stop(self, srv: subprocess.Popen[bytes]) -> None:
        if srv.poll() is None:
            srv.terminate()
            try:
                srv.wait(timeout=5)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait(timeout=5)
        if srv in self._servers:
            self._servers.remove(srv)

    def close(self) -> None:
        for srv in list(self._servers):
            self._stop(srv)
