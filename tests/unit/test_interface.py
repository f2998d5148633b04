"""The typed if_ovpn API against OpenVPN's golden request bytes and the kernel's replies."""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsd_ovpn import nv
from bsd_ovpn.errors import IfOvpnError, UnsupportedPlatform, ValidationError
from bsd_ovpn.ifovpn import GET_PKT_BUFSIZE, Command, DelReason
from bsd_ovpn.interface import (
    MAX_REPLY_BUFSIZE,
    Endpoint,
    Float,
    InOut,
    Interface,
    KeyMaterial,
    PeerDeleted,
    PeerStats,
    ReplyError,
    RotateKey,
    UnknownNotification,
    port_from_kernel,
    port_to_kernel,
)
from bsd_ovpn.transport import (
    IfOvpnBusy,
    IfOvpnExists,
    IfOvpnNotFound,
    IfOvpnPermissionError,
    RecordingTransport,
)

VECTORS = Path(os.environ.get("BSD_OVPN_VECTORS",
                              Path(__file__).resolve().parents[3] / "shared" / "vectors" / "nvlist"))
LITTLE = sys.byteorder == "little"

ENC = KeyMaterial(bytes(range(32)), bytes.fromhex("a1a2a3a4a5a6a7a8"))
DEC = KeyMaterial(bytes(range(255, 223, -1)), bytes.fromhex("b1b2b3b4b5b6b7b8"))


def vector(name: str) -> bytes:
    path = VECTORS / f"{name}.bin"
    if not path.exists():
        pytest.fail(f"golden vector {path} is missing (set BSD_OVPN_VECTORS)")
    return path.read_bytes()


@pytest.fixture
def tr():
    return RecordingTransport()


@pytest.fixture
def ifc(tr):
    return Interface.create(transport=tr)


def last_request(tr):
    return tr.requests[-1]


# -- requests: byte for byte what OpenVPN 2.6 sends ------------------------------

# Each case: vector, command, call on the Interface, fd expected beside the request.
REQUEST_CASES = [
    ("ovpn_new_peer_client_ipv4", Command.OVPN_NEW_PEER,
     lambda i: i.new_peer(7, 5, ("192.0.2.1", 1194)), 5),
    ("ovpn_new_peer_client_ipv6", Command.OVPN_NEW_PEER,
     lambda i: i.new_peer(0, 5, (ipaddress.ip_address("2001:db8::1"), 1194)), 5),
    ("ovpn_new_peer_server_ipv4", Command.OVPN_NEW_PEER,
     lambda i: i.new_peer(1, 6, ("198.51.100.2", 51000), vpn_ipv4="10.8.0.2"), 6),
    ("ovpn_new_peer_server_multihome_ipv6", Command.OVPN_NEW_PEER,
     lambda i: i.new_peer(2, 6, Endpoint(ipaddress.ip_address("2001:db8::1"), 40000),
                          local=("2001:db8::2", 0), vpn_ipv4=ipaddress.ip_address("10.8.0.3"),
                          vpn_ipv6="fd00::1000"), 6),
    ("ovpn_del_peer", Command.OVPN_DEL_PEER, lambda i: i.del_peer(7), None),
    ("ovpn_set_peer", Command.OVPN_SET_PEER, lambda i: i.set_peer(7, 10, 120), None),
    ("ovpn_new_key_aes256gcm", Command.OVPN_NEW_KEY,
     lambda i: i.new_key(7, 0, 0, "AES-256-GCM", encrypt=ENC, decrypt=DEC), None),
    ("ovpn_new_key_aes128gcm_secondary", Command.OVPN_NEW_KEY,
     lambda i: i.new_key(7, 1, 1, "AES-128-GCM", KeyMaterial(ENC.key[:16], ENC.iv),
                         KeyMaterial(DEC.key[:16], DEC.iv)), None),
    ("ovpn_new_key_chacha20poly1305", Command.OVPN_NEW_KEY,
     lambda i: i.new_key(3, 0, 2, "CHACHA20-POLY1305", ENC, DEC), None),
    ("ovpn_new_key_none", Command.OVPN_NEW_KEY, lambda i: i.new_key(7, 0, 0, "none"), None),
    ("ovpn_swap_keys", Command.OVPN_SWAP_KEYS, lambda i: i.swap_keys(7), None),
    ("ovpn_del_key", Command.OVPN_DEL_KEY, lambda i: i.del_key(7, 1), None),
    ("ovpn_set_ifmode_p2p", Command.OVPN_SET_IFMODE, lambda i: i.set_ifmode(0x8010), None),
    ("ovpn_set_ifmode_subnet", Command.OVPN_SET_IFMODE, lambda i: i.set_ifmode("subnet"), None),
]


