"""The engine's command handler against the kernel's contract (spec if_ovpn.md §1-§10).

Requests are real packed nvlists (OpenVPN's, from the golden vectors, and
variants of them); replies are compared byte for byte with the kernel reply
vectors where the numbers can be made the same.  The host edge is the small
recording fake of tests/unit/conftest.py; sockets are real (NEW_PEER inspects
the passed fd).
"""
from __future__ import annotations

import errno as E
import json
import os
import socket
from pathlib import Path

import pytest

from bsd_ovpn import nv
from bsd_ovpn.engine.commands import Engine
from bsd_ovpn.engine.dataplane import PeerCounters
from bsd_ovpn.ifovpn import Command, DelReason, NotifType

VEC = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "nvlist"
if not VEC.is_dir():
    VEC = Path("/work/shared/vectors/nvlist")

C = Command


def vec(name: str) -> bytes:
    return (VEC / f"{name}.bin").read_bytes()


def vnv(name: str) -> nv.NVList:
    return nv.unpack(vec(name))


def pk(nvl) -> bytes:
    return nv.pack(nvl)


@pytest.fixture
def clock(engine_clock):
    """tests/unit/conftest.py's settable clock (``.t``, starts at 1000.0)."""
    return engine_clock


@pytest.fixture
def host(fake_host):
    """tests/unit/conftest.py's recording FakeHost, its data planes on ``clock``."""
    return fake_host


@pytest.fixture
def eng(host, clock):
    e = Engine(host, clock=clock)
    assert e.create_interface("ovpn") == (0, "ovpn0")
    yield e
    e.close()


@pytest.fixture
def socks():
    made: list[socket.socket] = []

    def make(family=socket.AF_INET, addr=None, kind=socket.SOCK_DGRAM, bind=True):
        s = socket.socket(family, kind)
        made.append(s)
        if bind:
            s.bind(addr or (("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0)))
        return s
    yield make
    for s in made:
        s.close()


def new_peer_nvl(peer_id=7, *, af=2, addr=b"\xc0\x00\x02\x01", port=43524, **extra) -> nv.NVList:
    n = nv.NVList()
    n.add("remote", nv.NVList([("af", af), ("address", addr), ("port", port)]))
    n.add("fd", 5)
    n.add("peerid", peer_id)
    for k, v in extra.items():
        n.add(k, v)
    return n


def add_peer(eng, s, peer_id=7, **kw) -> int:
    return eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(new_peer_nvl(peer_id, **kw)), s.fileno())


def key_nvl(slot=0, keyid=0, peer_id=7, enc=None, dec=None) -> nv.NVList:
    d = {"cipher": "AES-256-GCM", "key": bytes(range(32)), "iv": bytes(8)}
    n = nv.NVList()
    n.add("slot", slot)
    n.add("keyid", keyid)
    n.add("peerid", peer_id)
    n.add("encrypt", nv.NVList(list((enc or d).items())))
    n.add("decrypt", nv.NVList(list((dec or d).items())))
    return n


def drain(eng, name="ovpn0") -> list[nv.NVList]:
    out = []
    while True:
        err, data = eng.handle_get(name, C.OVPN_GET_PKT, 4096)
        if err == E.ENOENT:
            return out
        assert err == 0
        out.append(nv.unpack(data))


# ----------------------------------------------------------------------------- cloner

def test_create_picks_units_and_checks_names(host, clock):
    e = Engine(host, clock=clock)
    assert e.create_interface("ovpn") == (0, "ovpn0")
    assert e.create_interface("ovpn") == (0, "ovpn1")
    assert e.create_interface("ovpn7") == (0, "ovpn7")
    assert e.create_interface("ovpn7") == (E.EEXIST, "")
    assert e.create_interface("ovpnc") == (0, "ovpnc0")       # pfSense-style names
    assert e.create_interface("tun0")[0] == E.EINVAL          # no cloner matches
    assert e.create_interface("ovpn" + "x" * 12)[0] == E.EINVAL
    assert e.list_interfaces() == ["ovpn0", "ovpn1", "ovpn7", "ovpnc0"]
    assert e.rename_interface("ovpn1", "tun0") == 0
    assert e.rename_interface("ovpn1", "tun1") == E.ENXIO
    assert e.rename_interface("tun0", "ovpn0") == E.EEXIST
    assert e.destroy_interface("tun0") == 0
    assert e.destroy_interface("tun0") == E.ENXIO
    e.close()
    assert e.list_interfaces() == [] and host.links == set()


def test_unknown_interface_is_enxio(eng):
    assert eng.handle_set("ovpn9", C.OVPN_START_VPN, None) == E.ENXIO
    assert eng.handle_get("ovpn9", C.OVPN_POLL_PKT, 128) == (E.ENXIO, b"")


# ----------------------------------------------------------------------------- transport-level checks

def test_set_request_too_big_is_e2big_before_unpacking(eng):
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, b"\0" * 4097) == E.E2BIG
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, b"\0" * 4096) == E.EINVAL


