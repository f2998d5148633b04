"""The engine protocol's batch op: N SETs in one message, N errnos in one reply.

A batch must be indistinguishable from the same requests sent one by one
(op 1): same errnos, same order, every request run even after one failed.
A malformed batch runs nothing and is refused with a clear error; lengths,
counts and descriptor indexes in it are never trusted.
"""
from __future__ import annotations

import array
import errno
import socket
import struct

import pytest

from bsd_ovpn import nv
from bsd_ovpn.engine.daemon import (
    ENTRY, MAGIC, MAX_BATCH, MAX_BATCH_FDS, MAX_DATA, OP_BATCH, OP_SET, REP, REQ,
)
from bsd_ovpn.engine.steering import make_udp_socket
from bsd_ovpn.engine.transport import EngineTransport
from bsd_ovpn.errors import IfOvpnError
from bsd_ovpn.ifovpn import Command
from bsd_ovpn.interface import Interface, KeyMaterial


@pytest.fixture
def daemon(engine_daemon):
    return engine_daemon.daemon, engine_daemon.host, engine_daemon.path


def new_peer(peer_id: int, fd: int) -> bytes:
    return nv.pack({"peerid": peer_id, "fd": fd,
                    "remote": {"af": 2, "address": b"\xc0\0\2\1", "port": 43524}})


def set_peer(peer_id: int) -> bytes:
    return nv.pack({"peerid": peer_id, "interval": 10, "timeout": 60})


def key_dir() -> dict:
    return {"cipher": "AES-256-GCM", "key": bytes(32), "iv": bytes(8)}


def new_key(peer_id: int) -> bytes:
    return nv.pack({"peerid": peer_id, "slot": 0, "keyid": 0,
                    "encrypt": key_dir(), "decrypt": key_dir()})


def script(fd: int) -> list[tuple[int, bytes | None, bool]]:
    """A mix of successes and every kind of failure: (command, data, carries the fd)."""
    return [
        (Command.OVPN_NEW_PEER, new_peer(1, fd), True),
        (Command.OVPN_NEW_PEER, new_peer(1, fd), True),          # EEXIST
        (Command.OVPN_NEW_PEER, new_peer(2, fd), False),         # EBADF: no descriptor
        (Command.OVPN_SET_PEER, set_peer(1), False),
        (Command.OVPN_SET_PEER, set_peer(9), False),             # ENOENT
        (Command.OVPN_NEW_KEY, new_key(1), False),
        (Command.OVPN_SWAP_KEYS, nv.pack({"peerid": 1}), False),  # ENOLINK
        (Command.OVPN_SEND_PKT, None, False),                    # ENOTSUP
        (1 << 40, None, False),                                  # ENOTSUP, a u64 command
        (Command.OVPN_DEL_PEER, b"\x01garbage", False),          # EINVAL: not an nvlist
        (Command.OVPN_DEL_PEER, None, False),                    # EINVAL: no nvlist
        (Command.OVPN_DEL_PEER, b"\0" * 4097, False),            # E2BIG
        (Command.OVPN_START_VPN, None, False),
        (Command.OVPN_NEW_PEER, new_peer(3, fd), True),
        (Command.OVPN_DEL_PEER, nv.pack({"peerid": 1}), False),
        (Command.OVPN_DEL_PEER, nv.pack({"peerid": 1}), False),  # ENOENT: gone just before
    ]


def batch_msg(ifname: str, entries, *, count: int | None = None, name2: bytes = b"",
              bufsize: int = 0, tail: bytes = b"") -> bytes:
    """A raw op-7 message; entries are (command, data, fd index)."""
    body = b"".join(ENTRY.pack(int(c), len(d or b""), i) + (d or b"") for c, d, i in entries)
    return REQ.pack(MAGIC, OP_BATCH, ifname.encode(), name2,
                    len(entries) if count is None else count, bufsize) + body + tail


def fds_anc(fds: list[int]) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(path)
    conn.settimeout(5)
    return conn