@pytest.mark.skipif(not LITTLE, reason="the golden vectors are little-endian")
@pytest.mark.parametrize("name,command,call,fd", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_request_bytes_equal_openvpn(ifc, tr, name, command, call, fd):
    call(ifc)
    assert last_request(tr) == ("ovpn0", command, vector(name), fd)


def test_start_vpn_sends_no_nvlist(ifc, tr):
    ifc.start_vpn()
    assert last_request(tr) == ("ovpn0", Command.OVPN_START_VPN, None, None)


def test_new_peer_takes_a_socket_object(ifc, tr):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        ifc.new_peer(7, s, ("192.0.2.1", 1194))
        assert last_request(tr)[3] == s.fileno()
        assert nv.unpack(last_request(tr)[2]).get_number("fd") == s.fileno()


@pytest.mark.skipif(not LITTLE, reason="little-endian value")
def test_port_is_network_order_read_as_host_integer():
    assert port_to_kernel(1194) == 43524
    assert port_from_kernel(43524) == 1194
    assert port_to_kernel(51000) == 14535


@pytest.mark.parametrize("port", [0, 1, 255, 256, 1194, 65535])
def test_port_round_trip(port):
    assert port_from_kernel(port_to_kernel(port)) == port


def test_v4_mapped_remote_is_sent_as_ipv6(ifc, tr):
    ifc.new_peer(4, 5, ("::ffff:192.0.2.1", 1194), local=("::", 0))
    nvl = nv.unpack(last_request(tr)[2])
    assert list(nvl) == ["local", "remote", "fd", "peerid"]
    remote = nvl.get_nvlist("remote")
    assert remote.get_number("af") == 28
    assert remote.get_binary("address") == ipaddress.IPv6Address("::ffff:192.0.2.1").packed


def test_link_local_scope_travels_as_scopeid(ifc, tr):
    ifc.new_peer(4, 5, ("fe80::1%3", 1194))
    ifc.new_peer(5, 5, ("fe80::2", 1194, 0, 4))  # socket-style 4-tuple
    first, second = (nv.unpack(r[2]).get_nvlist("remote") for r in tr.requests[-2:])
    assert list(first) == ["af", "address", "port", "scopeid"]
    assert first.get_number("scopeid") == 3 and second.get_number("scopeid") == 4


def test_no_scopeid_for_global_ipv6(ifc, tr):
    ifc.new_peer(4, 5, ("2001:db8::9", 1194, 0, 0))
    assert "scopeid" not in nv.unpack(last_request(tr)[2]).get_nvlist("remote")


# -- validation before any request -----------------------------------------------

BAD_CALLS = [
    ("peer id -1", lambda i: i.del_peer(-1)),
    ("peer id 2**24", lambda i: i.swap_keys(0x1000000)),
    ("peer id bool", lambda i: i.del_peer(True)),
    ("peer id str", lambda i: i.del_peer("7")),
    ("key id 8", lambda i: i.new_key(7, 0, 8, "AES-256-GCM", ENC, DEC)),
    ("key id -1", lambda i: i.new_key(7, 0, -1, "AES-256-GCM", ENC, DEC)),
    ("slot 2", lambda i: i.new_key(7, 2, 0, "AES-256-GCM", ENC, DEC)),
    ("del slot 2", lambda i: i.del_key(7, 2)),
    ("cipher case", lambda i: i.new_key(7, 0, 0, "aes-256-gcm", ENC, DEC)),
    ("cipher cbc", lambda i: i.new_key(7, 0, 0, "AES-256-CBC", ENC, DEC)),
    ("aes256 short key", lambda i: i.new_key(7, 0, 0, "AES-256-GCM",
                                             KeyMaterial(ENC.key[:16], ENC.iv), DEC)),
    ("aes128 long key", lambda i: i.new_key(7, 0, 0, "AES-128-GCM", ENC,
                                            KeyMaterial(DEC.key[:16], DEC.iv))),
    ("aes192 20 bytes", lambda i: i.new_key(7, 0, 0, "AES-192-GCM",
                                            KeyMaterial(ENC.key[:20], ENC.iv), DEC)),
    ("chacha short", lambda i: i.new_key(7, 0, 0, "CHACHA20-POLY1305",
                                         KeyMaterial(ENC.key[:24], ENC.iv), DEC)),
    ("iv 12", lambda i: i.new_key(7, 0, 0, "AES-256-GCM", KeyMaterial(ENC.key, b"\0" * 12), DEC)),
    ("missing decrypt", lambda i: i.new_key(7, 0, 0, "AES-256-GCM", ENC)),
    ("none with keys", lambda i: i.new_key(7, 0, 0, "none", ENC, DEC)),
    ("hostname remote", lambda i: i.new_peer(7, 5, ("vpn.example.org", 1194))),
    ("remote port 0", lambda i: i.new_peer(7, 5, ("192.0.2.1", 0))),
    ("remote port 65536", lambda i: i.new_peer(7, 5, ("192.0.2.1", 65536))),
    ("remote not a tuple", lambda i: i.new_peer(7, 5, "192.0.2.1:1194")),
    ("af mismatch", lambda i: i.new_peer(7, 5, ("192.0.2.1", 1194), local=("2001:db8::2", 0))),
    ("v4 scope", lambda i: i.new_peer(7, 5, ("192.0.2.1", 1194, 0, 3))),
    ("vpn_ipv4 is v6", lambda i: i.new_peer(7, 5, ("192.0.2.1", 1194), vpn_ipv4="fd00::1")),
    ("vpn_ipv6 junk", lambda i: i.new_peer(7, 5, ("192.0.2.1", 1194), vpn_ipv6="nope")),
    ("fd -1", lambda i: i.new_peer(7, -1, ("192.0.2.1", 1194))),
    ("keepalive negative", lambda i: i.set_peer(7, -1, 60)),
    ("keepalive > u32", lambda i: i.set_peer(7, 10, 2**32)),
    ("ifmode 0", lambda i: i.set_ifmode(0)),
    ("ifmode loopback", lambda i: i.set_ifmode(0x8008)),
    ("ifmode name", lambda i: i.set_ifmode("tap")),
]


@pytest.mark.parametrize("label,call", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_validation_happens_before_any_request(ifc, tr, label, call):
    with pytest.raises(ValidationError):
        call(ifc)
    assert tr.requests == []


def test_tcp_socket_is_refused_before_the_kernel(ifc, tr):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        with pytest.raises(ValidationError, match="UDP socket"):
            ifc.new_peer(7, s, ("192.0.2.1", 1194))
    assert tr.requests == []


def test_socket_family_must_match_remote(ifc, tr):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4:
        with pytest.raises(ValidationError, match="::ffff:192.0.2.1"):
            ifc.new_peer(7, s6, ("192.0.2.1", 1194))
        with pytest.raises(ValidationError, match="socket is IPv4"):
            ifc.new_peer(7, s4, ("2001:db8::1", 1194))
        assert tr.requests == []
        with pytest.raises(ValidationError, match="not bound"):
            ifc.new_peer(7, s6, ("::ffff:192.0.2.1", 1194))
        s6.bind(("::1", 0))
        ifc.new_peer(7, s6, ("::ffff:192.0.2.1", 1194))  # dual stack: the kernel converts
        assert len(tr.requests) == 1


def test_peer_id_limits_accepted(ifc, tr):
    ifc.del_peer(0)
    ifc.del_peer(0xFFFFFF)
    assert [nv.unpack(r[2])["peerid"] for r in tr.requests] == [0, 0xFFFFFF]


def test_key_material_is_not_in_repr():
    assert "a1a2" not in repr(ENC) and "\\x00\\x01" not in repr(ENC)


def test_oversized_request_is_refused(ifc, tr):
    with pytest.raises(ValidationError, match="at most 4096"):
        ifc._send(Command.OVPN_SET_PEER, {"peerid": 1, "pad": b"\0" * 4096})
    assert tr.requests == []


def test_descriptors_never_go_to_the_kernel(ifc, tr):
    with pytest.raises(nv.NVError):
        ifc._send(Command.OVPN_NEW_PEER, {"fd": nv.Descriptor(0)})
    assert tr.requests == []


# -- keepalive hazard ---------------------------------------------------------------

def test_refuses_to_lower_running_keepalive_to_zero(ifc, tr):
    ifc.new_peer(7, 5, ("192.0.2.1", 1194))
    ifc.set_peer(7, 10, 60)
    sent = len(tr.requests)
    with pytest.raises(ValidationError, match="interval from 10 to 0"):
        ifc.set_peer(7, 0, 60)
    with pytest.raises(ValidationError, match="timeout from 60 to 0"):
        ifc.set_peer(7, 10, 0)
    assert len(tr.requests) == sent
    ifc.set_peer(7, 5, 30)  # changing to other non-zero values is fine
    ifc.del_peer(7)
    ifc.new_peer(7, 5, ("192.0.2.1", 1194))
    ifc.set_peer(7, 0, 0)  # a fresh peer has nothing running


def test_kernel_deleted_peer_forgets_its_keepalive(ifc, tr):
    ifc.new_peer(7, 5, ("192.0.2.1", 1194))
    ifc.set_peer(7, 10, 120)
    tr.script(Command.OVPN_GET_PKT, vector("kreply_notif_del_peer_timeout"))
    assert [type(n) for n in ifc.notifications()] == [PeerDeleted]
    ifc.new_peer(7, 5, ("192.0.2.1", 1194))
    ifc.set_peer(7, 0, 0)


def test_failed_set_peer_keeps_old_values(ifc, tr):
    ifc.new_peer(7, 5, ("192.0.2.1", 1194))
    ifc.set_peer(7, 10, 60)
    tr.fail(Command.OVPN_SET_PEER, errno.ENOENT)
    with pytest.raises(IfOvpnNotFound):
        ifc.set_peer(7, 20, 60)
    with pytest.raises(ValidationError):
        ifc.set_peer(7, 0, 60)


# -- errno messages -------------------------------------------------------------------

ERRNO_CASES = [
    (Command.OVPN_NEW_PEER, errno.EEXIST, lambda i: i.new_peer(9, 5, ("192.0.2.1", 1194)),
     IfOvpnExists, "OVPN_NEW_PEER on ovpn0: peer id 9 already exists (EEXIST)"),
    (Command.OVPN_NEW_PEER, errno.EBUSY, lambda i: i.new_peer(9, 5, ("192.0.2.1", 1194)),
     IfOvpnBusy, "another socket is already attached"),
    (Command.OVPN_NEW_PEER, errno.EPROTOTYPE, lambda i: i.new_peer(9, 5, ("192.0.2.1", 1194)),
     IfOvpnError, "not a datagram (UDP) socket"),
    (Command.OVPN_NEW_PEER, errno.EBADF, lambda i: i.new_peer(9, 5, ("192.0.2.1", 1194)),
     IfOvpnError, "fd 5 is not open in this process"),
    (Command.OVPN_SWAP_KEYS, errno.ENOLINK, lambda i: i.swap_keys(7),
     IfOvpnError, "OVPN_SWAP_KEYS on ovpn0: no key in the secondary slot (ENOLINK)"),
    (Command.OVPN_DEL_PEER, errno.ENOENT, lambda i: i.del_peer(12),
     IfOvpnNotFound, "peer id 12 does not exist"),
    (Command.OVPN_SET_IFMODE, errno.EPERM, lambda i: i.set_ifmode("p2p"),
     IfOvpnPermissionError, "OVPN_SET_IFMODE on ovpn0: needs root (PRIV_NET_OVPN) (EPERM)"),
    (Command.OVPN_SET_IFMODE, errno.EBUSY, lambda i: i.set_ifmode("p2p"),
     IfOvpnBusy, "is up; set the mode before START_VPN"),
    (Command.OVPN_NEW_KEY, errno.E2BIG, lambda i: i.new_key(7, 0, 0, "none"),
     IfOvpnError, "key longer than 32 bytes or iv not 8 bytes"),
    (Command.OVPN_GET_PEER_STATS, errno.ENOTSUP, lambda i: i.peer_stats(),
     IfOvpnError, "this kernel has no OVPN_GET_PEER_STATS"),
]


@pytest.mark.parametrize("command,err,call,cls,text", ERRNO_CASES,
                         ids=[f"{c[0].name}-{errno.errorcode[c[1]]}" for c in ERRNO_CASES])
def test_errno_becomes_a_clear_typed_error(ifc, tr, command, err, call, cls, text):
    tr.fail(command, err)
    with pytest.raises(cls) as info:
        call(ifc)
    assert info.value.errno == err
    assert info.value.command == command.name
    assert info.value.ifname == "ovpn0"
    assert text in str(info.value)


# -- replies ----------------------------------------------------------------------------

def test_stats_from_kernel_reply(ifc, tr):
    tr.script(Command.OVPN_GET_STATS, vector("kreply_get_stats"))
    st = ifc.stats()
    assert st.lost_data == InOut(3, 1)
    assert st.data == InOut(120, 118)
    assert st.tunnel == InOut(10240, 10240) and st.transport == InOut(14000, 14000)
    assert st.as_dict()["data"] == {"in": 120, "out": 118}
    json.dumps(st.as_dict())


def test_peer_stats_from_kernel_reply(ifc, tr):
    tr.script(Command.OVPN_GET_PEER_STATS, vector("kreply_get_peer_stats"))
    assert ifc.peer_stats() == {
        1: PeerStats(1, 10, 11, 1000, 1100),
        2: PeerStats(2, 0, 1, 0, 84),
    }
    assert tr.queries[-1] == ("ovpn0", Command.OVPN_GET_PEER_STATS, 4096)


def test_peer_stats_without_peers(ifc, tr):
    tr.script(Command.OVPN_GET_PEER_STATS, vector("kreply_get_peer_stats_nopeers"))
    assert ifc.peer_stats() == {}


def _many_peers(n: int) -> bytes:
    return nv.pack({"peers": [{"peerid": i, "packets": {"in": i, "out": 2 * i},
                               "bytes": {"in": 100 * i, "out": 200 * i}} for i in range(n)]})


def test_peer_stats_doubles_the_buffer_on_enospc(ifc, tr):
    reply = _many_peers(40)
    assert 8192 < len(reply) <= 16384
    tr.script(Command.OVPN_GET_PEER_STATS, reply, reply, reply)
    stats = ifc.peer_stats()
    assert len(stats) == 40 and stats[39] == PeerStats(39, 39, 78, 3900, 7800)
    assert [q[2] for q in tr.queries] == [4096, 8192, 16384]


def test_peer_stats_starts_at_the_size_that_last_sufficed(ifc, tr):
    """Each ENOSPC means a whole reply built for nothing: the next GET starts at the
    buffer size that worked, grows again if needed, and shrinks when replies do."""
    big, small = _many_peers(40), _many_peers(1)
    tr.script(Command.OVPN_GET_PEER_STATS, big, big, big)      # 4096, 8192: ENOSPC
    assert len(ifc.peer_stats()) == 40
    tr.calls.clear()
    tr.script(Command.OVPN_GET_PEER_STATS, big)
    assert len(ifc.peer_stats()) == 40
    assert [q[2] for q in tr.queries] == [16384]               # no refusal this time
    bigger = _many_peers(80)
    tr.calls.clear()
    tr.script(Command.OVPN_GET_PEER_STATS, bigger, bigger)
    assert len(ifc.peer_stats()) == 80
    assert [q[2] for q in tr.queries] == [16384, 32768]
    tr.calls.clear()
    tr.script(Command.OVPN_GET_PEER_STATS, small, small)       # peers left
    ifc.peer_stats()
    ifc.peer_stats()
    assert [q[2] for q in tr.queries] == [32768, 4096]


def test_peer_stats_doubling_is_bounded(ifc, tr):
    steps = (MAX_REPLY_BUFSIZE // 4096).bit_length()
    tr.fail(Command.OVPN_GET_PEER_STATS, errno.ENOSPC, times=steps + 5)
    with pytest.raises(IfOvpnError) as info:
        ifc.peer_stats()
    assert info.value.errno == errno.ENOSPC
    assert f"still larger than {MAX_REPLY_BUFSIZE}" in str(info.value)
    sizes = [q[2] for q in tr.queries]
    assert sizes[0] == 4096 and sizes[-1] == MAX_REPLY_BUFSIZE and len(sizes) == steps


def test_poll(ifc, tr):
    tr.script(Command.OVPN_POLL_PKT, vector("kreply_poll_pkt"))
    assert ifc.poll() == 2
    assert tr.queries[-1] == ("ovpn0", Command.OVPN_POLL_PKT, 128)


def test_notifications_drain_until_enoent(ifc, tr):
    tr.script(Command.OVPN_GET_PKT, *(vector(n) for n in (
        "kreply_notif_del_peer_requested", "kreply_notif_del_peer_timeout",
        "kreply_notif_rotate_key", "kreply_notif_float_ipv4", "kreply_notif_float_ipv6")))
    events = ifc.notifications()
    assert events == [
        PeerDeleted(7, DelReason.REQUESTED, 0, 0, 0, 0),
        PeerDeleted(7, DelReason.TIMEOUT, 50, 60, 4000, 5000),
        RotateKey(7),
        Float(1, Endpoint(ipaddress.IPv4Address("198.51.100.99"), port_from_kernel(20931))),
        Float(1, Endpoint(ipaddress.IPv6Address("fe80::b"), port_from_kernel(20931), 3)),
    ]
    # six GET_PKT: five events and the ENOENT that ends the drain, all with 4096 bytes
    assert [q[1:] for q in tr.queries] == [(Command.OVPN_GET_PKT, GET_PKT_BUFSIZE)] * 6
    assert GET_PKT_BUFSIZE >= 4096
    as_dicts = [e.as_dict() for e in events]
    json.dumps(as_dicts)
    assert as_dicts[1] == {"type": "peer_deleted", "peer_id": 7, "reason": "TIMEOUT",
                           "packets_in": 50, "packets_out": 60, "bytes_in": 4000,
                           "bytes_out": 5000}
    assert as_dicts[4]["address"] == {"address": "fe80::b", "port": port_from_kernel(20931),
                                      "scope_id": 3}


def test_notifications_empty_queue(ifc, tr):
    assert ifc.notifications() == []


def test_notifications_limit(ifc, tr):
    tr.script(Command.OVPN_GET_PKT, *[vector("kreply_notif_rotate_key")] * 5)
    assert len(ifc.notifications(limit=3)) == 3
    assert tr.pending(Command.OVPN_GET_PKT) == 2


def test_old_kernel_del_peer_without_reason_or_counters(ifc, tr):
    tr.script(Command.OVPN_GET_PKT, nv.pack({"peerid": 4, "notification": 0}))
    assert ifc.notifications() == [PeerDeleted(4, None)]


def test_unknown_notification_and_reason_are_kept(ifc, tr):
    tr.script(Command.OVPN_GET_PKT, nv.pack({"peerid": 4, "notification": 9}),
              nv.pack({"peerid": 4, "notification": 0, "del_reason": 5}))
    assert ifc.notifications() == [UnknownNotification(4, 9), PeerDeleted(4, 5)]


BAD_REPLIES = [
    (Command.OVPN_POLL_PKT, b"not an nvlist at all", "not a valid nvlist"),
    (Command.OVPN_POLL_PKT, nv.pack({}), "'pending'"),
    (Command.OVPN_POLL_PKT, nv.pack({"pending": "2"}), "'pending'"),
    (Command.OVPN_GET_PKT, nv.pack({"notification": 1}), "'peerid'"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 2**40, "notification": 1}), "'peerid'"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 1, "notification": 2}), "'address'"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 1, "notification": 2, "address": {
        "af": 2, "port": 1, "address": b"\1\2\3"}}), "3 bytes"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 1, "notification": 2, "address": {
        "af": 10, "port": 1, "address": b"\0" * 16}}), "found 10"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 1, "notification": 2, "address": {
        "af": 2, "port": 70000, "address": b"\1\2\3\4"}}), "'port'"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 1, "notification": 0, "packets": {"in": 1}}),
     "'out'"),
    (Command.OVPN_GET_PKT, nv.pack({"peerid": 1, "notification": 0, "del_reason": b"\0"}),
     "'del_reason'"),
    (Command.OVPN_GET_STATS, nv.pack({"lost_ctrl": {"in": 0, "out": 0}}), "'lost_data'"),
    (Command.OVPN_GET_PEER_STATS, nv.pack({"peers": [{"peerid": 1, "packets": {"in": 1, "out": 1}}]}),
     "'bytes'"),
    (Command.OVPN_GET_PEER_STATS, nv.pack({"peers": 3}), "'peers'"),
    (Command.OVPN_GET_PEER_STATS, _many_peers(2)[:-3], "not a valid nvlist"),
]