@pytest.mark.parametrize("blob", sorted(p.name for p in (VEC / "invalid").glob("*.bin")))
def test_every_invalid_vector_is_einval(eng, blob):
    data = (VEC / "invalid" / blob).read_bytes()
    if not data:
        # zero bytes is ifd_len 0: no nvlist at all rather than a bad one, so
        # START_VPN succeeds and every other command finds its keys missing
        assert eng.handle_set("ovpn0", C.OVPN_START_VPN, data) == 0
        assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, data) == E.EINVAL
        return
    # START_VPN ignores content but the nvlist must still unpack; SEND_PKT too
    for cmd in (C.OVPN_START_VPN, C.OVPN_DEL_PEER, C.OVPN_SEND_PKT):
        assert eng.handle_set("ovpn0", cmd, data) == E.EINVAL


@pytest.mark.parametrize("name", ["flags_ignore_case", "flags_no_unique", "descriptor"])
def test_unpack_flags_and_descriptors_are_einval(eng, name):
    assert eng.handle_set("ovpn0", C.OVPN_START_VPN, vec(name)) == E.EINVAL


def test_unknown_and_wrong_direction_commands_are_enotsup(eng):
    ok = vec("ovpn_del_peer")
    for cmd in (C.OVPN_SEND_PKT, 0x20004499, 0, C.OVPN_GET_STATS, C.OVPN_GET_PKT,
                C.OVPN_POLL_PKT, C.OVPN_GET_PEER_STATS):
        assert eng.handle_set("ovpn0", cmd, ok) == E.ENOTSUP
        assert eng.handle_set("ovpn0", cmd, None) == E.ENOTSUP
    for cmd in (C.OVPN_NEW_PEER, C.OVPN_START_VPN, C.OVPN_SEND_PKT, 0x20004499):
        assert eng.handle_get("ovpn0", cmd, 4096) == (E.ENOTSUP, b"")


@pytest.mark.parametrize("cmd", sorted(c for c in (C.OVPN_NEW_PEER, C.OVPN_DEL_PEER, C.OVPN_NEW_KEY,
                                                   C.OVPN_SWAP_KEYS, C.OVPN_DEL_KEY,
                                                   C.OVPN_SET_PEER, C.OVPN_SET_IFMODE)))
def test_no_nvlist_is_einval_except_start_vpn(eng, cmd):
    assert eng.handle_set("ovpn0", cmd, None) == E.EINVAL
    assert eng.handle_set("ovpn0", cmd, b"") == E.EINVAL
    assert eng.handle_set("ovpn0", cmd, pk({})) == E.EINVAL


def test_start_vpn(eng, host):
    assert eng.handle_set("ovpn0", C.OVPN_START_VPN, None) == 0
    assert eng.handle_set("ovpn0", C.OVPN_START_VPN, pk({"x": 1})) == 0   # content ignored
    assert "ovpn0" in host.up and eng.interfaces["ovpn0"].up


# ----------------------------------------------------------------------------- NEW_PEER

@pytest.mark.parametrize("name,family,bind", [
    ("ovpn_new_peer_client_ipv4", socket.AF_INET, ("127.0.0.1", 0)),
    ("ovpn_new_peer_server_ipv4", socket.AF_INET, ("127.0.0.1", 0)),
    ("ovpn_new_peer_client_ipv6", socket.AF_INET6, ("::1", 0)),
    ("ovpn_new_peer_server_multihome_ipv6", socket.AF_INET6, ("::1", 0)),
])
def test_new_peer_vectors(eng, host, socks, name, family, bind):
    s = socks(family, bind)
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, vec(name), s.fileno()) == 0
    req = vnv(name)
    ifs = eng.interfaces["ovpn0"]
    peer = ifs.peers[req["peerid"]]
    assert peer.remote[1] == req["remote"]["address"]
    assert peer.remote[2] == socket.ntohs(req["remote"]["port"])          # raw sin_port
    assert host.hooked["ovpn0"] == s.fileno()
    assert host.steering["ovpn0"] == [req["peerid"]]
    if "local" in req:           # multihome: local address given, port 0 -> the socket's port
        assert peer.local[1] == req["local"]["address"]
        assert peer.local[2] == s.getsockname()[1]
    if "vpn_ipv4" in req:
        assert peer.vpn4 == req["vpn_ipv4"]
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, vec(name), s.fileno()) == E.EEXIST


