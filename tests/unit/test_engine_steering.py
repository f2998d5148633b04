"""The reuseport steering program: its logic, and the real kernel running it on loopback.

The program is a compare tree over runs of consecutive peer ids
(:class:`~bsd_ovpn.engine.steering.PeerIdSet`); the checks below pin the
kernel filter's three conditions on dense, gappy and edge-of-range id sets,
and on sets edited by adds and deletes (which split and merge runs).  The
engine attaches the same tree over whole 64-id blocks (``block_program``):
its rule is "P_DATA_V2 of 8+ bytes whose id shares a block with a peer",
checked as exactly, and the block set (``layout``) moves only when a block
gains its first id or loses its last one.
"""
from __future__ import annotations

import errno
import socket
import struct
import time

import pytest
from hypothesis import given, settings, strategies as st

from bsd_ovpn.engine import steering
from bsd_ovpn.engine.steering import (
    BPF_MAXINSNS, CONTROL_INDEX, ENGINE_INDEX, MAX_TREE_RUNS, STEER_BLOCK, PeerIdSet,
    block_program, make_udp_socket, open_engine_socket, run_program, steering_program,
)

TOP = 0xFFFFFF


def expected(payload: bytes, peers: set[int] | None) -> int:
    """The kernel filter's three conditions (spec if_ovpn.md §5)."""
    if len(payload) < 8 or payload[0] >> 3 != 9:
        return CONTROL_INDEX
    if peers is None:
        return ENGINE_INDEX
    pid = int.from_bytes(payload[1:4], "big")
    return ENGINE_INDEX if pid in peers else CONTROL_INDEX


def widened(peers) -> set[int]:
    """Every id sharing a 64-id aligned block with a peer: what block_program steers."""
    return {b * STEER_BLOCK + k for b in {p // STEER_BLOCK for p in peers}
            for k in range(STEER_BLOCK)}


def data(op: int, peer_id: int, n: int = 24) -> bytes:
    return bytes([op << 3]) + peer_id.to_bytes(3, "big") + b"\0" * (n - 4)


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 0xFFFFFF), max_size=40),
       st.lists(st.tuples(st.integers(0, 31), st.integers(0, 0xFFFFFF), st.integers(0, 40)),
                max_size=30))
def test_program_matches_the_kernel_rule(peers, packets):
    prog = steering_program(peers)
    for op, pid, n in packets:
        for p in (pid, *list(peers)[:3]):
            payload = data(op, p, n) if n >= 4 else bytes([op << 3])[:n]
            assert run_program(prog, payload) == expected(payload, peers)


def probes(peers) -> list[int]:
    """Every id next to a run edge, plus the ends of the 24-bit range."""
    out = {0, 1, TOP - 1, TOP}
    for p in peers:
        out.update((p - 1, p, p + 1))
    return sorted(x for x in out if 0 <= x <= TOP)


def check(prog, peers, steered=None) -> None:
    """``prog`` follows the kernel rule for ``peers`` (or for ``steered``: the block rule)."""
    rule = set(peers) if steered is None else steered
    edges = set(probes(peers))
    if steered is not None:
        edges.update(probes([b for p in peers for b in (p - p % STEER_BLOCK,
                                                        p - p % STEER_BLOCK + STEER_BLOCK - 1)]))
    for pid in sorted(x for x in edges if 0 <= x <= TOP):
        for op in (9, 8, 1):
            payload = data(op, pid)
            assert run_program(prog, payload) == expected(payload, rule), (op, pid)
        assert run_program(prog, data(9, pid, 7)) == CONTROL_INDEX      # < 8 bytes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(),
                          st.one_of(st.integers(0, 40), st.integers(TOP - 40, TOP),
                                    st.integers(0, TOP))),
                max_size=80))
def test_incremental_set_and_program_follow_adds_and_deletes(ops):
    """Runs are merged/split on every add/delete; the program matches after each step."""
    ids = PeerIdSet()
    model: set[int] = set()
    seen = (ids.layout, ids.block_runs())
    for add, pid in ops:
        if add:
            assert ids.add(pid) == (pid not in model)
            model.add(pid)
        else:
            assert ids.discard(pid) == (pid in model)
            model.discard(pid)
        assert list(ids) == sorted(model) and len(ids) == len(model)
        runs = ids.runs()
        assert all(lo <= hi for lo, hi in runs)
        assert all(a[1] + 1 < b[0] for a, b in zip(runs, runs[1:]))    # disjoint, not adjacent
        check(steering_program(ids), model)
        blocks = ids.block_runs()
        assert {i for lo, hi in blocks for i in range(lo, hi + 1)} == widened(model)
        assert all(a[1] + 1 < b[0] for a, b in zip(blocks, blocks[1:]))
        check(block_program(ids), model, widened(model))
        # layout moves exactly when the blocks change (what the host re-attaches on)
        assert (ids.layout != seen[0]) == (blocks != seen[1])
        seen = (ids.layout, blocks)


