"""Unit tests for bsd_ovpn.nv: error reporting, accessors, flags, and libnv's quirks.

Blobs are built by hand here (``wire``), byte by byte, so each rule of
spec/nvlist.md section 5 is exercised on its own.
"""
from __future__ import annotations

import enum
import struct
import sys
from dataclasses import dataclass

import pytest

from bsd_ovpn.errors import OvpnError
from bsd_ovpn.nv import (
    NV_FLAG_IGNORE_CASE, NV_FLAG_NO_UNIQUE, Descriptor, NVError, NVFieldError, NVList, NVType,
    nvtype_of, pack, unpack,
)


@dataclass
class Hdr:
    """An nvlist header for ``wire``; ``size`` None = computed as libnv does."""

    flags: int = 0
    ndesc: int = 0
    size: int | None = None
    magic: int = 0x6C
    version: int = 0
    order: str | None = None    # None: the order wire() was given


def pair(kind: int, name: bytes, data: bytes = b"", *, datasize: int | None = None,
         nitems: int = 0, namesize: int | None = None, order: str = "<") -> bytes:
    """One pair: header, name (NUL added), data."""
    raw = name + b"\0"
    head = struct.pack(order + "BHQQ", kind, len(raw) if namesize is None else namesize,
                       len(data) if datasize is None else datasize, nitems)
    return head + raw + data


def up() -> bytes:
    return pair(255, b"")


def nxt() -> bytes:
    return pair(254, b"")


def u64(v: int, order: str = "<") -> bytes:
    return struct.pack(order + "Q", v)


def wire(*parts: bytes | Hdr, order: str = "<") -> bytes:
    """Concatenate parts; each Hdr's nvlh_size counts to the end of the whole buffer."""
    total = sum(HDR_LEN if isinstance(p, Hdr) else len(p) for p in parts)
    out = b""
    for p in parts:
        if isinstance(p, Hdr):
            size = total - len(out) - HDR_LEN if p.size is None else p.size
            out += struct.pack((p.order or order) + "BBBQQ", p.magic, p.version, p.flags,
                               p.ndesc, size)
        else:
            out += p
    return out


HDR_LEN = 19
NUM_X7 = pair(3, b"x", u64(7))          # 29 bytes: the pair {x: 7}


# -- the basic layout ---------------------------------------------------------------

def test_worked_example_del_peer() -> None:
    blob = pack({"peerid": 7}, byteorder="little")
    assert blob.hex() == ("6c0000" + "00" * 8 + "2200000000000000"
                          + "03" + "0700" + "0800000000000000" + "00" * 8
                          + "70656572696400" + "0700000000000000")
    assert unpack(blob) == {"peerid": 7}


def test_empty_nvlist_is_a_bare_header() -> None:
    assert pack(NVList(), byteorder="little") == bytes([0x6C, 0, 0]) + bytes(16)
    assert pack({}, byteorder="big") == bytes([0x6C, 0, 0x80]) + bytes(16)
    assert len(unpack(bytes([0x6C, 0, 0]) + bytes(16))) == 0


def test_default_byte_order_is_the_hosts() -> None:
    blob = pack({"n": 1})
    assert blob == pack({"n": 1}, byteorder=sys.byteorder)
    assert unpack(blob).byteorder == sys.byteorder
    assert NVList().byteorder is None
    with pytest.raises(ValueError, match="byteorder"):
        pack({}, byteorder="native")


def test_nested_header_size_counts_to_the_end_of_the_buffer() -> None:
    blob = pack({"e": {"a": 1}, "x": 7}, byteorder="little")
    nested = 19 + 19 + 2                    # top header + pair header + "e\0"
    assert blob[nested] == 0x6C
    assert struct.unpack_from("<Q", blob, nested + 11)[0] == len(blob) - nested - 19
    # The NVLIST pair's datasize: nested header + its pair, not the UP marker.
    assert struct.unpack_from("<Q", blob, 19 + 3)[0] == 19 + 29


def test_big_endian_sets_the_flag_in_every_header() -> None:
    tree = {"a": {"b": {}}, "arr": [{"c": 1}, {}]}
    blob = pack(tree, byteorder="big")
    headers = [i for i in range(len(blob) - 2) if blob[i] == 0x6C and blob[i + 1] == 0
               and blob[i + 2] & 0x80]
    assert len(headers) == 5
    assert unpack(blob) == tree
    assert unpack(blob).byteorder == "big"