@pytest.mark.parametrize("drop", ["peerid", "fd", "remote"])
def test_new_peer_required_keys(eng, socks, drop):
    n = new_peer_nvl()
    del n[drop]
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(n), socks().fileno()) == E.EINVAL
    n = new_peer_nvl()
    n[drop] = "7"                                  # wrong type counts as missing
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(n), socks().fileno()) == E.EINVAL


@pytest.mark.parametrize("remote", [
    [("address", b"\xc0\0\2\1"), ("port", 1)],                       # no af
    [("af", 2), ("port", 1)],                                          # no address
    [("af", 2), ("address", b"\xc0\0\2\1")],                           # no port
    [("af", 2), ("address", "192.0.2.1"), ("port", 1)],                # address mistyped
    [("af", 10), ("address", bytes(16)), ("port", 1)],                 # Linux's AF_INET6
    [("af", 2), ("address", bytes(5)), ("port", 1)],
    [("af", 28), ("address", bytes(4)), ("port", 1)],
    [("af", 2 + (1 << 32) * 0 + 3), ("address", bytes(4)), ("port", 1)],
])
def test_new_peer_bad_remote(eng, socks, remote):
    n = new_peer_nvl()
    n["remote"] = nv.NVList(remote)
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(n), socks().fileno()) == E.EINVAL


def test_new_peer_fd_errors_and_their_order(eng, socks):
    data = pk(new_peer_nvl())
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, data, None) == E.EBADF
    r, w = os.pipe()
    try:
        assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, data, r) == E.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, data, r) == E.EBADF        # closed
    # remote is checked before the fd, the fd before vpn_ipv4
    bad_remote = new_peer_nvl(af=3)
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(bad_remote), None) == E.EINVAL
    bad_vpn = new_peer_nvl(vpn_ipv4=bytes(5))
    assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(bad_vpn), None) == E.EBADF


def test_new_peer_vpn_address_lengths(eng, socks):
    s = socks()
    assert add_peer(eng, s, vpn_ipv4=bytes(5)) == E.EINVAL
    assert add_peer(eng, s, vpn_ipv6=bytes(4)) == E.EINVAL
    assert add_peer(eng, s, vpn_ipv4=bytes(4), vpn_ipv6=bytes(16)) == 0


def test_new_peer_peer_id_above_24_bits_is_refused(eng, socks):
    """Engine divergence: the kernel stores it and corrupts the opcode word."""
    s = socks()
    assert add_peer(eng, s, peer_id=0x1000000) == E.EINVAL
    assert add_peer(eng, s, peer_id=(1 << 32) + 7) == E.EINVAL
    assert add_peer(eng, s, peer_id=0xFFFFFF) == 0


def test_new_peer_local_checks(eng, socks):
    unbound = socks(bind=False)
    assert add_peer(eng, unbound) == E.EINVAL                          # local port 0
    s = socks()
    bad_local = nv.NVList([("af", 2), ("address", bytes(3)), ("port", 0)])
    assert add_peer(eng, s, local=bad_local) == E.EINVAL
    # an explicit local with a port rescues even an unbound socket (port != 0)
    good = nv.NVList([("af", 2), ("address", b"\x7f\0\0\1"), ("port", socket.htons(1194))])
    assert add_peer(eng, unbound, local=good) == 0
    peer = eng.interfaces["ovpn0"].peers[7]
    assert peer.local == (2, b"\x7f\0\0\1", 1194, 0)


def test_new_peer_family_mismatch_and_v4_mapped(eng, socks, host):
    s6 = socks(socket.AF_INET6, ("::", 0))
    assert add_peer(eng, s6) == E.EINVAL                   # v6 socket, v4 remote
    mapped = bytes(10) + b"\xff\xff" + b"\xc0\x00\x02\x01"
    assert add_peer(eng, s6, af=28, addr=mapped) == 0
    peer = eng.interfaces["ovpn0"].peers[7]
    assert peer.remote == (2, b"\xc0\x00\x02\x01", 1194, 0)
    assert peer.local[0] == 2 and peer.local[1] == bytes(4)


