"""The engine's C data plane (cdefs/fastpath.c) behind the :class:`DataPlane` protocol.

Why it exists: :class:`~bsd_ovpn.engine.dataplane.PythonDataPlane` is the
readable reference, but Python moves a few tens of Mbit/s.  This class keeps
the exact same contract (see the dataplane module docstring) while two C
threads, running without the GIL, move the packets: tun -> UDP and UDP -> tun,
with recvmmsg/sendmmsg batching, in-place AEAD through libcrypto and no
per-packet allocation.  Python only installs peers, keys and routes, reads
counters and drains events.

Both data planes run the kernel's replay window (``ovpn_check_replay``; the
Python one as :class:`~bsd_ovpn.engine.dataplane.KernelReplayWindow`), refuse
sequence numbers past 2**32-1 for good and fire ROTATE_KEY at the same
threshold; tests/unit/test_engine_parity.py runs the same script on both.

Differences from the Python data plane, on purpose: the C threads hold dup()s
of the fds given to :meth:`attach`, which are closed by :meth:`detach`; the
UDP socket is put in blocking mode (sends wait for buffer space instead of
dropping) and the tun in non-blocking mode.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import Sequence

from bsd_ovpn import binding
from bsd_ovpn.engine.dataplane import SEQ_ROTATE, IfaceCounters, Network, PeerCounters, SockAddr
from bsd_ovpn.errors import ValidationError

#: Linux tun with IFF_NO_PI hands over bare IP packets; FreeBSD's tun with
#: TUNSIFHEAD prefixes a 4-byte address family.
TUN_HEADER = 4 if os.uname().sysname == "FreeBSD" else 0


def c_addr(sa: SockAddr) -> tuple[int, bytes, int, int]:
    """(ipver, raw address, port, scope id) for the C side from a sockaddr tuple."""
    if type(sa) is tuple and len(sa) == 2 and type(sa[0]) is str and type(sa[1]) is int \
            and 0 <= sa[1] <= 0xFFFF:
        try:        # the common case, without ipaddress (NEW_PEER's per-peer path)
            return 4, socket.inet_pton(socket.AF_INET, sa[0]), sa[1], 0
        except OSError:
            pass
    try:
        ip = ipaddress.ip_address(str(sa[0]).split("%", 1)[0])
        port = int(sa[1])
    except (ValueError, IndexError, TypeError) as exc:
        raise ValidationError(f"not a socket address tuple: {sa!r}") from exc
    if not 0 <= port <= 0xFFFF:
        raise ValidationError(f"port {port} out of range in {sa!r}")
    scope = int(sa[3]) if ip.version == 6 and len(sa) > 3 else 0
    return ip.version, ip.packed, port, scope


def py_addr(a: tuple[int, bytes, int, int]) -> SockAddr:
    """The sockaddr tuple for an address coming back from C (FLOAT events)."""
    if a[0] == 4:
        return (str(ipaddress.IPv4Address(a[1])), a[2])
    return (str(ipaddress.IPv6Address(a[1])), a[2], 0, a[3])


class FastDataPlane:
    """A :class:`~bsd_ovpn.engine.dataplane.DataPlane` whose packets never touch Python."""

    def __init__(self) -> None:
        self._c = binding.FastpathEngine()
        self._replay = True
        self._rotate = SEQ_ROTATE
        self._c.set_replay_protection(True)
        self._c.set_rotate_threshold(SEQ_ROTATE)
        self._fds: tuple[int, int] | None = None
        self._offload = True
        #: Bytes of address-family header on each tun packet (the engine's tun
        #: object knows: 0 for Linux IFF_NO_PI, 4 for FreeBSD TUNSIFHEAD).
        self.tun_header = TUN_HEADER

    # -- switches (plain attributes in the protocol) -------------------------
    @property
    def replay_protection(self) -> bool:
        return self._replay

    @replay_protection.setter
    def replay_protection(self, on: bool) -> None:
        self._replay = bool(on)
        self._c.set_replay_protection(self._replay)

    @property
    def rotate_threshold(self) -> int:
        return self._rotate

    @rotate_threshold.setter
    def rotate_threshold(self, value: int) -> None:
        self._c.set_rotate_threshold(int(value))
        self._rotate = int(value)

    @property
    def offload(self) -> bool:
        """Use UDP GSO/GRO when the kernel has them (default True; takes effect at attach)."""
        return self._offload

    @offload.setter
    def offload(self, on: bool) -> None:
        self._offload = bool(on)
        self._c.set_offload(self._offload)

    def offload_state(self) -> tuple[bool, bool]:
        """(GSO in use, GRO in use) for the attached socket."""
        return self._c.offload_state()

    @property
    def event_fd(self) -> int:
        """Readable while events are queued: add it to the engine's selector."""
        return self._c.event_fd()

    # -- lifecycle ---------------------------------------------------------------
    def attach(self, udp_fd: int, tun_fd: int) -> None:
        if self._fds is not None:
            raise RuntimeError("data plane already attached")
        udp, tun = os.dup(udp_fd), os.dup(tun_fd)
        try:
            os.set_blocking(udp, True)
            self._c.attach(udp, tun, self.tun_header)
        except BaseException:
            os.close(udp)
            os.close(tun)
            raise
        self._fds = (udp, tun)

    def detach(self) -> None:
        if self._fds is None:
            return
        self._c.detach()
        for fd in self._fds:
            os.close(fd)
        self._fds = None

    def close(self) -> None:
        """Stop the threads and free the C engine (peers, keys)."""
        self.detach()
        self._c.close()

    def set_running(self, up: bool) -> None:
        self._c.set_running(bool(up))

    # -- peers and keys ------------------------------------------------------------
    def add_peer(self, peer_id: int, remote: SockAddr, local: SockAddr | None,
                 vpn4: bytes | None, vpn6: bytes | None) -> None:
        if vpn4 is not None and len(vpn4) != 4:
            raise ValidationError(f"vpn4 must be 4 bytes, got {len(vpn4)}")
        if vpn6 is not None and len(vpn6) != 16:
            raise ValidationError(f"vpn6 must be 16 bytes, got {len(vpn6)}")
        self._c.add_peer(peer_id, c_addr(remote), c_addr(local) if local else None, vpn4, vpn6)

    def del_peer(self, peer_id: int) -> PeerCounters:
        d = self._c.del_peer(peer_id)
        return PeerCounters(int(d["pkt_in"]), int(d["pkt_out"]), int(d["bytes_in"]),
                            int(d["bytes_out"]))

    def set_remote(self, peer_id: int, remote: SockAddr) -> None:
        self._c.set_remote(peer_id, c_addr(remote))

    def set_key(self, peer_id: int, slot: int, key_id: int, cipher: str, enc_key: bytes,
                enc_iv: bytes, dec_key: bytes, dec_iv: bytes) -> None:
        self._c.set_key(peer_id, slot, key_id, cipher, enc_key, enc_iv, dec_key, dec_iv)

    def swap_keys(self, peer_id: int) -> None:
        self._c.swap_keys(peer_id)

    def del_key(self, peer_id: int, slot: int) -> None:
        self._c.del_key(peer_id, slot)

    def set_tx_seq(self, peer_id: int, slot: int, next_seq: int) -> None:
        """Test hook: the sequence number the next packet on that key uses."""
        self._c.set_tx_seq(peer_id, slot, next_seq)

    def send_ping(self, peer_id: int) -> None:
        """One keepalive; like the kernel's callout, a peer without a key sends nothing."""
        try:
            self._c.send_ping(peer_id)
        except binding.IfOvpnError as exc:
            if exc.errno not in (errno.ENOLINK, errno.ENOTCONN, errno.ENOBUFS):
                raise

    def set_routes(self, routes: Sequence[tuple[Network, bytes]]) -> None:
        """Replace the route-gateway table (prefix -> gateway VPN address)."""
        self._c.clear_routes()
        for net, gateway in routes:
            if len(gateway) != (4 if net.version == 4 else 16):
                raise ValidationError(f"gateway {gateway!r} does not fit {net}")
            self._c.add_route(net.version, net.network_address.packed, net.prefixlen, gateway)

    # -- state -------------------------------------------------------------------------
    def peer_counters(self, peer_id: int) -> PeerCounters:
        d = self._c.peer_counters(peer_id)
        return PeerCounters(int(d["pkt_in"]), int(d["pkt_out"]), int(d["bytes_in"]),
                            int(d["bytes_out"]))

    def iface_counters(self) -> IfaceCounters:
        return IfaceCounters(**self._c.iface_counters())

    def last_active(self, peer_id: int) -> float:
        return float(self._c.peer_counters(peer_id)["last_active"])

    def peer_count(self) -> int:
        return self._c.peer_count()

    def events(self) -> list[tuple]:
        out: list[tuple] = []
        for kind, peer_id, addr in self._c.pop_events():
            if kind == binding.FP_EV_ROTATE_KEY:
                out.append(("rotate_key", peer_id))
            elif kind == binding.FP_EV_FLOAT and addr is not None:
                out.append(("float", peer_id, py_addr(addr)))
        return out


