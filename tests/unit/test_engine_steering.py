"""The reuseport steering program: its logic, and the real kernel running it on loopback."""
from __future__ import annotations

import errno
import socket
import time

import pytest
from hypothesis import given, settings, strategies as st

from bsd_ovpn.engine import steering
from bsd_ovpn.engine.steering import (
    BPF_MAXINSNS, CONTROL_INDEX, ENGINE_INDEX, MAX_TREE_PEERS, make_udp_socket,
    open_engine_socket, run_program, steering_program,
)


def expected(payload: bytes, peers: set[int] | None) -> int:
    """The kernel filter's three conditions (spec if_ovpn.md §5)."""
    if len(payload) < 8 or payload[0] >> 3 != 9:
        return CONTROL_INDEX
    if peers is None:
        return ENGINE_INDEX
    pid = int.from_bytes(payload[1:4], "big")
    return ENGINE_INDEX if pid in peers else CONTROL_INDEX


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


def test_large_trees_fit_and_fall_back_to_opcode_only():
    prog = steering_program(range(0, 3 * MAX_TREE_PEERS, 3))
    assert len(prog) <= BPF_MAXINSNS
    for pid in (0, 3, 2997, 2998, 1):
        assert run_program(prog, data(9, pid)) == (ENGINE_INDEX if pid % 3 == 0 else CONTROL_INDEX)
    over = steering_program(range(MAX_TREE_PEERS + 1))
    assert run_program(over, data(9, 0xABCDEF)) == ENGINE_INDEX      # opcode only
    assert run_program(over, data(7, 1)) == CONTROL_INDEX
    with pytest.raises(ValueError):
        steering_program([1 << 24])


@pytest.mark.parametrize("family,addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_kernel_steers_exactly(family, addr):
    ctl = make_udp_socket((addr, 0))
    try:
        steering.attach_program(ctl, steering_program([]))   # before the engine joins
        eng = open_engine_socket(ctl)
    except OSError as exc:
        ctl.close()
        pytest.skip(f"no {family!r} loopback here: {exc}")
    tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        steering.attach_program(eng, steering_program([7, 9, 1000]))
        cases = [(data(9, 7), 1), (data(9, 8), 0), (data(9, 9), 1), (data(9, 1000), 1),
                 (data(7, 7), 0), (data(6, 9), 0), (data(9, 7, 7), 0), (b"", 0), (b"H", 0)]
        want: dict[int, list[bytes]] = {0: [], 1: []}
        got: dict[int, list[bytes]] = {0: [], 1: []}
        ctl.setblocking(False)
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