def test_new_peer_v6_wildcard_local_picks_source(eng, socks, host):
    s6 = socks(socket.AF_INET6, ("::", 0))
    v6 = bytes.fromhex("20010db8000000000000000000000001")
    host.source_error = E.EHOSTUNREACH
    assert add_peer(eng, s6, af=28, addr=v6) == E.EHOSTUNREACH
    host.source_error = None
    assert add_peer(eng, s6, af=28, addr=v6) == 0
    assert eng.interfaces["ovpn0"].peers[7].local[1] == host.source


def test_new_peer_eexist_before_eprototype_before_ebusy(eng, socks, host):
    s = socks()
    tcp = socks(kind=socket.SOCK_STREAM)
    assert add_peer(eng, tcp) == E.EPROTOTYPE
    assert add_peer(eng, s) == 0
    assert add_peer(eng, tcp) == E.EEXIST                  # same peer id wins
    assert add_peer(eng, tcp, peer_id=8) == E.EPROTOTYPE
    other = socks()
    assert add_peer(eng, other, peer_id=8) == E.EBUSY
    # the same socket through another descriptor is the same socket
    dup = os.dup(s.fileno())
    try:
        assert eng.handle_set("ovpn0", C.OVPN_NEW_PEER, pk(new_peer_nvl(9)), dup) == 0
    finally:
        os.close(dup)
    for p in (7, 9):
        assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": p})) == 0
    # no peers left: the new socket replaces the old one
    assert add_peer(eng, other, peer_id=8) == 0
    assert host.hooked["ovpn0"] == other.fileno()
    assert host.hook_log == [("hook", "ovpn0"), ("unhook", "ovpn0"), ("hook", "ovpn0")]


def test_new_peer_hook_failure_is_reported(eng, socks, host):
    host.hook_error = E.EADDRINUSE                 # control socket without SO_REUSEPORT
    assert add_peer(eng, socks()) == E.EADDRINUSE
    assert eng.interfaces["ovpn0"].peers == {}


# ----------------------------------------------------------------------------- DEL_PEER

def test_del_peer(eng, socks):
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peer": 7})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, vec("ovpn_del_peer")) == E.ENOENT
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, vec("ovpn_del_peer")) == 0
    err, data = eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096)
    assert err == 0 and data == vec("kreply_notif_del_peer_requested")
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, vec("ovpn_del_peer")) == E.ENOENT


def test_peer_ids_are_looked_up_as_uint32(eng, socks):
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": (1 << 32) + 7})) == 0


# ----------------------------------------------------------------------------- NEW_KEY

@pytest.mark.parametrize("name", ["ovpn_new_key_aes256gcm", "ovpn_new_key_aes128gcm_secondary",
                                  "ovpn_new_key_chacha20poly1305", "ovpn_new_key_none"])
def test_new_key_vectors(eng, socks, name):
    req = vnv(name)
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, vec(name)) == E.ENOENT   # after key checks
    assert add_peer(eng, socks(), peer_id=req["peerid"]) == 0
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, vec(name)) == 0
    peer = eng.interfaces["ovpn0"].peers[req["peerid"]]
    assert peer.key_ids[req["slot"]] == req["keyid"] and peer.key_installed[req["slot"]]


@pytest.mark.parametrize("drop", ["slot", "keyid", "peerid", "encrypt", "decrypt"])
def test_new_key_required_keys(eng, socks, drop):
    assert add_peer(eng, socks()) == 0
    n = key_nvl()
    del n[drop]
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(n)) == E.EINVAL


def test_new_key_slot_keyid_peerid_ranges(eng, socks):
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(slot=2))) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(slot=-1 & (2**64 - 1)))) == E.EINVAL
    # the kernel converts the slot to a C int: 2**32 + 1 is slot 1
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(slot=(1 << 32) + 1))) == 0
    # engine divergence: key id > 7 and peer id > 24 bits are refused
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(keyid=8))) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(peer_id=1 << 24))) == E.EINVAL
    # the slot is checked before the key directions
    n = key_nvl(slot=5)
    del n["encrypt"]
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(n)) == E.EINVAL


GOOD = {"cipher": "AES-256-GCM", "key": bytes(32), "iv": bytes(8)}