@pytest.mark.parametrize("command,reply,text", BAD_REPLIES,
                         ids=[f"{c[0].name}-{i}" for i, c in enumerate(BAD_REPLIES)])
def test_bad_replies_raise_reply_error(ifc, tr, command, reply, text):
    tr.script(command, reply)
    call = {Command.OVPN_POLL_PKT: ifc.poll, Command.OVPN_GET_PKT: ifc.notifications,
            Command.OVPN_GET_STATS: ifc.stats, Command.OVPN_GET_PEER_STATS: ifc.peer_stats}
    with pytest.raises(ReplyError) as info:
        call[command]()
    assert text in str(info.value)
    assert str(info.value).startswith(f"{command.name} on ovpn0: bad reply: ")


def test_duplicate_peer_in_stats(ifc, tr):
    elem = {"peerid": 1, "packets": {"in": 1, "out": 1}, "bytes": {"in": 1, "out": 1}}
    tr.script(Command.OVPN_GET_PEER_STATS, nv.pack({"peers": [elem, elem]}))
    with pytest.raises(ReplyError, match="listed twice"):
        ifc.peer_stats()


def test_unpacked_reply_must_have_no_flags(ifc, tr):
    tr.script(Command.OVPN_POLL_PKT, nv.pack(nv.NVList({"pending": 1}, flags=nv.NV_FLAG_IGNORE_CASE)))
    with pytest.raises(ReplyError):
        ifc.poll()