def test_batch_errnos_equal_single_requests_in_order(daemon):
    """The same script as op-1 requests on one interface and as one batch on
    another: identical errnos, and the same end state (the DEL_PEER after the
    failures ran)."""
    d, host, path = daemon
    udp = make_udp_socket(("127.0.0.1", 0))
    conn = connect(path)
    try:
        with EngineTransport(path) as tr:
            single, batched = tr.create_interface("ovpn"), tr.create_interface("ovpn")
        steps = script(udp.fileno())
        one_by_one = []
        for cmd, data, with_fd in steps:
            conn.sendmsg([REQ.pack(MAGIC, OP_SET, single.encode(), b"", int(cmd), 0)
                          + (data or b"")], fds_anc([udp.fileno()] if with_fd else []))
            one_by_one.append(REP.unpack(conn.recv(4096))[1])
        assert one_by_one == [0, errno.EEXIST, errno.EBADF, 0, errno.ENOENT, 0, errno.ENOLINK,
                              errno.ENOTSUP, errno.ENOTSUP, errno.EINVAL, errno.EINVAL,
                              errno.E2BIG, 0, 0, 0, errno.ENOENT]
        conn.sendmsg([batch_msg(batched, [(c, dt, 0 if f else -1) for c, dt, f in steps])],
                     fds_anc([udp.fileno()]))
        reply = conn.recv(4096)
        assert reply[:REP.size] == REP.pack(MAGIC, 0)
        assert list(struct.unpack(f"!{len(steps)}I", reply[REP.size:])) == one_by_one
        ifs = d.engine.interfaces
        assert sorted(ifs[single].peers) == sorted(ifs[batched].peers) == [3]
        assert ifs[single].up and ifs[batched].up
        # an unknown interface: ENXIO for every entry, as for single requests
        conn.sendmsg([batch_msg("ovpn9", [(Command.OVPN_START_VPN, None, -1)] * 3)])
        assert conn.recv(4096) == REP.pack(MAGIC, 0) + struct.pack("!3I", *[errno.ENXIO] * 3)
    finally:
        conn.close()
        udp.close()


def test_request_many_sends_one_message_per_batch(daemon, monkeypatch):
    """A new client's four requests: one message, one reply.  Longer lists go in
    MAX_BATCH pieces, a request above MAX_REQUEST_SIZE alone, more than
    MAX_BATCH_FDS sockets in the next batch; replies stay in request order."""
    d, host, path = daemon
    messages: list[int] = []
    real = d._dispatch
    monkeypatch.setattr(d, "_dispatch", lambda msg, flags, fds: (
        messages.append(msg[4]), real(msg, flags, fds))[1])
    udp = make_udp_socket(("127.0.0.1", 0))
    socks = [make_udp_socket(("127.0.0.1", 0)) for _ in range(MAX_BATCH_FDS + 1)]
    try:
        with EngineTransport(path) as tr, Interface.create("ovpn", transport=tr) as ifc:
            km = KeyMaterial(bytes(32), bytes(8))
            messages.clear()
            with ifc.pipelined():
                ifc.new_peer(0, udp, ("192.0.2.1", 1194), vpn_ipv4="198.51.100.2")
                ifc.set_peer(0, 10, 60)
                ifc.new_key(0, 0, 0, "AES-256-GCM", encrypt=km, decrypt=km)
                ifc.start_vpn()
            assert messages == [OP_BATCH]
            assert sorted(ifc.peer_stats()) == [0]
            messages.clear()
            n = MAX_BATCH + 5
            # NEW_PEER 1+i for even i; SET_PEER on peer i (just created) or on a
            # missing peer for every other odd i
            reqs = [(Command.OVPN_NEW_PEER, new_peer(1 + i, udp.fileno()), udp.fileno())
                    if i % 2 == 0 else
                    (Command.OVPN_SET_PEER, set_peer(i if i % 4 == 1 else 5000 + i), None)
                    for i in range(n)]
            big = MAX_BATCH + 2
            reqs.insert(big, (Command.OVPN_DEL_PEER, b"\0" * 5000, None))
            assert sum(ENTRY.size + len(r[1]) for r in reqs[:MAX_BATCH]) <= MAX_DATA
            errs = tr.request_many(ifc.name, reqs)
            # MAX_BATCH requests, 2 more (cut before the big one), the big one alone, 3
            assert messages == [OP_BATCH, OP_BATCH, OP_SET, OP_BATCH]
            assert errs[big] is not None and errs[big].errno == errno.E2BIG
            del errs[big]
            assert [e.errno if e else 0 for e in errs] == [
                0 if i % 4 != 3 else errno.ENOENT for i in range(n)]
            assert all(e.command == "OVPN_SET_PEER" for e in errs if e)
            # the frame: 4000-byte requests (batched: not above MAX_REQUEST_SIZE; not
            # nvlists, so EINVAL each), as many per message as fit in MAX_DATA
            messages.clear()
            per = MAX_DATA // (ENTRY.size + 4000)
            errs = tr.request_many(ifc.name, [(Command.OVPN_DEL_PEER, b"\1" * 4000, None)]
                                   * (per + 3))
            assert messages == [OP_BATCH, OP_BATCH]
            assert [e.errno for e in errs] == [errno.EINVAL] * (per + 3)
            # one socket per request: a new batch after MAX_BATCH_FDS descriptors
            messages.clear()
            errs = tr.request_many(ifc.name, [
                (Command.OVPN_NEW_PEER, new_peer(1000 + i, s.fileno()), s.fileno())
                for i, s in enumerate(socks)])
            assert messages == [OP_BATCH, OP_BATCH]
            assert all(e is not None and e.errno == errno.EBUSY for e in errs)   # peers exist
    finally:
        udp.close()
        for s in socks:
            s.close()