@pytest.mark.parametrize("enc,err", [
    ({"key": bytes(32), "iv": bytes(8)}, E.EINVAL),                          # no cipher
    ({"cipher": b"AES-256-GCM", "key": bytes(32), "iv": bytes(8)}, E.EINVAL),  # mistyped
    ({"cipher": "aes-256-gcm", "key": bytes(32), "iv": bytes(8)}, E.EINVAL),  # case-sensitive
    ({"cipher": "AES-256-CBC", "key": bytes(32), "iv": bytes(8)}, E.EINVAL),
    ({"cipher": "AES-256-GCM", "iv": bytes(8)}, E.EINVAL),                    # no key
    ({"cipher": "AES-256-GCM", "key": bytes(33), "iv": bytes(8)}, E.E2BIG),
    ({"cipher": "AES-256-GCM", "key": bytes(32)}, E.EINVAL),                  # no iv
    ({"cipher": "AES-256-GCM", "key": bytes(32), "iv": bytes(12)}, E.E2BIG),
    ({"cipher": "AES-256-GCM", "key": bytes(33), "iv": bytes(12)}, E.E2BIG),
    ({"cipher": "AES-256-GCM", "key": bytes(20), "iv": bytes(8)}, E.EINVAL),  # crypto_newsession
    ({"cipher": "CHACHA20-POLY1305", "key": bytes(16), "iv": bytes(8)}, E.EINVAL),
])
def test_new_key_direction_checks(eng, socks, enc, err):
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(enc=enc))) == err
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(dec=enc))) == err
    # encrypt is built (and fails) before decrypt, and both before the peer lookup
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY,
                          pk(key_nvl(peer_id=99, enc=enc,
                                     dec={"cipher": "x"}))) == err


def test_new_key_length_wins_over_aes_name(eng, socks):
    """As in the kernel: the name only picks GCM; a 32-byte key makes AES-256."""
    assert add_peer(eng, socks()) == 0
    d = {"cipher": "AES-128-GCM", "key": bytes(32), "iv": bytes(8)}
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(enc=d, dec=d))) == 0


def test_new_key_none_ignores_key_and_iv(eng, socks):
    assert add_peer(eng, socks()) == 0
    d = {"cipher": "none", "key": bytes(99), "iv": bytes(3)}
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(enc=d, dec=d))) == 0


def test_new_key_mixed_cipher_families_refused(eng, socks):
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY,
                          pk(key_nvl(dec={"cipher": "none"}))) == E.EINVAL


# ----------------------------------------------------------------------------- SWAP / DEL_KEY

def test_swap_keys(eng, socks):
    assert eng.handle_set("ovpn0", C.OVPN_SWAP_KEYS, pk({"x": 7})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_SWAP_KEYS, vec("ovpn_swap_keys")) == E.ENOENT
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SWAP_KEYS, vec("ovpn_swap_keys")) == E.ENOLINK
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(slot=0, keyid=0))) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SWAP_KEYS, vec("ovpn_swap_keys")) == E.ENOLINK
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(slot=1, keyid=1))) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SWAP_KEYS, vec("ovpn_swap_keys")) == 0
    peer = eng.interfaces["ovpn0"].peers[7]
    assert peer.key_ids == [1, 0]
    assert eng.interfaces["ovpn0"].dataplane._peers[7].slots[0].key_id == 1


def test_del_key(eng, socks):
    assert eng.handle_set("ovpn0", C.OVPN_DEL_KEY, pk({"slot": 1})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_DEL_KEY, pk({"peerid": 7})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_DEL_KEY, pk({"slot": 2, "peerid": 7})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_DEL_KEY, vec("ovpn_del_key")) == E.ENOENT
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_DEL_KEY, vec("ovpn_del_key")) == 0     # empty slot
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl(slot=1, keyid=3))) == 0
    assert eng.handle_set("ovpn0", C.OVPN_DEL_KEY, vec("ovpn_del_key")) == 0
    peer = eng.interfaces["ovpn0"].peers[7]
    assert peer.key_ids[1] == 0 and not peer.key_installed[1]
    assert eng.handle_set("ovpn0", C.OVPN_SWAP_KEYS, vec("ovpn_swap_keys")) == E.ENOLINK


# ----------------------------------------------------------------------------- SET_PEER and timers

@pytest.mark.parametrize("drop", ["peerid", "interval", "timeout"])
def test_set_peer_required_keys(eng, socks, drop):
    assert add_peer(eng, socks()) == 0
    n = vnv("ovpn_set_peer")
    del n[drop]
    assert eng.handle_set("ovpn0", C.OVPN_SET_PEER, pk(n)) == E.EINVAL


def test_set_peer_unknown_peer(eng):
    assert eng.handle_set("ovpn0", C.OVPN_SET_PEER, vec("ovpn_set_peer")) == E.ENOENT