# -- lifecycle ---------------------------------------------------------------------------

def test_create_rename_ifmode_and_destroy_on_exit(tr):
    with Interface.create(rename_to="tun0", ifmode="subnet", transport=tr) as ifc:
        assert ifc.name == "tun0"
        assert last_request(tr)[:2] == ("tun0", Command.OVPN_SET_IFMODE)
        assert tr.interfaces == ["tun0"]
    assert tr.interfaces == []
    assert not tr.closed  # a caller's transport is the caller's to close


def test_failed_rename_destroys_the_new_interface(tr):
    tr.interfaces.append("tun0")
    with pytest.raises(IfOvpnExists, match="SIOCSIFNAME"):
        Interface.create(rename_to="tun0", transport=tr)
    assert tr.interfaces == ["tun0"]


def test_bad_ifmode_refused_before_creating(tr):
    with pytest.raises(ValidationError):
        Interface.create(ifmode=0x1, transport=tr)
    assert tr.calls == []


def test_open_does_not_destroy(tr):
    tr.interfaces.append("tun3")
    tr.script(Command.OVPN_POLL_PKT, vector("kreply_poll_pkt"))
    with Interface.open("tun3", transport=tr) as ifc:
        assert ifc.name == "tun3"
    assert tr.interfaces == ["tun3"]