def test_descriptor_counts_cover_the_list_and_everything_after_it() -> None:
    # nvlist_send: each header's nvlh_descriptors counts its own list and every
    # pair after it in the stream (libnv walks on through the parents).
    tree = NVList([("a", {"y": 1}), ("fd", Descriptor(0)),
                   ("b", {"fds": [Descriptor(1), Descriptor(2)]}), ("c", {})])
    blob = pack(tree, byteorder="little")
    counts = []
    pos = 0
    for _ in range(4):
        pos = blob.index(b"l\0\0", pos)
        counts.append(struct.unpack_from("<Q", blob, pos + 3)[0])
        pos += 1
    assert counts == [3, 3, 2, 0]       # top, "a", "b", "c"
    assert unpack(blob, nfds=3) == tree
    with pytest.raises(NVError, match="nvlh_descriptors is 3 but only 2"):
        unpack(blob, nfds=2)


# -- every unpack rule, with the offset and reason it reports --------------------------

INVALID = [
    # (case id, blob, unpack flags, nfds, offset, reason fragment)
    ("short", b"l\0\0", 0, 0, 0, "3 bytes left, too short for a 19-byte nvlist header"),
    ("magic", wire(Hdr(magic=0x6D)), 0, 0, 0, "magic is 0x6d, not 0x6c"),
    ("flag bit", wire(Hdr(flags=0x04)), 0, 0, 0, "flags 0x04 have bits outside 0x83"),
    ("size short", wire(Hdr(size=1)), 0, 0, 0, "nvlh_size is 1 but 0 bytes follow"),
    ("trailing", wire(Hdr(size=0), b"\0"), 0, 0, 0, "nvlh_size is 0 but 1 bytes follow"),
    ("ndesc", wire(Hdr(ndesc=2)), 0, 1, 0, "nvlh_descriptors is 2 but only 1"),
    ("flags arg", wire(Hdr(flags=NV_FLAG_NO_UNIQUE)), 0, 0, 0,
     "top-level flags 0x2 differ from the expected flags 0x0"),
    ("flags arg 2", wire(Hdr()), NV_FLAG_IGNORE_CASE, 0, 0, "differ from the expected flags 0x1"),
    ("pair header", wire(Hdr(), NUM_X7[:18]), 0, 0, 19, "18 bytes left, too short for a pair"),
    ("type 0", wire(Hdr(), pair(0, b"x")), 0, 0, 19, "pair type 0 is not a valid type"),
    ("type 13", wire(Hdr(), pair(13, b"x")), 0, 0, 19, "pair type 13 is not a valid type"),
    ("type 253", wire(Hdr(), pair(253, b"x")), 0, 0, 19, "pair type 253"),
    ("namesize 0", wire(Hdr(), pair(1, b"", namesize=0)), 0, 0, 19,
     "namesize 0 is outside [1, 2048]"),
    ("namesize max", wire(Hdr(), pair(1, b"n" * 2048)), 0, 0, 19,
     "namesize 2049 is outside [1, 2048]"),
    ("namesize left", wire(Hdr(), pair(1, b"x", namesize=3)), 0, 0, 19,
     "namesize 3 exceeds the 2 bytes left"),
    ("name nul inside", wire(Hdr(), pair(1, b"a\0b")), 0, 0, 19, "not exactly NUL-terminated"),
    ("name unterminated", wire(Hdr(), pair(1, b"ab", namesize=2) + b"\0"), 0, 0, 19,
     "not exactly NUL-terminated"),
    ("datasize left", wire(Hdr(), pair(3, b"x", u64(7), datasize=9)), 0, 0, 19,
     "datasize 9 exceeds the 8 bytes left"),
    ("null data", wire(Hdr(), pair(1, b"n", b"\0")), 0, 0, 19, "null pair 'n': datasize is 1"),
    ("bool size", wire(Hdr(), pair(2, b"b", b"\1\0")), 0, 0, 19, "bool pair 'b': datasize is 2"),
    ("bool value", wire(Hdr(), pair(2, b"b", b"\2")), 0, 0, 19, "value byte is 2, not 0 or 1"),
    ("number size", wire(Hdr(), pair(3, b"x", b"\7\0\0\0")), 0, 0, 19,
     "number pair 'x': datasize is 4, not 8"),
    ("string empty", wire(Hdr(), pair(4, b"s")), 0, 0, 19, "string pair 's': value is not"),
    ("string nul", wire(Hdr(), pair(4, b"s", b"a\0b\0")), 0, 0, 19, "not exactly NUL"),
    ("binary empty", wire(Hdr(), pair(7, b"b")), 0, 0, 19, "binary pair 'b': datasize 0"),
    ("nvlist size 0", wire(Hdr(), pair(5, b"e", datasize=0), Hdr(), up()), 0, 0, 19,
     "nvlist pair 'e': datasize 0"),
    ("nested magic", wire(Hdr(), pair(5, b"e", datasize=19), Hdr(magic=0), up()), 0, 0, 40,
     "magic is 0x00"),
    ("nested size", wire(Hdr(), pair(5, b"e", datasize=19), Hdr(size=5), up()), 0, 0, 40,
     "nvlh_size is 5 but 20 bytes follow"),
    ("nested flag bit", wire(Hdr(), pair(5, b"e", datasize=19), Hdr(flags=0x40), up()), 0, 0,
     40, "bits outside 0x83"),
    ("nested ndesc", wire(Hdr(), pair(5, b"e", datasize=19), Hdr(ndesc=1), up()), 0, 0, 40,
     "nvlh_descriptors is 1 but only 0"),
    ("descriptor no fds", wire(Hdr(), pair(6, b"fd", u64(0))), 0, 0, 19,
     "descriptor index 0 is outside [0, nfds=0)"),
    ("descriptor negative", wire(Hdr(), pair(6, b"fd", u64(2**64 - 1))), 0, 4, 19,
     "descriptor index -1 is outside [0, nfds=4)"),
    ("descriptor size", wire(Hdr(), pair(6, b"fd", b"\0")), 0, 4, 19, "datasize is 1, not 8"),
    ("bool_array 0", wire(Hdr(), pair(8, b"a", nitems=0)), 0, 0, 19,
     "bool_array pair 'a': nitems 0 and datasize 0 do not match"),
    ("bool_array size", wire(Hdr(), pair(8, b"a", b"\0\1", nitems=3)), 0, 0, 19,
     "nitems 3 and datasize 2"),
    ("number_array", wire(Hdr(), pair(9, b"a", u64(1), nitems=2)), 0, 0, 19,
     "number_array pair 'a': nitems 2 and datasize 8"),
    ("number_array overflow", wire(Hdr(), pair(9, b"a", u64(1), nitems=2**61 + 1)), 0, 0, 19,
     "do not match"),
    ("string_array 0", wire(Hdr(), pair(10, b"a", b"x\0", nitems=0)), 0, 0, 19,
     "does not hold exactly 0"),
    ("string_array empty", wire(Hdr(), pair(10, b"a", b"", nitems=1)), 0, 0, 19,
     "datasize 0 does not hold exactly 1"),
    ("string_array count", wire(Hdr(), pair(10, b"a", b"x\0y\0", nitems=1)), 0, 0, 19,
     "exactly 1 NUL-terminated"),
    ("string_array tail", wire(Hdr(), pair(10, b"a", b"x\0y", nitems=2)), 0, 0, 19,
     "exactly 2 NUL-terminated"),
    ("nvlist_array 0", wire(Hdr(), pair(11, b"a", nitems=0)), 0, 0, 19,
     "nvlist_array pair 'a': nitems 0"),
    ("nvlist_array fit", wire(Hdr(), pair(11, b"a", nitems=3), Hdr(), nxt()), 0, 0, 19,
     "3 items cannot fit in the 39 bytes left"),
    ("array element missing", wire(Hdr(), pair(11, b"a", nitems=2), Hdr(), nxt()), 0, 0, 79,
     "0 bytes left, too short for a 19-byte nvlist header"),
    ("descriptor_array", wire(Hdr(), pair(12, b"a", u64(0) + u64(5), nitems=2)), 0, 5, 19,
     "descriptor_array pair 'a': descriptor index 5 is outside [0, nfds=5)"),
    ("descriptor_array size", wire(Hdr(), pair(12, b"a", u64(0), nitems=0)), 0, 5, 19,
     "nitems 0 and datasize 8"),
    ("up at top", wire(Hdr(), up()), 0, 0, 19, "NVLIST_UP marker at the top level"),
    ("up after nested", wire(Hdr(), pair(5, b"e", datasize=19), Hdr(), up(), up()), 0, 0, 79,
     "NVLIST_UP marker at the top level"),
    ("next at top", wire(Hdr(), nxt()), 0, 0, 19, "NVLIST_ARRAY_NEXT marker outside"),
    ("duplicate", wire(Hdr(), NUM_X7, NUM_X7), 0, 0, 48, "duplicate name 'x' (libnv: EEXIST)"),
    ("duplicate ignore case", wire(Hdr(flags=1), NUM_X7, pair(1, b"X")), 1, 0, 48,
     "duplicate name 'X'"),
    ("duplicate of another type", wire(Hdr(), NUM_X7, pair(1, b"x")), 0, 0, 48,
     "duplicate name 'x'"),
    ("duplicate nested", wire(Hdr(), pair(5, b"e", datasize=77), Hdr(), NUM_X7, NUM_X7, up()),
     0, 0, 88, "duplicate name 'x'"),
    ("duplicate in array element",
     wire(Hdr(), pair(11, b"a", nitems=1), Hdr(), NUM_X7, NUM_X7, nxt()), 0, 0, 88,
     "duplicate name 'x'"),
    ("array element header", wire(Hdr(), pair(11, b"a", nitems=1), Hdr(magic=1), nxt()), 0, 0,
     40, "magic is 0x01"),
    ("second element header",
     wire(Hdr(), pair(11, b"a", nitems=2), Hdr(), nxt(), Hdr(flags=8), nxt()), 0, 0, 79,
     "flags 0x08 have bits outside 0x83"),
]