def test_keepalive_pings_and_timeout(eng, socks, clock):
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl())) == 0
    assert eng.handle_set("ovpn0", C.OVPN_START_VPN, None) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SET_PEER, vec("ovpn_set_peer")) == 0   # 10 / 120
    dp = eng.interfaces["ovpn0"].dataplane
    assert eng.tick() == clock.t + 10
    for i in range(1, 4):
        clock.t += 10
        eng.tick()
        assert dp.peer_counters(7).pkt_out == i         # unconditional pings
    # no valid packet ever (last_active 0): deleted when the timer fires
    clock.t = 1000.0 + 119.5
    eng.tick()
    assert 7 in eng.interfaces["ovpn0"].peers
    clock.t = 1000.0 + 120
    eng.tick()
    assert 7 not in eng.interfaces["ovpn0"].peers
    (n,) = drain(eng)
    assert n["notification"] == NotifType.DEL_PEER and n["del_reason"] == DelReason.TIMEOUT
    # 3 pings, then one for the stretch the clock skipped (missed pings are not
    # sent in a burst), and the peer's counters travel with the notification
    assert n["packets"]["out"] == 4


def test_timeout_rearms_from_last_active(eng, socks, clock):
    assert add_peer(eng, socks()) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SET_PEER,
                          pk({"peerid": 7, "interval": 0, "timeout": 60})) == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp._peers[7].last_active = clock.t + 50           # a packet at +50
    clock.t += 60
    eng.tick()
    assert eng.interfaces["ovpn0"].peers[7].timeout_at == clock.t + 50
    clock.t += 49
    eng.tick()
    assert 7 in eng.interfaces["ovpn0"].peers
    clock.t += 1
    eng.tick()
    assert 7 not in eng.interfaces["ovpn0"].peers


def test_timeout_notification_bytes(eng, socks, clock):
    assert add_peer(eng, socks()) == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp._peers[7].counters = PeerCounters(pkt_in=50, pkt_out=60, bytes_in=4000, bytes_out=5000)
    assert eng.handle_set("ovpn0", C.OVPN_SET_PEER,
                          pk({"peerid": 7, "interval": 0, "timeout": 5})) == 0
    clock.t += 5
    eng.tick()
    assert eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096) == (0, vec("kreply_notif_del_peer_timeout"))


# ----------------------------------------------------------------------------- SET_IFMODE

def test_set_ifmode(eng, host):
    ifs = eng.interfaces["ovpn0"]
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, vec("ovpn_set_ifmode_subnet")) == 0
    assert ifs.flags == 0x8002
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, vec("ovpn_set_ifmode_p2p")) == 0
    assert ifs.flags == 0x8010
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, pk({"ifmode": 0x10})) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, pk({"mode": 0x10})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, pk({"ifmode": 0x12})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, pk({"ifmode": 0x8001})) == E.EINVAL
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, pk({"ifmode": (1 << 32) | 0x2})) == 0
    assert eng.handle_set("ovpn0", C.OVPN_START_VPN, None) == 0
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, vec("ovpn_set_ifmode_p2p")) == E.EBUSY
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, pk({"ifmode": 1})) == E.EBUSY  # before mode


def test_set_ifmode_busy_when_link_set_up_by_hand(eng, host):
    host.up.add("ovpn0")                  # "ip link set up" / ifconfig up sets IFF_UP too
    assert eng.handle_set("ovpn0", C.OVPN_SET_IFMODE, vec("ovpn_set_ifmode_p2p")) == E.EBUSY


# ----------------------------------------------------------------------------- GET replies

def test_get_stats_bytes_and_quirk(eng):
    dp = eng.interfaces["ovpn0"].dataplane
    c = dp._counters
    c.lost_data_in, c.lost_data_out, c.data_in, c.data_out = 3, 1, 120, 118
    c.tunnel_in, c.tunnel_out, c.transport_in, c.transport_out = 10240, 777, 14000, 999
    assert eng.handle_get("ovpn0", C.OVPN_GET_STATS, 4096) == (0, vec("kreply_get_stats"))
    size = len(vec("kreply_get_stats"))
    assert eng.handle_get("ovpn0", C.OVPN_GET_STATS, size) == (0, vec("kreply_get_stats"))
    assert eng.handle_get("ovpn0", C.OVPN_GET_STATS, size - 1) == (E.ENOSPC, b"")