def test_open_missing_interface(tr):
    tr.fail(Command.OVPN_POLL_PKT, errno.ENXIO)
    with pytest.raises(IfOvpnError, match="no interface tun9"):
        Interface.open("tun9", transport=tr)


def test_open_something_else(tr):
    tr.fail(Command.OVPN_POLL_PKT, errno.EINVAL)
    with pytest.raises(IfOvpnError, match="em0 is not an if_ovpn interface"):
        Interface.open("em0", transport=tr)


def test_create_existing_name(tr):
    tr.interfaces.append("ovpn5")
    with pytest.raises(IfOvpnExists, match="SIOCIFCREATE2 on ovpn5: interface ovpn5 already exists"):
        Interface.create("ovpn5", transport=tr)


def test_detach_keeps_the_interface(tr):
    with Interface.create(transport=tr) as ifc:
        ifc.detach()
    assert tr.interfaces == ["ovpn0"]


def test_destroyed_interface_refuses_commands(ifc, tr):
    ifc.destroy()
    with pytest.raises(ValidationError, match="destroyed"):
        ifc.start_vpn()
    ifc.close()  # nothing left to destroy
    assert [c.method for c in tr.calls].count("destroy_interface") == 1


@pytest.mark.skipif(sys.platform.startswith("freebsd"), reason="non-FreeBSD behaviour")
def test_default_transport_off_freebsd():
    with pytest.raises(UnsupportedPlatform, match="if_ovpn needs FreeBSD 14 or later"):
        Interface.create()


