"""Render a :class:`~bsd_ovpn.daemon.control.DaemonStatus`: JSON, text, Prometheus, status file.

JSON is the stable machine format (docs/json.md, "status"); the text form is
for people; the Prometheus text exposition is for scraping (node_exporter's
textfile collector, or a tiny HTTP shim); the status file is OpenVPN's own
``status FILE`` format (versions 1, 2 and 3) so existing monitoring keeps
working after ``openvpn`` becomes ``ovpnctl server``.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time

from bsd_ovpn.daemon.control import DaemonStatus


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _ctime(t: float | None) -> str:
    """OpenVPN status files print local time in ctime() style."""
    return _ctime_second(int(t or 0))


@functools.lru_cache(maxsize=4096)
def _ctime_second(t: int) -> str:
    # the status file prints two times per client every interval, mostly the same
    # few thousand seconds (connect bursts): strftime+localtime showed in profiles
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(t))


def render_json(st: DaemonStatus) -> str:
    return json.dumps(st.as_dict(), indent=2, sort_keys=True)


def render_text(st: DaemonStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{st.role} {st.config}  pid {st.pid}  engine {st.engine}  "
             f"interface {st.interface or '-'}  state {st.state}"]
    if st.local:
        lines.append(f"  local {st.local}")
    if st.remote:
        lines.append(f"  remote {st.remote}")
    lines.append(f"  up since {_iso(st.started)}  ({len(st.clients)} "
                 f"{'peer' if len(st.clients) == 1 else 'peers'})")
    if st.clients:
        hdr = ("PEER", "COMMON NAME", "REAL ADDRESS", "VPN ADDRESS", "CIPHER", "KEY",
               "CONNECTED", "BYTES IN", "BYTES OUT")
        rows = [hdr]
        for c in st.clients:
            vpn = ",".join(a for a in (c.vpn_ipv4, c.vpn_ipv6) if a) or "-"
            since = f"{int(now - c.connected_since)}s" if c.connected_since else "-"
            rows.append((str(c.peer_id), c.common_name or "-", c.real_address or "-", vpn,
                         c.cipher or "-", "-" if c.key_id is None else str(c.key_id), since,
                         str(c.bytes_in), str(c.bytes_out)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
        for r in rows:
            lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(value: float) -> str:
    """Exact sample text: integers in full (byte counters must keep counting), floats
    with repr's round-trip digits (a Unix time keeps its seconds); ``:g`` kept 6 digits."""
    if isinstance(value, int):
        return str(int(value))
    return repr(float(value))