def test_get_peer_stats(eng, socks):
    assert eng.handle_get("ovpn0", C.OVPN_GET_PEER_STATS, 4096) == \
        (0, vec("kreply_get_peer_stats_nopeers"))
    s = socks()
    assert add_peer(eng, s, peer_id=2) == 0          # added out of order: reply is sorted
    assert add_peer(eng, s, peer_id=1) == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp._peers[1].counters = PeerCounters(10, 11, 1000, 1100)
    dp._peers[2].counters = PeerCounters(0, 1, 0, 84)
    assert eng.handle_get("ovpn0", C.OVPN_GET_PEER_STATS, 4096) == (0, vec("kreply_get_peer_stats"))
    assert eng.handle_get("ovpn0", C.OVPN_GET_PEER_STATS, 64) == (E.ENOSPC, b"")


def test_poll_and_get_pkt(eng, socks):
    assert eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096) == (E.ENOENT, b"")
    s = socks()
    for p in (7, 8):
        assert add_peer(eng, s, peer_id=p) == 0
        assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": p})) == 0
    assert eng.handle_get("ovpn0", C.OVPN_POLL_PKT, 128) == (0, vec("kreply_poll_pkt"))
    assert eng.handle_get("ovpn0", C.OVPN_POLL_PKT, 10) == (E.ENOSPC, b"")
    # ENOSPC on GET_PKT loses the notification, as in the kernel
    assert eng.handle_get("ovpn0", C.OVPN_GET_PKT, 16) == (E.ENOSPC, b"")
    (n,) = drain(eng)
    assert n["peerid"] == 8


def test_notification_ring_drops_new_entries_when_full(eng, socks):
    s = socks()
    for p in range(40):
        assert add_peer(eng, s, peer_id=p) == 0
        assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": p})) == 0
    err, data = eng.handle_get("ovpn0", C.OVPN_POLL_PKT, 128)
    assert nv.unpack(data)["pending"] == 32
    assert [n["peerid"] for n in drain(eng)] == list(range(32))


def test_rotate_key_and_float_notifications(eng, socks):
    s = socks()
    assert add_peer(eng, s, peer_id=7) == 0
    assert add_peer(eng, s, peer_id=1, addr=b"\xc6\x33\x64\x02") == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp._events.append(("rotate_key", 7))
    dp._events.append(("rotate_key", 99))            # peer already gone: dropped
    assert eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096) == (0, vec("kreply_notif_rotate_key"))
    new = ("198.51.100.99", socket.ntohs(20931))
    dp._events.append(("float", 1, new))
    assert eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096) == (0, vec("kreply_notif_float_ipv4"))
    # the remote changes only now that the notification was queued
    assert eng.interfaces["ovpn0"].peers[1].remote == (2, bytes([198, 51, 100, 99]), new[1], 0)
    assert dp._peers[1].remote == (4, bytes([198, 51, 100, 99]), new[1], 0)


def test_float_ipv6_bytes(eng, socks):
    s6 = socks(socket.AF_INET6, ("::1", 0))
    assert add_peer(eng, s6, peer_id=1, af=28, addr=bytes.fromhex("20010db8" + "00" * 11 + "01")) == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp._events.append(("float", 1, ("fe80::b", socket.ntohs(20931), 0, 3)))
    assert eng.handle_get("ovpn0", C.OVPN_GET_PKT, 4096) == (0, vec("kreply_notif_float_ipv6"))


def test_float_not_applied_when_ring_is_full(eng, socks):
    s = socks()
    for p in range(32):
        assert add_peer(eng, s, peer_id=100 + p) == 0
        assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": 100 + p})) == 0
    assert add_peer(eng, s, peer_id=1) == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp._events.append(("float", 1, ("198.51.100.99", 5000)))
    eng.tick()
    assert eng.interfaces["ovpn0"].peers[1].remote[1] == b"\xc0\x00\x02\x01"
    assert dp._peers[1].remote[1] == b"\xc0\x00\x02\x01"


def test_destroy_deletes_peers_and_flushes(eng, socks, host):
    assert add_peer(eng, socks()) == 0
    assert eng.destroy_interface("ovpn0") == 0
    assert host.hook_log[-1] == ("unhook", "ovpn0")
    assert "ovpn0" not in host.links
    assert eng.create_interface("ovpn0") == (0, "ovpn0")
    assert eng.handle_get("ovpn0", C.OVPN_POLL_PKT, 128)[1] == pk({"pending": 0})


def test_reply_vectors_json_agree_with_engine_key_order():
    """The kreply vectors' key order is what the engine builds (sanity on the inputs)."""
    j = json.loads((VEC / "kreply_get_stats.json").read_text())
    assert [p[0] for p in j["pairs"]] == ["lost_ctrl", "lost_data", "nomem_data", "data", "ctrl",
                                          "tunnel", "transport"]