def test_engine_without_batches_gets_single_requests(daemon, monkeypatch):
    """An engine that answers op 7 with EOPNOTSUPP (an older one) ran nothing: the
    transport sends the same requests singly, and keeps doing so."""
    d, host, path = daemon
    seen: list[int] = []
    real = d._dispatch

    def old_engine(msg, flags, fds):
        seen.append(msg[4])
        if msg[4] == OP_BATCH:
            return REP.pack(MAGIC, errno.EOPNOTSUPP)
        return real(msg, flags, fds)

    monkeypatch.setattr(d, "_dispatch", old_engine)
    with EngineTransport(path) as tr:
        name = tr.create_interface("ovpn")
        seen.clear()
        errs = tr.request_many(name, [(Command.OVPN_START_VPN, None, None),
                                      (Command.OVPN_DEL_PEER, None, None)])
        assert seen == [OP_BATCH, OP_SET, OP_SET]
        assert errs[0] is None and errs[1].errno == errno.EINVAL
        assert errs[1].command == "OVPN_DEL_PEER"
        seen.clear()
        tr.request_many(name, [(Command.OVPN_START_VPN, None, None)])
        assert seen == [OP_SET]
        tr.destroy_interface(name)


def _malformed(name: str, fd: int) -> list[tuple[str, bytes, list[int]]]:
    """(what the engine's log line says, message, descriptors sent)."""
    np = (Command.OVPN_NEW_PEER, new_peer(5, fd), 0)
    good = batch_msg(name, [np])
    return [
        ("0 requests", batch_msg(name, [np], count=0)[:REQ.size], []),
        (f"{MAX_BATCH + 1} requests",
         batch_msg(name, [np] + [(Command.OVPN_START_VPN, None, -1)] * MAX_BATCH), [fd]),
        ("entry 1 of 2 is cut short", batch_msg(name, [np], count=2), [fd]),
        ("bytes after the last entry", batch_msg(name, [np, np], count=1), [fd]),
        ("entry 1 of 2 is cut short",
         batch_msg(name, [np], count=2) + b"\0" * (ENTRY.size - 1), [fd]),
        ("1 bytes after the last entry", good + b"\0", [fd]),
        ("entry 0 says", good[:-1], [fd]),
        ("entry 0 says 4294967295 bytes", REQ.pack(MAGIC, OP_BATCH, name.encode(), b"", 1, 0)
         + ENTRY.pack(int(Command.OVPN_NEW_PEER), 0xFFFFFFFF, 0) + new_peer(5, fd), [fd]),
        ("names descriptor 0, 0 sent", good, []),
        ("names descriptor 1, 1 sent", batch_msg(name, [np[:2] + (1,)]), [fd]),
        ("names descriptor -2", batch_msg(name, [np[:2] + (-2,)]), [fd]),
        ("name2/bufsize set", batch_msg(name, [np], name2=b"x"), [fd]),
        ("name2/bufsize set", batch_msg(name, [np], bufsize=1), [fd]),
        (f"more than {MAX_BATCH_FDS} descriptors", good, [fd] * (MAX_BATCH_FDS + 1)),
    ]