# ---------------------------------------------------------------------------
# A tunnel with keys installed by hand (no control plane): benchmarks and the
# netns tests run one of these per namespace with `python3 -m
# bsd_ovpn.engine.fastpath ...` (inside `ip netns exec`).
# ---------------------------------------------------------------------------

def _hostport(text: str) -> SockAddr:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValidationError(f"expected ADDRESS:PORT, got {text!r}")
    return (host, int(port))


def _memory_kb() -> dict[str, int]:
    """VmRSS / VmHWM of this process (Linux /proc), in KiB."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key.lower() + "_kb"] = int(rest.split()[0])
    except OSError:
        pass
    return out


def run_manual(argv: list[str] | None = None) -> int:
    """Bring up tun + UDP socket + one peer with the given keys; run until stdin closes.

    Prints one ``READY {json}`` line when packets can flow, and ``DONE {json}``
    (counters) at the end.  ``--extra-peers N`` installs N more peers with keys
    (never sent to) to measure memory per peer.
    """
    import argparse
    import json
    import signal
    import socket as socketmod
    import subprocess
    import sys

    from bsd_ovpn.engine import tun as tunmod
    from bsd_ovpn.errors import OvpnError

    def hexbytes(text: str) -> bytes:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not hex: {text!r}") from None

    ap = argparse.ArgumentParser(prog="python3 -m bsd_ovpn.engine.fastpath")
    ap.add_argument("--tun", required=True)
    ap.add_argument("--mtu", type=int, default=1428)
    ap.add_argument("--tun-addr", required=True, action="append",
                    help="CIDR on the tun, e.g. 198.51.100.1/24 (repeatable)")
    ap.add_argument("--bind", required=True, help="local UDP ADDRESS:PORT")
    ap.add_argument("--remote", required=True, help="peer UDP ADDRESS:PORT")
    ap.add_argument("--peer-id", type=int, default=1)
    ap.add_argument("--key-id", type=int, default=0)
    ap.add_argument("--cipher", default="AES-256-GCM")
    for name in ("enc-key", "enc-iv", "dec-key", "dec-iv"):
        ap.add_argument(f"--{name}", type=hexbytes, default=b"", help="hex")
    ap.add_argument("--extra-peers", type=int, default=0)
    ap.add_argument("--no-offload", action="store_true", help="no UDP GSO/GRO")
    args = ap.parse_args(argv)

    try:
        bind, remote = _hostport(args.bind), _hostport(args.remote)
        dev = tunmod.LinuxTun(args.tun, mtu=args.mtu)
    except (OvpnError, OSError) as exc:
        ap.error(str(exc))
    fam = socketmod.AF_INET6 if ":" in bind[0] else socketmod.AF_INET
    udp = socketmod.socket(fam, socketmod.SOCK_DGRAM)
    dp = FastDataPlane()

    def on_signal(*_: object) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, on_signal)
    try:
        udp.bind(bind)              # OS-default buffers, as a stock openvpn has
        dp.add_peer(args.peer_id, remote, None, None, None)
        dp.set_key(args.peer_id, 0, args.key_id, args.cipher, args.enc_key, args.enc_iv,
                   args.dec_key, args.dec_iv)
        for i in range(args.extra_peers):
            pid = args.peer_id + 1 + i
            dp.add_peer(pid, (remote[0], 1024 + i % 60000), None,
                        None, (_EXTRA_VPN6 | pid).to_bytes(16, "big"))
            n = 0 if args.cipher == "none" else len(args.enc_key)
            dp.set_key(pid, 0, 0, args.cipher, os.urandom(n), os.urandom(8) if n else b"",
                       os.urandom(n), os.urandom(8) if n else b"")
        dp.offload = not args.no_offload
        # the tun is up (and addressed) before the data plane reads the socket: a
        # packet the peer sends meanwhile (e.g. its IPv6 MLD/ND) would otherwise be
        # written to a tun that is still down, fail, and count as lost
        dev.set_up()
        for cidr in args.tun_addr:
            subprocess.run(["ip", "addr", "add", cidr, "dev", dev.name], check=True,
                           capture_output=True, timeout=10)
        dp.attach(udp.fileno(), dev.fd)
        dp.set_running(True)
        gso, gro = dp.offload_state()
        print("READY " + json.dumps({"peers": dp.peer_count(), "gso": gso, "gro": gro,
                                     **_memory_kb()}), flush=True)
        try:
            while sys.stdin.readline():
                pass
        except _Stop:
            pass
        c = dp.iface_counters()
        print("DONE " + json.dumps({**vars_of_iface(c), **_memory_kb()}), flush=True)
    except (OvpnError, OSError, subprocess.SubprocessError) as exc:
        print(f"fastpath: {exc}", file=sys.stderr)
        return 1
    finally:
        dp.close()
        udp.close()
        dev.close()
    return 0


class _Stop(Exception):
    """SIGTERM: leave the wait loop and report."""


_EXTRA_VPN6 = 0x20010DB8FFFF << 80      # 2001:db8:ffff::/48, the extra peers' vpn6


def vars_of_iface(c: IfaceCounters) -> dict[str, int]:
    return {k: int(v) for k, v in vars(c).items()}


if __name__ == "__main__":
    raise SystemExit(run_manual())