def test_dense_ids_are_one_run_and_a_small_program():
    """1000 peers allocated from 0 (what servers do): one run, a dozen instructions."""
    ids = PeerIdSet(range(1000))
    assert ids.runs() == [(0, 999)]
    prog = steering_program(ids)
    assert len(prog) <= 13
    check(prog, range(1000))


@pytest.mark.parametrize("peers", [
    [0], [TOP], [0, TOP], [TOP - 1, TOP], [0, 1], range(0, 10), range(TOP - 9, TOP + 1),
    [*range(0, 5), *range(7, 12), TOP], [*range(3, 9), *range(20, 30), 50, *range(52, 60)],
])
def test_interval_edges(peers):
    check(steering_program(PeerIdSet(peers)), list(peers))
    check(steering_program(list(peers)), list(peers))       # plain iterables work too


def test_delete_splits_and_add_merges_a_run():
    ids = PeerIdSet(range(100))
    ids.discard(50)
    assert ids.runs() == [(0, 49), (51, 99)]
    check(steering_program(ids), [*range(50), *range(51, 100)])
    ids.discard(0)
    ids.discard(99)
    assert ids.runs() == [(1, 49), (51, 98)]
    ids.add(50)
    assert ids.runs() == [(1, 98)]
    ids.add(0)
    ids.add(99)
    assert ids.runs() == [(0, 99)] and len(ids) == 100
    assert not ids.add(5) and not ids.discard(500)
    assert 5 in ids and 100 not in ids and "5" not in ids


def test_many_runs_fit_and_fall_back_to_opcode_only():
    most = range(0, 3 * MAX_TREE_RUNS, 3)          # every id its own run
    prog = steering_program(most)
    assert len(prog) <= BPF_MAXINSNS
    for pid in (0, 3, 3 * MAX_TREE_RUNS - 3, 3 * MAX_TREE_RUNS, 1, 2):
        want = ENGINE_INDEX if pid % 3 == 0 and pid < 3 * MAX_TREE_RUNS else CONTROL_INDEX
        assert run_program(prog, data(9, pid)) == want
    wide = PeerIdSet()                              # the worst case: runs of 2, inside the range
    for r in range(MAX_TREE_RUNS):
        wide.add(3 * r + 1)
        wide.add(3 * r + 2)
    prog = steering_program(wide)
    assert len(prog) <= BPF_MAXINSNS
    check(prog, list(wide))
    over = steering_program(range(0, 2 * MAX_TREE_RUNS + 2, 2))
    assert run_program(over, data(9, 0xABCDEF)) == ENGINE_INDEX      # opcode only
    assert run_program(over, data(7, 1)) == CONTROL_INDEX
    assert steering_program(None) == over
    assert run_program(steering_program([]), data(9, 0)) == CONTROL_INDEX
    with pytest.raises(ValueError):
        steering_program([1 << 24])
    with pytest.raises(ValueError):
        PeerIdSet().add(-1)


def test_packed_program_is_the_kernels_struct():
    prog = steering_program(PeerIdSet([5, *range(7, 20)]))
    raw = steering.pack_program(prog)
    assert len(raw) == 8 * len(prog)
    assert [struct.unpack_from("=HBBI", raw, 8 * i) for i in range(len(prog))] == prog