@pytest.mark.parametrize("blob, flags, nfds, offset, reason",
                         [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_unpack_rejects_with_offset_and_reason(blob: bytes, flags: int, nfds: int, offset: int,
                                               reason: str) -> None:
    with pytest.raises(NVError) as info:
        unpack(blob, flags=flags, nfds=nfds)
    err = info.value
    assert err.offset == offset
    assert reason in err.reason
    assert str(err) == f"invalid packed nvlist at offset {offset}: {err.reason}"


def test_error_classes() -> None:
    assert issubclass(NVError, OvpnError) and issubclass(NVError, ValueError)
    assert issubclass(NVFieldError, NVError)
    err = NVError("bad thing", 12)
    assert (err.offset, err.reason) == (12, "bad thing")
    assert "offset 12" in str(err) and "bad thing" in str(err)
    assert NVError("pack problem").offset is None


def test_unpack_arguments() -> None:
    blob = pack({"x": 7})
    assert unpack(bytearray(blob)) == {"x": 7}
    assert unpack(memoryview(blob)) == {"x": 7}
    with pytest.raises(TypeError):
        unpack(blob.hex())  # type: ignore[arg-type]
    with pytest.raises(NVError, match="unpack flags"):
        unpack(blob, flags=4)
    with pytest.raises(ValueError, match="nfds"):
        unpack(blob, nfds=-1)


def test_lying_sizes_are_checked_before_use() -> None:
    huge = 2**64 - 1
    for blob in (wire(Hdr(), pair(9, b"a", u64(1), datasize=huge, nitems=huge // 8)),
                 wire(Hdr(), pair(11, b"a", nitems=huge)),
                 wire(Hdr(), pair(10, b"a", b"x\0", nitems=huge)),
                 wire(Hdr(), pair(7, b"a", b"x", datasize=huge)),
                 wire(Hdr(size=huge))):
        with pytest.raises(NVError):
            unpack(blob)


# -- libnv's odd but accepted streams (spec section 5, "tolerated") ----------------------

def test_next_inside_a_plain_nested_list_acts_like_up() -> None:
    blob = wire(Hdr(), pair(5, b"e", datasize=48), Hdr(), NUM_X7, nxt(), pair(3, b"y", u64(1)))
    assert unpack(blob) == {"e": {"x": 7}, "y": 1}


def test_up_inside_an_array_element_leaves_the_array() -> None:
    blob = wire(Hdr(), pair(11, b"a", nitems=3), Hdr(), NUM_X7, up(), pair(3, b"y", u64(1)))
    got = unpack(blob)
    assert got == {"a": [{"x": 7}, {}, {}], "y": 1}
    assert pack(got) != blob    # normalised: three elements, NEXT markers


def test_stream_may_end_inside_an_array() -> None:
    blob = wire(Hdr(), pair(11, b"a", nitems=2), Hdr(flags=NV_FLAG_NO_UNIQUE), NUM_X7, NUM_X7)
    got = unpack(blob)
    first, second = got.get_nvlist_array("a")
    assert first.flags == NV_FLAG_NO_UNIQUE and list(first.items()) == [("x", 7), ("x", 7)]
    assert second.flags == 0 and len(second) == 0


def test_marker_datasize_is_not_consumed() -> None:
    marker = pair(255, b"zz", datasize=29)  # <= the 29 bytes left, and not consumed
    blob = wire(Hdr(), pair(5, b"e", datasize=19), Hdr(), marker, NUM_X7)
    assert unpack(blob) == {"e": {}, "x": 7}


def test_byte_order_follows_the_top_and_array_element_headers() -> None:
    # libnv reads pairs in the order of the top header, switched by each
    # array-element header (and left as the last element set it), never by a
    # plain nested header.
    be = dict(order=">")
    blob = wire(Hdr(), pair(5, b"e", datasize=48), Hdr(flags=0x80, **be), NUM_X7, up(),
                pair(11, b"a", nitems=1), Hdr(flags=0x80, **be), pair(3, b"n", u64(1, ">"), **be),
                pair(254, b"", **be), pair(3, b"after", u64(2, ">"), **be))
    assert unpack(blob) == {"e": {"x": 7}, "a": [{"n": 1}], "after": 2}
    assert unpack(blob).byteorder == "little"


def test_bool_array_nonzero_bytes_read_as_true() -> None:
    assert unpack(wire(Hdr(), pair(8, b"b", b"\0\7", nitems=2))) == {"b": [False, True]}


def test_version_byte_is_ignored() -> None:
    assert unpack(wire(Hdr(version=9), NUM_X7)) == {"x": 7}


def test_deep_nesting_needs_no_recursion() -> None:
    depth = 5 * sys.getrecursionlimit()
    top = NVList()
    node = top
    for _ in range(depth):
        child = NVList()
        node["c"] = child
        node = child
    node["leaf"] = 1
    blob = pack(top)
    got = unpack(blob)
    assert pack(got) == blob
    node = got
    for _ in range(depth):
        node = node.get_nvlist("c")
    assert node.get_number("leaf") == 1


# -- pack: the Python type mapping -----------------------------------------------------

class Slot(enum.IntEnum):
    SECONDARY = 1


def test_python_types_map_to_libnv_types() -> None:
    values = {
        "null": (None, NVType.NULL), "bool": (True, NVType.BOOL), "number": (5, NVType.NUMBER),
        "enum": (Slot.SECONDARY, NVType.NUMBER), "string": ("s", NVType.STRING),
        "binary": (b"\1", NVType.BINARY), "bytearray": (bytearray(b"\1"), NVType.BINARY),
        "nvlist": ({"a": 1}, NVType.NVLIST), "descriptor": (Descriptor(0), NVType.DESCRIPTOR),
        "bools": ([True, False], NVType.BOOL_ARRAY), "numbers": ([1, 2], NVType.NUMBER_ARRAY),
        "strings": (["a", ""], NVType.STRING_ARRAY),
        "nvlists": ([{}, NVList()], NVType.NVLIST_ARRAY),
        "descriptors": ([Descriptor(1)], NVType.DESCRIPTOR_ARRAY),
    }
    for name, (value, kind) in values.items():
        assert nvtype_of(value) == kind, name
        blob = pack({name: value})
        assert blob[19] == kind, name
    got = unpack(pack({k: v for k, (v, _) in values.items()}), nfds=2)
    assert got.get_bool("bool") is True
    assert got.get_number("enum") == 1 and got.get_binary("bytearray") == b"\1"


@pytest.mark.parametrize("value, reason", [
    (-1, "number -1 is outside [0, 2**64-1]"),
    (2**64, "outside [0, 2**64-1]"),
    ("a\0b", "string contains a NUL byte"),
    ("\ud800", "cannot be encoded"),
    (b"", "binary values cannot be empty"),
    ([], "empty lists cannot be packed"),
    ([1, True], "mixed list"),
    ([1, "a"], "mixed list"),
    ([1.5], "lists of float cannot be packed"),
    (1.5, "values of type float cannot be packed"),
    ({1, 2}, "values of type set"),
    ([1, -1], "number -1 is outside"),
    (["a", "b\0"], "string contains a NUL byte"),
])
def test_pack_rejects(value: object, reason: str) -> None:
    with pytest.raises(NVError, match=reason.replace("*", r"\*").replace("[", r"\[")) as info:
        pack({"outer": {"v": value}})
    assert info.value.offset is None
    if "type" not in reason and "list" not in reason:
        assert "'outer'.'v'" in str(info.value)


def test_pack_rejects_bad_names() -> None:
    assert unpack(pack({"n" * 2047: 1})).get_number("n" * 2047) == 1
    with pytest.raises(NVError, match="2048 bytes is too long"):
        pack({"n" * 2048: 1})
    with pytest.raises(NVError, match="contains a NUL"):
        pack({"a\0": 1})
    with pytest.raises(NVError, match="names must be str"):
        pack({1: 1})
    with pytest.raises(NVError, match="names must be str"):
        NVList().add(b"x", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pack([("a", 1)])  # type: ignore[arg-type]


def test_pack_rejects_cycles() -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(NVError, match="contains itself"):
        pack(loop)
    shared = {"a": 1}
    assert unpack(pack({"x": shared, "y": shared, "z": [shared, shared]})) == {
        "x": {"a": 1}, "y": {"a": 1}, "z": [{"a": 1}, {"a": 1}]}


def test_descriptors_can_be_refused() -> None:
    for tree in ({"fd": Descriptor(0)}, {"a": [{"b": {"fds": [Descriptor(0)]}}]}):
        assert pack(tree)
        with pytest.raises(NVError, match="descriptors are not allowed"):
            pack(tree, allow_descriptors=False)
    assert pack({"fd": 5}, allow_descriptors=False)  # the if_ovpn way: a NUMBER


def test_descriptor_value_type() -> None:
    assert Descriptor(3) == Descriptor(3) and Descriptor(3) != 3
    assert Descriptor(-1).index == -1
    for bad in (-2, True, 2**63, "1"):
        with pytest.raises(NVError):
            Descriptor(bad)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        Descriptor(1).index = 2  # type: ignore[misc]
    blob = pack({"d": Descriptor(-1)})
    assert blob[-8:] == b"\xff" * 8
    with pytest.raises(NVError, match="descriptor index -1"):
        unpack(blob, nfds=1)


def test_child_nvlist_keeps_its_own_flags() -> None:
    child = NVList([("d", 1), ("d", 2)], flags=NV_FLAG_NO_UNIQUE)
    blob = pack({"c": child, "arr": [NVList(flags=NV_FLAG_IGNORE_CASE)]})
    got = unpack(blob)
    assert got.get_nvlist("c").flags == NV_FLAG_NO_UNIQUE
    assert list(got.get_nvlist("c").items()) == [("d", 1), ("d", 2)]
    assert got.get_nvlist_array("arr")[0].flags == NV_FLAG_IGNORE_CASE
    assert pack(got) == blob


def test_top_level_flags_must_be_passed_to_unpack() -> None:
    blob = pack(NVList([("a", 1)], flags=NV_FLAG_IGNORE_CASE | NV_FLAG_NO_UNIQUE))
    assert unpack(blob, flags=3).flags == 3
    with pytest.raises(NVError, match="EILSEQ"):
        unpack(blob)


# -- NVList as a mapping: order, NO_UNIQUE, IGNORE_CASE --------------------------------

def test_order_is_insertion_order() -> None:
    nvl = NVList([("b", 1), ("a", 2)])
    nvl["c"] = 3
    nvl["b"] = 4            # replaced in place
    assert list(nvl) == ["b", "a", "c"]
    assert list(nvl.items()) == [("b", 4), ("a", 2), ("c", 3)]
    assert list(nvl.values()) == [4, 2, 3]
    assert pack(nvl) == pack({"b": 4, "a": 2, "c": 3})
    assert pack(nvl) != pack({"a": 2, "b": 4, "c": 3})


def test_unique_names_by_default() -> None:
    nvl = NVList({"a": 1})
    with pytest.raises(NVError, match="duplicate name 'a'"):
        nvl.add("a", "other type")
    with pytest.raises(NVError, match="duplicate name"):
        NVList([("a", 1), ("a", 2)])


def test_no_unique_keeps_repeated_names() -> None:
    nvl = NVList(flags=NV_FLAG_NO_UNIQUE)
    nvl.add("dup", 1)
    nvl.add("dup", 2)
    nvl.add("dup", "three")
    nvl.add("other", True)
    assert list(nvl.items()) == [("dup", 1), ("dup", 2), ("dup", "three"), ("other", True)]
    assert len(nvl) == 4 and list(nvl) == ["dup", "dup", "dup", "other"]
    assert nvl["dup"] == 1
    assert nvl.get_all("dup") == [1, 2, "three"]
    # Typed lookups find the first pair of that name AND type, as libnv does.
    assert nvl.get_number("dup") == 1 and nvl.get_string("dup") == "three"
    assert not nvl.has_bool("dup") and nvl.has_bool("other")
    got = unpack(pack(nvl), flags=NV_FLAG_NO_UNIQUE)
    assert got == nvl and list(got.items()) == list(nvl.items())
    nvl["dup"] = 9          # sets the first
    assert nvl.get_all("dup") == [9, 2, "three"]
    del nvl["dup"]          # removes them all
    assert list(nvl.items()) == [("other", True)]
    assert nvl == {"other": 1}       # a dict compare uses Python equality (True == 1) ...
    assert NVList([("a", 1), ("a", 1)], flags=NV_FLAG_NO_UNIQUE) != {"a": 1}  # ... of unique names


def test_ignore_case_uses_ascii_case_folding() -> None:
    nvl = NVList([("Key", 1)], flags=NV_FLAG_IGNORE_CASE)
    assert nvl["KEY"] == 1 and "key" in nvl and nvl.get_number("kEy") == 1
    with pytest.raises(NVError, match="duplicate name 'key'"):
        nvl.add("key", 2)
    nvl["KEY"] = 5
    assert list(nvl.items()) == [("Key", 5)]
    # strcasecmp folds ASCII only, so these are different names.
    nvl.add("\u00c9", 1)
    nvl.add("\u00e9", 2)
    assert nvl["\u00e9"] == 2
    del nvl["kEY"]
    assert list(nvl) == ["\u00c9", "\u00e9"]
    case_sensitive = NVList([("Key", 1), ("key", 2)])
    assert case_sensitive["key"] == 2 and "KEY" not in case_sensitive


def test_ignore_case_and_no_unique_together() -> None:
    nvl = NVList([("A", 1), ("a", 2)], flags=NV_FLAG_IGNORE_CASE | NV_FLAG_NO_UNIQUE)
    assert nvl["a"] == 1 and nvl.get_all("A") == [1, 2]
    assert unpack(pack(nvl), flags=3) == nvl


def test_mapping_helpers() -> None:
    nvl = NVList({"a": 1, "b": {"c": 2}})
    assert isinstance(nvl["b"], NVList)            # plain mappings are stored as NVLists
    assert nvl.get("zz") is None and nvl.get("a") == 1
    assert nvl.pop("a") == 1 and "a" not in nvl
    nvl.update({"x": [{"y": 1}]})
    assert isinstance(nvl.get_nvlist_array("x")[0], NVList)
    nvl.clear()
    assert len(nvl) == 0 and pack(nvl) == pack({})
    with pytest.raises(KeyError):
        nvl["missing"]
    with pytest.raises(KeyError):
        del nvl["missing"]
    with pytest.raises(NVError, match="values of type float"):
        nvl["f"] = 1.0
    with pytest.raises(NVError, match="flags"):
        NVList(flags=4)
    with pytest.raises(NVError, match=r"\(name, value\) pairs"):
        NVList([("a", 1, 2)])  # type: ignore[list-item]
    assert "NVList([('a', 1)], flags=2)" == repr(NVList([("a", 1)], flags=2))


def test_equality_is_type_and_order_strict_between_nvlists() -> None:
    assert NVList({"a": True}) != NVList({"a": 1})
    assert NVList({"a": [True]}) != NVList({"a": [1]})
    assert NVList({"a": 1, "b": 2}) != NVList({"b": 2, "a": 1})
    assert NVList({"a": 1}) != NVList({"a": 1}, flags=NV_FLAG_IGNORE_CASE)
    assert NVList({"a": {"b": b"x"}}) == NVList({"a": NVList({"b": b"x"})})
    assert NVList({"a": 1, "b": 2}) == {"b": 2, "a": 1}   # dicts compare like dicts
    assert NVList() != [1]


# -- checked accessors ----------------------------------------------------------------

REPLY = NVList([
    ("peerid", 7), ("cipher", "AES-256-GCM"), ("key", bytes(32)), ("up", False),
    ("remote", {"af": 2}), ("peers", [{"peerid": 1}]), ("nothing", None),
])


def test_accessors_return_typed_values() -> None:
    assert REPLY.get_number("peerid", lo=0, hi=0xFFFFFF) == 7
    assert REPLY.get_string("cipher") == "AES-256-GCM"
    assert REPLY.get_binary("key", size=32) == bytes(32)
    assert REPLY.get_binary("key", size=(16, 24, 32)) == bytes(32)
    assert REPLY.get_bool("up") is False
    assert REPLY.get_nvlist("remote").get_number("af") == 2
    assert REPLY.get_nvlist_array("peers")[0].get_number("peerid") == 1
    assert REPLY.get_null("nothing") is None
    assert REPLY.has("peerid") and REPLY.has("peerid", NVType.NUMBER)
    assert not REPLY.has("peerid", NVType.STRING) and not REPLY.has("zz")
    assert REPLY.has_number("peerid") and REPLY.has_string("cipher") and REPLY.has_binary("key")
    assert REPLY.has_nvlist("remote") and REPLY.has_nvlist_array("peers") and REPLY.has_null(
        "nothing")
    assert not REPLY.has_number("cipher") and not REPLY.has_nvlist("peers")


@pytest.mark.parametrize("call, message", [
    (lambda: REPLY.get_number("missing"),
     "field 'missing': expected a pair of type number, found no pair with that name"),
    (lambda: REPLY.get_number("cipher"),
     "field 'cipher': expected a pair of type number, found a pair of type string"),
    (lambda: REPLY.get_number("up"), "expected a pair of type number, found a pair of type bool"),
    (lambda: REPLY.get_number("peerid", hi=6),
     "field 'peerid': expected a number in [0, 6], found 7"),
    (lambda: REPLY.get_number("peerid", lo=8), "expected a number in [8, "),
    (lambda: REPLY.get_string("key"),
     "expected a pair of type string, found a pair of type binary"),
    (lambda: REPLY.get_binary("key", size=16),
     "field 'key': expected a binary of 16 bytes, found a binary of 32 bytes"),
    (lambda: REPLY.get_binary("key", size=(8, 16)), "expected a binary of 8 or 16 bytes"),
    (lambda: REPLY.get_bool("peerid"), "expected a pair of type bool, found a pair of type number"),
    (lambda: REPLY.get_nvlist("peers"),
     "expected a pair of type nvlist, found a pair of type nvlist_array"),
    (lambda: REPLY.get_nvlist_array("remote"), "expected a pair of type nvlist_array"),
    (lambda: REPLY.get_descriptor("peerid"), "expected a pair of type descriptor"),
    (lambda: REPLY.get_number_array("peerid"), "expected a pair of type number_array"),
])
def test_accessor_errors_name_field_expectation_and_finding(call, message: str) -> None:
    with pytest.raises(NVFieldError) as info:
        call()
    assert message in str(info.value)
    assert isinstance(info.value, NVError) and info.value.name


def test_errors_survive_pickling() -> None:
    import pickle
    err = pickle.loads(pickle.dumps(NVError("bad", 7)))
    assert (err.reason, err.offset, str(err)) == ("bad", 7, str(NVError("bad", 7)))
    field = pickle.loads(pickle.dumps(NVFieldError("x", "a number", "nothing")))
    assert (field.name, field.expected, field.found) == ("x", "a number", "nothing")


def test_accessor_errors_never_show_binary_contents() -> None:
    secret = NVList({"key": b"\xaa" * 31})
    with pytest.raises(NVFieldError) as info:
        secret.get_binary("key", size=32)
    assert "aa" not in str(info.value) and "\\xaa" not in str(info.value)