@pytest.mark.parametrize("case", range(14))
def test_malformed_batch_runs_nothing(daemon, case, caplog):
    d, host, path = daemon
    udp = make_udp_socket(("127.0.0.1", 0))
    conn = connect(path)
    try:
        with EngineTransport(path) as tr:
            name = tr.create_interface("ovpn")
        cases = _malformed(name, udp.fileno())
        assert len(cases) == 14
        why, msg, fds = cases[case]
        with caplog.at_level("WARNING", logger="bsd_ovpn.engine"):
            conn.sendmsg([msg], fds_anc(fds))
            assert conn.recv(4096) == REP.pack(MAGIC, errno.EINVAL)
        assert f"refused a malformed batch for {name!r}: " in caplog.text
        assert why in caplog.text
        assert d.engine.interfaces[name].peers == {}
        # the connection is still good, and the well-formed batch runs
        conn.sendmsg([batch_msg(name, [(Command.OVPN_NEW_PEER, new_peer(5, 0), 0)])],
                     fds_anc([udp.fileno()]))
        assert conn.recv(4096) == REP.pack(MAGIC, 0) + struct.pack("!I", 0)
        assert list(d.engine.interfaces[name].peers) == [5]
    finally:
        conn.close()
        udp.close()


def test_batch_larger_than_the_frame_is_e2big(daemon):
    d, host, path = daemon
    conn = connect(path)
    try:
        with EngineTransport(path) as tr:
            name = tr.create_interface("ovpn")
        n = MAX_DATA // (ENTRY.size + 4000) + 1
        conn.sendmsg([batch_msg(name, [(Command.OVPN_START_VPN, b"\0" * 4000, -1)] * n)])
        assert conn.recv(4096) == REP.pack(MAGIC, errno.E2BIG)
        assert not d.engine.interfaces[name].up
    finally:
        conn.close()


def test_refused_batch_is_a_clear_error_for_the_caller(daemon, monkeypatch):
    d, host, path = daemon
    monkeypatch.setattr(d, "_dispatch", lambda msg, flags, fds: REP.pack(MAGIC, errno.EINVAL))
    with EngineTransport(path) as tr:
        with pytest.raises(IfOvpnError, match="refused a batch of 2 requests") as exc:
            tr.request_many("ovpn0", [(Command.OVPN_START_VPN, None, None)] * 2)
        assert exc.value.errno == errno.EINVAL


def test_crash_in_one_batched_request_is_its_eio(daemon, monkeypatch):
    """As for single requests: the daemon survives, that request gets EIO, the rest run."""
    d, host, path = daemon
    with EngineTransport(path) as tr:
        name = tr.create_interface("ovpn")
        real = d.engine._run_set

        def boom(ifs, cmd, nvl, fd):
            if cmd == Command.OVPN_SET_PEER:
                raise RuntimeError("boom")
            return real(ifs, cmd, nvl, fd)

        monkeypatch.setattr(d.engine, "_run_set", boom)
        errs = tr.request_many(name, [(Command.OVPN_SET_PEER, set_peer(1), None),
                                      (Command.OVPN_START_VPN, None, None)])
        assert errs[0].errno == errno.EIO and errs[1] is None
        assert d.engine.interfaces[name].up


@pytest.mark.parametrize("msg", [b"O", b"OVE1", b"OVE1\x07", REQ.pack(MAGIC, OP_BATCH, b"", b"", 1, 0)[:-1]])
def test_short_messages_are_einval_and_the_daemon_goes_on(daemon, msg):
    d, host, path = daemon
    conn = connect(path)
    try:
        conn.send(msg)
        assert conn.recv(4096) == REP.pack(MAGIC, errno.EINVAL)
        with EngineTransport(path) as tr:
            assert tr.request_many(tr.create_interface("ovpn"),
                                   [(Command.OVPN_START_VPN, None, None)]) == [None]
    finally:
        conn.close()