def test_endpoint_str_and_parse():
    assert str(Endpoint.parse(("192.0.2.1", 1194))) == "192.0.2.1:1194"
    assert str(Endpoint.parse(("fe80::1%2", 1194))) == "[fe80::1%2]:1194"
    with pytest.raises(ValidationError, match="scope given twice"):
        Endpoint.parse(("fe80::1%2", 1194, 0, 3))


# -- property: whatever valid peer we describe is what the kernel would read ----------------


_addrs = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6).filter(lambda a: not a.is_link_local))


@settings(max_examples=150, deadline=None)
@given(peer_id=st.integers(0, 0xFFFFFF), addr=_addrs, port=st.integers(1, 65535),
       fd=st.integers(0, 2**31 - 1), v4=st.none() | st.ip_addresses(v=4))
def test_new_peer_round_trips(peer_id, addr, port, fd, v4):
    tr = RecordingTransport(["ovpn0"])
    ifc = Interface("ovpn0", tr)
    ifc.new_peer(peer_id, fd, (str(addr), port), vpn_ipv4=v4)
    nvl = nv.unpack(tr.requests[-1][2])
    expected_keys = ["remote"] + (["vpn_ipv4"] if v4 is not None else []) + ["fd", "peerid"]
    assert list(nvl) == expected_keys
    remote = Endpoint.from_nvlist(nvl.get_nvlist("remote"))
    assert (remote.address, remote.port) == (addr, port)
    assert nvl.get_number("peerid") == peer_id and nvl.get_number("fd") == fd
    if v4 is not None:
        assert nvl.get_binary("vpn_ipv4", size=4) == v4.packed