def render_prometheus(st: DaemonStatus) -> str:
    """Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    base = f'role="{_label(st.role)}",interface="{_label(st.interface or "")}"'

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            v = _sample(value)
            out.append(f"{name}{{{labels}}} {v}" if labels else f"{name} {v}")

    metric("ovpnctl_up", "gauge", "1 while the daemon runs.", [(base, 1)])
    metric("ovpnctl_start_time_seconds", "gauge", "Daemon start, Unix time.",
           [(base, st.started)])
    metric("ovpnctl_peers", "gauge", "Connected peers.", [(base, len(st.clients))])

    def per(c: object) -> str:
        return (f'{base},peer_id="{c.peer_id}",common_name="{_label(c.common_name or "")}"')  # type: ignore[attr-defined]

    for name, attr, help_ in (
            ("ovpnctl_peer_bytes_received_total", "bytes_in", "Bytes received from the peer."),
            ("ovpnctl_peer_bytes_sent_total", "bytes_out", "Bytes sent to the peer."),
            ("ovpnctl_peer_packets_received_total", "packets_in", "Packets received."),
            ("ovpnctl_peer_packets_sent_total", "packets_out", "Packets sent.")):
        metric(name, "counter", help_, [(per(c), getattr(c, attr)) for c in st.clients])
    metric("ovpnctl_peer_connected_since_seconds", "gauge", "Connection start, Unix time.",
           [(per(c), c.connected_since or 0) for c in st.clients])
    metric("ovpnctl_peer_last_handshake_seconds", "gauge", "Latest key negotiation, Unix time.",
           [(per(c), c.last_handshake or 0) for c in st.clients])
    metric("ovpnctl_peer_key_id", "gauge", "Key id of the TX key.",
           [(per(c), c.key_id or 0) for c in st.clients])
    return "\n".join(out) + "\n"


def render_status_file(st: DaemonStatus, version: int = 1, now: float | None = None) -> str:
    """OpenVPN's ``status`` file: version 1 (CSV sections), 2 (typed rows, ','), 3 (tabs)."""
    now = time.time() if now is None else now
    if version == 1:
        lines = ["OpenVPN CLIENT LIST", f"Updated,{_ctime(now)}",
                 "Common Name,Real Address,Bytes Received,Bytes Sent,Connected Since"]
        for c in st.clients:
            lines.append(f"{c.common_name or 'UNDEF'},{c.real_address},{c.bytes_in},"
                         f"{c.bytes_out},{_ctime(c.connected_since)}")
        lines += ["ROUTING TABLE", "Virtual Address,Common Name,Real Address,Last Ref"]
        for c in st.clients:
            for a in (c.vpn_ipv4, c.vpn_ipv6, *c.iroutes):
                if a:
                    lines.append(f"{a},{c.common_name or 'UNDEF'},{c.real_address},"
                                 f"{_ctime(c.last_handshake)}")
        lines += ["GLOBAL STATS", "Max bcast/mcast queue length,0", "END"]
        return "\n".join(lines) + "\n"
    sep = "," if version == 2 else "\t"
    rows = [["TITLE", "ovpnctl"], ["TIME", _ctime(now), str(int(now))],
            ["HEADER", "CLIENT_LIST", "Common Name", "Real Address", "Virtual Address",
             "Virtual IPv6 Address", "Bytes Received", "Bytes Sent", "Connected Since",
             "Connected Since (time_t)", "Username", "Client ID", "Peer ID",
             "Data Channel Cipher"]]
    for c in st.clients:
        rows.append(["CLIENT_LIST", c.common_name or "UNDEF", c.real_address or "",
                     c.vpn_ipv4 or "", c.vpn_ipv6 or "", str(c.bytes_in), str(c.bytes_out),
                     _ctime(c.connected_since), str(int(c.connected_since or 0)),
                     c.username or "UNDEF", str(c.peer_id), str(c.peer_id), c.cipher or ""])
    rows.append(["HEADER", "ROUTING_TABLE", "Virtual Address", "Common Name", "Real Address",
                 "Last Ref", "Last Ref (time_t)"])
    for c in st.clients:
        for a in (c.vpn_ipv4, c.vpn_ipv6, *c.iroutes):
            if a:
                rows.append(["ROUTING_TABLE", a, c.common_name or "UNDEF", c.real_address or "",
                             _ctime(c.last_handshake), str(int(c.last_handshake or 0))])
    rows += [["GLOBAL_STATS", "Max bcast/mcast queue length", "0"], ["END"]]
    return "\n".join(sep.join(r) for r in rows) + "\n"


def write_status_file(path: str, st: DaemonStatus, version: int = 1) -> None:
    """Replace ``path`` atomically (readers never see half a file)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ovpnctl-status-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render_status_file(st, version))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class StatusFileWriter:
    """OpenVPN's ``status FILE``: opened once at start, rewritten in place.

    Like OpenVPN, the file is opened while the daemon is still root and then
    rewritten through that descriptor, so it keeps working after ``user nobody``
    (a temp file + rename in a root-owned directory would fail then).  The new
    text is written over the old one before the tail is cut, so a reader sees
    the old or the new content, never an empty file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                                      0o644)

    def write(self, st: DaemonStatus, version: int = 1) -> None:
        if self.fd is None:
            raise OSError(f"status file {self.path} is closed")
        data = render_status_file(st, version).encode()
        view = memoryview(data)
        off = 0
        while off < len(data):
            off += os.pwrite(self.fd, view[off:], off)
        os.ftruncate(self.fd, len(data))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
