"""Property tests for bsd_ovpn.nv: round trips of random trees, and hostile input.

What must hold for any input: pack -> unpack -> pack is the identity in both
byte orders; unpack of damaged bytes raises NVError and nothing else, quickly,
without a large allocation; whatever unpack accepts packs again, and that
normal form is stable.
"""
from __future__ import annotations

import struct
import time
import tracemalloc
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bsd_ovpn.nv import (
    NV_FLAG_IGNORE_CASE, NV_FLAG_NO_UNIQUE, Descriptor, NVError, NVList, pack, unpack,
)

NFDS = 8                 # descriptor indexes are drawn below this
UNPACK_NFDS = 1000       # fds "received": more than any tree holds
FLAGS = [0, NV_FLAG_IGNORE_CASE, NV_FLAG_NO_UNIQUE, NV_FLAG_IGNORE_CASE | NV_FLAG_NO_UNIQUE]

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=6)
# Byte strings as unpack returns them: any bytes but NUL, via surrogateescape.
_raw_text = st.binary(max_size=5).filter(lambda b: b"\0" not in b).map(
    lambda b: b.decode("utf-8", "surrogateescape"))
names = st.one_of(st.sampled_from(["a", "A", "peerid", "key", ""]), _text, _raw_text)
strings = st.one_of(_text, _raw_text)
numbers = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
descriptors = st.builds(Descriptor, st.integers(0, NFDS - 1))

leaves = st.one_of(
    st.none(), st.booleans(), numbers, strings, st.binary(min_size=1, max_size=12), descriptors,
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.lists(numbers, min_size=1, max_size=4),
    st.lists(strings, min_size=1, max_size=4),
    st.lists(descriptors, min_size=1, max_size=3),
)


def _make(flags: int, pairs: list[tuple[str, Any]]) -> NVList:
    nvl = NVList(flags=flags)
    for name, value in pairs:
        if name in nvl and not flags & NV_FLAG_NO_UNIQUE:
            continue
        nvl.add(name, value)
    return nvl


def _nvlists(values: st.SearchStrategy[Any]) -> st.SearchStrategy[NVList]:
    return st.builds(_make, st.sampled_from(FLAGS),
                     st.lists(st.tuples(names, values), max_size=5))


values = st.recursive(
    leaves,
    lambda inner: st.one_of(_nvlists(inner), st.lists(_nvlists(inner), min_size=1, max_size=3)),
    max_leaves=12,
)
trees = _nvlists(values)
orders = st.sampled_from(["little", "big"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, order=orders)
def test_random_trees_round_trip(tree: NVList, order: str) -> None:
    blob = pack(tree, byteorder=order)
    got = unpack(blob, flags=tree.flags, nfds=UNPACK_NFDS)
    assert got == tree
    assert got.byteorder == order
    assert pack(got, byteorder=order) == blob
    other = "big" if order == "little" else "little"
    assert unpack(pack(got, byteorder=other), flags=tree.flags, nfds=UNPACK_NFDS) == tree


def _assert_only_nverror(blob: bytes, flags: int) -> None:
    """unpack(blob) succeeds or raises NVError, quickly; success re-packs stably."""
    started = time.perf_counter()
    try:
        got = unpack(blob, flags=flags, nfds=UNPACK_NFDS)
    except NVError as err:
        assert err.offset is not None and 0 <= err.offset <= len(blob)
        got = None
    assert time.perf_counter() - started < 1.0
    if got is not None:
        again = pack(got, byteorder=got.byteorder)
        assert unpack(again, flags=flags, nfds=UNPACK_NFDS) == got


mutations = st.lists(
    st.tuples(st.sampled_from(["set", "flip", "insert", "delete", "big", "truncate"]),
              st.integers(0, 10_000), st.integers(0, 255)),
    min_size=1, max_size=6)


def _mutate(blob: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(blob)
    for op, where, byte in steps:
        if not data:
            break
        at = where % len(data)
        if op == "set":
            data[at] = byte
        elif op == "flip":
            data[at] ^= 1 << (byte % 8)
        elif op == "insert":
            data[at:at] = bytes([byte])
        elif op == "delete":
            del data[at]
        elif op == "big":    # a lying 64-bit size, wherever it lands
            data[at:at + 8] = struct.pack("<Q", 2**64 - 1 - byte)[:len(data) - at]
        else:
            del data[at:]
    return bytes(data)


def _resize(blob: bytes) -> bytes:
    """Patch the top nvlh_size so the damage is seen beyond the first check."""
    if len(blob) < 19:
        return blob
    order = ">" if blob[2] & 0x80 else "<"
    return blob[:11] + struct.pack(order + "Q", len(blob) - 19) + blob[19:]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, order=orders, steps=mutations, fix_size=st.booleans())
def test_mutated_blobs_raise_only_nverror(tree: NVList, order: str,
                                          steps: list[tuple[str, int, int]],
                                          fix_size: bool) -> None:
    blob = _mutate(pack(tree, byteorder=order), steps)
    if fix_size:
        blob = _resize(blob)
    _assert_only_nverror(blob, tree.flags)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200), flags=st.sampled_from(FLAGS), order=orders)
def test_random_bodies_raise_only_nverror(body: bytes, flags: int, order: str) -> None:
    big = 0x80 if order == "big" else 0
    header = bytes([0x6C, 0, flags | big]) + struct.pack(
        (">" if big else "<") + "QQ", 0, len(body))
    _assert_only_nverror(header + body, flags)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, order=orders, where=st.integers(0, 10_000),
       value=st.sampled_from([2**64 - 1, 2**63, 2**62 + 3, 2**32, 2**61 + 1]))
def test_a_lying_huge_size_never_allocates(tree: NVList, order: str, where: int,
                                           value: int) -> None:
    blob = bytearray(pack(tree, byteorder=order))
    at = where % len(blob)
    fmt = ">Q" if order == "big" else "<Q"
    blob[at:at + 8] = struct.pack(fmt, value)[:len(blob) - at]
    tracemalloc.start()
    try:
        try:
            unpack(bytes(blob), flags=tree.flags, nfds=UNPACK_NFDS)
        except NVError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 * len(blob) + 100_000


def test_lying_sizes_in_each_field_of_a_real_request() -> None:
    # The NEW_KEY request: patch each size field to a huge value in turn.
    request = NVList([("slot", 0), ("keyid", 0), ("peerid", 7),
                      ("encrypt", {"cipher": "AES-256-GCM", "key": bytes(32), "iv": bytes(8)})])
    blob = pack(request, byteorder="little")
    fields = [11, 3, 19 + 1, 19 + 3, 19 + 11]      # nvlh_size, nvlh_descriptors, namesize,
    for offset in fields:                            # datasize, nitems
        for value in (2**64 - 1, 2**63, len(blob)):
            damaged = bytearray(blob)
            width = 2 if offset == 20 else 8
            damaged[offset:offset + width] = value.to_bytes(8, "little")[:width]
            tracemalloc.start()
            try:
                try:
                    unpack(bytes(damaged))
                except NVError:
                    pass
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 100_000
