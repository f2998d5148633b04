"""Benchmark bsd_ovpn.nv pack/unpack on the nvlists the data path really uses.

Not a test: prints figures.  Run from the repository root:

    python3 bench/nvlist.py [--seconds S]

Cases: (a) the OVPN_NEW_KEY request (content of the ovpn_new_key_aes256gcm
vector; target: pack < 20 us), (b) an OVPN_GET_PEER_STATS reply with 100
peers (the shape of kreply_get_peer_stats), (c) the other per-client
requests and notifications (golden vectors), the 1000-peer GET_PEER_STATS
reply, and NEW_KEY end to end: built with NVList + packed (the daemon's
side), unpacked + read with the typed getters (the engine's side).

unpack figures are for a buffer shape already seen (the steady state of a
connect burst: nv learns each shape once); "first sight" is the pair-by-pair
reader every new shape goes through.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsd_ovpn import nv  # noqa: E402
from bsd_ovpn.nv import NVList, pack, unpack  # noqa: E402

VECTORS = Path("/work/shared/vectors/nvlist")
NEW_KEY_TARGET_US = 20.0


def new_key_request() -> NVList:
    """OVPN_NEW_KEY as OpenVPN's dco_freebsd.c builds it (same key order)."""
    def direction(key: bytes, iv: bytes) -> NVList:
        return NVList([("cipher", "AES-256-GCM"), ("key", key), ("iv", iv)])

    return NVList([
        ("slot", 0), ("keyid", 0), ("peerid", 7),
        ("encrypt", direction(bytes(range(32)), bytes.fromhex("a1a2a3a4a5a6a7a8"))),
        ("decrypt", direction(bytes(range(255, 223, -1)), bytes.fromhex("b1b2b3b4b5b6b7b8"))),
    ])


def build_and_pack_new_key() -> bytes:
    """What the daemon does per OVPN_NEW_KEY: build the request, pack it."""
    return pack(new_key_request())


def unpack_and_read_new_key(blob: bytes) -> tuple[object, ...]:
    """What the engine does per OVPN_NEW_KEY: unpack, then the typed, checked reads."""
    nvl = unpack(blob)
    out: list[object] = [nvl.get_number("slot", hi=1), nvl.get_number("keyid", hi=7),
                         nvl.get_number("peerid", hi=0xFFFFFF)]
    for direction in ("encrypt", "decrypt"):
        d = nvl.get_nvlist(direction)
        out += [d.get_string("cipher"), d.get_binary("key", size=(16, 24, 32)),
                d.get_binary("iv", size=8)]
    return tuple(out)


def first_sight_unpack(blob: bytes) -> NVList:
    """unpack with shape templates off: the path of a buffer of a new shape."""
    saved, nv._templates_on = nv._templates_on, False
    try:
        return unpack(blob)
    finally:
        nv._templates_on = saved


def peer_stats_reply(peers: int) -> NVList:
    """OVPN_GET_PEER_STATS reply: an nvlist array, one element per peer."""
    return NVList([("peers", [
        NVList([("peerid", i),
                ("packets", NVList([("in", 10 * i), ("out", 11 * i)])),
                ("bytes", NVList([("in", 1000 * i), ("out", 1100 * i)]))])
        for i in range(1, peers + 1)])])


def measure(fn: Callable[[], object], seconds: float) -> float:
    """Fastest mean time per call (s) over many ~2 ms batches within ``seconds``.

    The minimum over short batches is the figure least disturbed by other
    processes sharing the CPU.
    """
    calls = 1
    while True:                      # size a batch to about 2 ms
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed > 0.002:
            break
        calls *= 2
    best = elapsed / calls
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def report(label: str, per_call: float) -> None:
    print(f"  {label:<8} {per_call * 1e6:10.2f} us/op {1 / per_call:12,.0f} ops/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget per figure")
    args = parser.parse_args()

    print(f"bsd_ovpn.nv on Python {sys.version.split()[0]} ({sys.byteorder}-endian host)")
    new_key = new_key_request()
    blob = pack(new_key, byteorder="little")
    golden = VECTORS / "ovpn_new_key_aes256gcm.bin"
    if golden.is_file() and golden.read_bytes() != blob:
        print("ERROR: NEW_KEY does not match the golden vector", file=sys.stderr)
        return 1
    print(f"(a) OVPN_NEW_KEY request, {len(blob)} bytes")
    pack_time = measure(lambda: pack(new_key), args.seconds)
    report("pack", pack_time)
    report("unpack", measure(lambda: unpack(blob), args.seconds))

    stats = peer_stats_reply(100)
    blob = pack(stats)
    assert unpack(blob) == stats
    print(f"(b) OVPN_GET_PEER_STATS reply, 100 peers, {len(blob)} bytes")
    report("pack", measure(lambda: pack(stats), args.seconds))
    report("unpack", measure(lambda: unpack(blob), args.seconds))

    print("(c) per-client requests and notifications (golden vectors), pack / unpack")
    for name in ("ovpn_new_peer_server_ipv4", "ovpn_set_peer", "ovpn_swap_keys",
                 "ovpn_del_peer", "kreply_notif_del_peer_timeout"):
        path = VECTORS / f"{name}.bin"
        if not path.is_file():
            continue
        vec = path.read_bytes()
        nvl = unpack(vec)
        if pack(nvl) != vec:
            print(f"ERROR: {name} does not re-pack to the golden vector", file=sys.stderr)
            return 1
        print(f"  {name} ({len(vec)} bytes)")
        report("pack", measure(lambda: pack(nvl), args.seconds / 2))
        report("unpack", measure(lambda: unpack(vec), args.seconds / 2))
    stats = peer_stats_reply(1000)
    blob = pack(stats)
    print(f"  OVPN_GET_PEER_STATS reply, 1000 peers, {len(blob)} bytes")
    report("pack", measure(lambda: pack(stats), args.seconds))
    report("unpack", measure(lambda: unpack(blob), args.seconds))
    blob = pack(new_key)
    print("  OVPN_NEW_KEY end to end")
    report("build+pack", measure(build_and_pack_new_key, args.seconds / 2))
    report("unpack+get", measure(lambda: unpack_and_read_new_key(blob), args.seconds / 2))
    report("unpack, first sight", measure(lambda: first_sight_unpack(blob), args.seconds / 2))

    verdict = "met" if pack_time * 1e6 < NEW_KEY_TARGET_US else "MISSED"
    print(f"target NEW_KEY pack < {NEW_KEY_TARGET_US:.0f} us: {verdict}")
    return 0 if verdict == "met" else 2


if __name__ == "__main__":
    sys.exit(main())