# -- the real kernel (FreeBSD 14+, root, if_ovpn loadable); skipped elsewhere ----------------

def _kernel_missing() -> str | None:
    if not sys.platform.startswith("freebsd"):
        return "needs FreeBSD's if_ovpn"
    if os.geteuid() != 0:
        return "needs root (PRIV_NET_OVPN)"
    return None


@pytest.mark.skipif(_kernel_missing() is not None, reason=_kernel_missing() or "")
def test_real_kernel_round_trip():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            Interface.create(ifmode="p2p") as ifc:
        udp.bind(("127.0.0.1", 0))
        ifc.new_peer(7, udp, ("127.0.0.1", 1194))
        with pytest.raises(IfOvpnExists, match="peer id 7 already exists"):
            ifc.new_peer(7, udp, ("127.0.0.1", 1194))
        ifc.set_peer(7, 10, 60)
        ifc.new_key(7, 0, 0, "AES-256-GCM", ENC, DEC)
        with pytest.raises(IfOvpnError, match="no key in the secondary slot"):
            ifc.swap_keys(7)
        ifc.start_vpn()
        assert set(ifc.peer_stats()) == {7}
        assert ifc.stats().data.in_ == 0
        ifc.del_peer(7)
        assert ifc.poll() == 1
        events = ifc.notifications()
        assert len(events) == 1 and events[0].peer_id == 7
        assert events[0].reason in (DelReason.REQUESTED, None)
        assert ifc.name in ifc.transport.list_interfaces()


def test_pipelined_without_request_many_runs_each_request_in_order() -> None:
    """The kernel transport has no request_many: held requests are plain ioctls,
    all of them sent, the first failure raised afterwards under its own name."""
    tr = RecordingTransport(["ovpn0"])
    assert not hasattr(tr, "request_many")
    tr.fail(Command.OVPN_SET_PEER, errno.ENOENT)
    ifc = Interface("ovpn0", tr)
    with pytest.raises(IfOvpnError) as info:
        with ifc.pipelined():
            ifc.set_peer(4, 10, 60)
            ifc.start_vpn()
            assert tr.requests == []              # nothing left before the block ended
    assert info.value.errno == errno.ENOENT and "OVPN_SET_PEER" in str(info.value)
    assert [r[1] for r in tr.requests] == [Command.OVPN_SET_PEER, Command.OVPN_START_VPN]