def test_dense_ids_change_the_block_layout_once_per_block():
    """A server's connect burst (ids 0, 1, 2, ...): the engine re-attaches once per
    64 peers, and deleting them all again changes the layout as rarely."""
    ids = PeerIdSet()
    layouts = set()
    for pid in range(1000):
        ids.add(pid)
        layouts.add(ids.layout)
    assert len(layouts) == -(-1000 // STEER_BLOCK) == 16
    assert ids.block_runs() == [(0, 16 * STEER_BLOCK - 1)]
    prog = block_program(ids)
    assert len(prog) <= 13
    check(prog, range(1000), widened(range(1000)))
    before = ids.layout
    for pid in range(1, 1000):          # one peer left in block 0: still steered
        ids.discard(pid)
    assert ids.block_runs() == [(0, STEER_BLOCK - 1)] and ids.layout == before + 15
    ids.discard(0)
    assert ids.block_runs() == [] and block_program(ids) == steering_program([])
    assert block_program(None) == steering_program(None)
    assert list(ids) == [] and len(ids) == 0


def test_scattered_blocks_overflow_to_opcode_only():
    ids = PeerIdSet(range(0, 2 * STEER_BLOCK * (MAX_TREE_RUNS + 1), 2 * STEER_BLOCK))
    assert len(ids.block_runs()) == MAX_TREE_RUNS + 1
    assert block_program(ids) == steering_program(None)
    ids.discard(0)
    prog = block_program(ids)
    assert len(prog) <= BPF_MAXINSNS
    assert run_program(prog, data(9, 0)) == CONTROL_INDEX
    assert run_program(prog, data(9, 2 * STEER_BLOCK + 5)) == ENGINE_INDEX


KERNEL_IDS = [7, 9, 1000, *range(0, 5), *range(20, 40), 0xFFFFFF]
#: (payload, exact rule's socket, block rule's socket); ids 8, 5, 19, 30, 40 share a
#: block with a peer, 0xFFFFFE too; 1023/1024 are the edges of 1000's block
KERNEL_CASES = [
    (data(9, 7), 1, 1), (data(9, 8), 0, 1), (data(9, 9), 1, 1), (data(9, 1000), 1, 1),
    (data(7, 7), 0, 0), (data(6, 9), 0, 0), (data(9, 7, 7), 0, 0), (b"", 0, 0), (b"H", 0, 0),
    (data(9, 0), 1, 1), (data(9, 4), 1, 1), (data(9, 5), 0, 1), (data(9, 19), 0, 1),
    (data(9, 20), 1, 1), (data(9, 29), 1, 1), (data(9, 30), 0, 1), (data(9, 31), 1, 1),
    (data(9, 39), 1, 1), (data(9, 40), 0, 1), (data(9, 63), 0, 1), (data(9, 64), 0, 0),
    (data(9, 959), 0, 0), (data(9, 960), 0, 1), (data(9, 1023), 0, 1), (data(9, 1024), 0, 0),
    (data(9, 0xFFFFBF), 0, 0), (data(9, 0xFFFFC0), 0, 1), (data(9, 0xFFFFFE), 0, 1),
    (data(9, 0xFFFFFF), 1, 1), (data(8, 0xFFFFFF), 0, 0), (data(8, 30), 0, 0),
]


def exchange(ctl, eng, tx, cases) -> None:
    """Send every (payload, socket index) case 40 times; each must land on that socket only."""
    want: dict[int, list[bytes]] = {0: [], 1: []}
    got: dict[int, list[bytes]] = {0: [], 1: []}
    ctl.setblocking(False)
    eng.setblocking(False)
    for rnd in range(41):             # small rounds: never overflow a receive buffer
        if rnd < 40:
            for payload, where in cases:
                tx.sendto(payload, ctl.getsockname()[:2])
                want[where].append(payload)
        time.sleep(0.01 if rnd < 40 else 0.2)
        for idx, s in ((0, ctl), (1, eng)):
            while True:
                try:
                    got[idx].append(s.recv(100))
                except BlockingIOError:
                    break
    assert sorted(got[0]) == sorted(want[0])
    assert sorted(got[1]) == sorted(want[1])


@pytest.mark.parametrize("rule", ["exact", "blocks"])
@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_kernel_steers_exactly(family, addr, rule):
    ctl = make_udp_socket((addr, 0))
    try:
        steering.attach_program(ctl, steering_program([]))   # before the engine joins
        eng = open_engine_socket(ctl)
    except OSError as exc:
        ctl.close()
        pytest.skip(f"no {family!r} loopback here: {exc}")
    tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        ids = PeerIdSet(KERNEL_IDS)
        ids.discard(30)                   # splits 20..39
        prog = steering_program(ids) if rule == "exact" else block_program(ids)
        steering.attach_program(eng, prog)
        col = 1 if rule == "exact" else 2
        for payload, *where in KERNEL_CASES:  # the table agrees with the rules themselves
            peers = set(ids) if rule == "exact" else widened(ids)
            assert expected(payload, peers) == where[col - 1], payload[:4]
        exchange(ctl, eng, tx, [(c[0], c[col]) for c in KERNEL_CASES])
    finally:
        tx.close()
        eng.close()
        ctl.close()


def test_control_socket_without_reuseport_is_eaddrinuse():
    ctl = make_udp_socket(("127.0.0.1", 0), reuseport=False)
    try:
        with pytest.raises(OSError) as exc:
            open_engine_socket(ctl)
        assert exc.value.errno == errno.EADDRINUSE
        assert "make_udp_socket" in str(exc.value)
    finally:
        ctl.close()