def test_rotate_and_float_from_real_packets(eng, socks):
    """The data plane's own events reach GET_PKT (no injected events)."""
    s = socks()
    assert add_peer(eng, s) == 0
    assert eng.handle_set("ovpn0", C.OVPN_NEW_KEY, pk(key_nvl())) == 0
    assert eng.handle_set("ovpn0", C.OVPN_START_VPN, None) == 0
    dp = eng.interfaces["ovpn0"].dataplane
    dp.rotate_threshold = 2
    ip = bytes([0x45]) + bytes(19)
    wires = [dp.handle_tun_packet(ip)[0] for _ in range(3)]
    (n,) = drain(eng)
    assert (n["peerid"], n["notification"]) == (7, NotifType.ROTATE_KEY)
    # the same key both ways (key_nvl): our own packets decrypt; one from a new address
    assert dp.handle_datagram(wires[0], ("192.0.2.1", 1194)) is not None
    assert drain(eng) == []
    assert dp.handle_datagram(wires[1], ("192.0.2.50", 5000)) is not None
    (n,) = drain(eng)
    assert n["notification"] == NotifType.FLOAT
    assert n["address"]["address"] == bytes([192, 0, 2, 50])
    assert n["address"]["port"] == socket.htons(5000)
    assert dp.handle_tun_packet(ip)[1][1] == bytes([192, 0, 2, 50])   # TX follows


def test_last_peer_releases_the_socket(eng, socks, host):
    """ovpn_rele_so: with the last peer gone the socket is unhooked and forgotten."""
    s = socks()
    assert add_peer(eng, s, peer_id=1) == 0
    assert add_peer(eng, s, peer_id=2) == 0
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": 1})) == 0
    assert host.hooked == {"ovpn0": s.fileno()} and host.steering["ovpn0"] == [2]
    assert eng.handle_set("ovpn0", C.OVPN_DEL_PEER, pk({"peerid": 2})) == 0
    assert host.hooked == {} and eng.interfaces["ovpn0"].socket is None
    assert add_peer(eng, s, peer_id=1) == 0                  # the same socket, hooked again
    assert host.hook_log == [("hook", "ovpn0"), ("unhook", "ovpn0"), ("hook", "ovpn0")]


def test_interface_whose_link_vanished_is_forgotten(eng, host):
    """``ip link del`` on the tun: the engine drops the interface as destroy would,
    and later requests for it get ENXIO like any unknown interface."""
    assert eng.reap_vanished() == []
    host.links.discard("ovpn0")
    assert eng.reap_vanished() == ["ovpn0"]
    assert eng.handle_get("ovpn0", C.OVPN_POLL_PKT, 128) == (E.ENXIO, b"")
    assert eng.reap_vanished() == []


def test_fast_address_conversions_agree_with_ipaddress(socks):
    """NEW_PEER's per-peer path converts addresses without ipaddress (IPv4):
    same results as the ipaddress-based conversions, same errors for bad input."""
    import ipaddress

    from bsd_ovpn.engine.commands import inspect_socket, kaddr_to_sockaddr
    from bsd_ovpn.errors import ValidationError

    fastpath = pytest.importorskip("bsd_ovpn.engine.fastpath")
    for raw in (bytes(4), b"\xc0\x00\x02\x01", b"\xff" * 4, b"\x7f\x00\x00\x01"):
        assert kaddr_to_sockaddr((2, raw, 1194, 0)) == (str(ipaddress.IPv4Address(raw)), 1194)
    for sa in (("192.0.2.1", 1194), ("0.0.0.0", 0), ("255.255.255.255", 65535),
               ("2001:db8::1", 5, 0, 3), ("::ffff:192.0.2.1", 9)):
        ip = ipaddress.ip_address(sa[0])
        want = (ip.version, ip.packed, sa[1], sa[3] if len(sa) > 3 else 0)
        assert fastpath.c_addr(sa) == want
    for bad in (("01.2.3.4", 1), ("1.2.3", 1), ("192.0.2.1", 70000), ("192.0.2.1", -1),
                ("192.0.2.1 ", 1), ("nope", 1)):
        with pytest.raises(ValidationError):
            fastpath.c_addr(bad)
    s = socks()
    assert inspect_socket(s.fileno()).local == (2, b"\x7f\x00\x00\x01", s.getsockname()[1], 0)
