"""Tests of bsd_ovpn.nv's fast paths: shape templates, prefix caches, NVList.add/get.

The fast paths must be invisible: every buffer gives exactly the result, or
exactly the error, of the pair-by-pair reader (``nv._templates_on = False``),
whatever bytes were changed in a buffer whose shape was learned; and the
caches behind them stay bounded whatever names and shapes arrive.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bsd_ovpn import nv
from bsd_ovpn.nv import Descriptor, NVError, NVFieldError, NVList, pack, unpack

VECTORS = Path("/work/shared/vectors/nvlist")
needs_vectors = pytest.mark.skipif(not VECTORS.is_dir(), reason="golden vectors not present")


def reference(data: bytes, **kw: Any) -> Any:
    """unpack pair by pair (no templates): the NVList, or the NVError text."""
    saved = nv._templates_on
    nv._templates_on = False
    try:
        return unpack(data, **kw)
    except NVError as exc:
        return str(exc)
    finally:
        nv._templates_on = saved


def fast(data: bytes, **kw: Any) -> Any:
    """unpack with templates, twice (learn, then read by template): the second outcome."""
    for _ in range(2):
        try:
            result: Any = unpack(data, **kw)
        except NVError as exc:
            result = str(exc)
    return result


def same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a == b and a.byteorder == b.byteorder and pack(a) == pack(b)


def all_vectors() -> Iterator[tuple[str, bytes]]:
    for path in sorted(VECTORS.rglob("*.bin")):
        yield str(path.relative_to(VECTORS)), path.read_bytes()


def flips(blob: bytes, xors: tuple[int, ...] = (0x01, 0x80, 0xFF)) -> Iterator[bytes]:
    """Every one-byte change of ``blob`` by each of ``xors``."""
    for i in range(len(blob)):
        for x in xors:
            yield blob[:i] + bytes([blob[i] ^ x]) + blob[i + 1:]


# -- templates: same results and errors as the pair-by-pair reader -------------------

@needs_vectors
def test_every_vector_reads_the_same_through_templates() -> None:
    for name, blob in all_vectors():
        for flags in {0, blob[2] & nv.NV_FLAG_PUBLIC_MASK if len(blob) > 2 else 0}:
            for nfds in (0, 4):
                want = reference(blob, flags=flags, nfds=nfds)
                assert same(fast(blob, flags=flags, nfds=nfds), want), name


@needs_vectors
@pytest.mark.parametrize("name", [
    "ovpn_new_key_aes256gcm", "ovpn_new_peer_server_ipv4", "ovpn_new_peer_client_ipv6",
    "ovpn_set_peer", "ovpn_swap_keys", "ovpn_del_peer", "kreply_notif_del_peer_timeout",
    "kreply_get_peer_stats", "be_ovpn_new_peer_client_ipv4", "be_nvlist_array",
    "nvlist_array_in_nested", "flags_ignore_case", "flags_no_unique",
])
def test_any_one_byte_change_reads_the_same_as_without_templates(name: str) -> None:
    blob = (VECTORS / f"{name}.bin").read_bytes()
    flags = nv.NV_FLAG_PUBLIC_MASK & blob[2]
    unpack(blob, flags=flags)            # the shape is learned
    for changed in flips(blob):
        want = reference(changed, flags=flags)
        try:
            got: Any = unpack(changed, flags=flags)
        except NVError as exc:
            got = str(exc)
        assert same(got, want), (name, changed.hex())


@needs_vectors
def test_a_learned_shape_is_read_by_its_template() -> None:
    blob = (VECTORS / "ovpn_new_key_aes256gcm.bin").read_bytes()
    unpack(blob)
    templates = nv._TOP_TEMPLATES[len(blob)]
    # Another key and iv, same shape: the template reads it.
    other = blob.replace(bytes(range(32)), bytes(range(100, 132)))
    assert other != blob
    nvl = unpack(other)
    assert nvl.get_nvlist("encrypt").get_binary("key", size=32) == bytes(range(100, 132))
    assert nv._TOP_TEMPLATES[len(blob)] is templates
    assert any(t.read(other, 0, len(other), nv._empty_list(0)) for t in templates)


def test_strings_read_by_template_are_still_checked() -> None:
    blob = pack(NVList([("cipher", "AES-256-GCM"), ("peerid", 1)]))
    unpack(blob)
    bad = blob.replace(b"AES-256-GCM\0", b"AES-256-GCMx")     # no NUL any more
    with pytest.raises(NVError, match="not exactly NUL-terminated"):
        unpack(bad)
    inner = blob.replace(b"AES-256-GCM\0", b"AES\x00" + b"256-GCM\0")  # NUL inside
    assert reference(inner) == fast(inner)
    assert "NUL-terminated" in fast(inner)
    other = blob.replace(b"AES-256-GCM\0", b"AES-128-GCM\0")
    assert unpack(other)["cipher"] == "AES-128-GCM"


def test_header_sizes_of_array_elements_are_checked() -> None:
    """Element templates take nvlh_size as a value: a wrong one is still an error."""
    tree = NVList([("peers", [NVList([("peerid", i), ("bytes", NVList([("in", i), ("out", i)]))])
                              for i in range(6)])])
    blob = pack(tree)
    assert unpack(blob) == tree
    assert "peers" in nv._ELEMENT_TEMPLATES
    element_headers = [i for i in range(len(blob) - 2)
                       if blob[i] == 0x6C and blob[i + 1:i + 3] == b"\0\0" and i > 0]
    for offset in element_headers:
        size_at = offset + 11
        (size,) = struct.unpack_from("<Q", blob, size_at)
        for wrong in (size - 1, size + 1, 0):
            bad = blob[:size_at] + struct.pack("<Q", wrong) + blob[size_at + 8:]
            want = reference(bad)
            assert isinstance(want, str)
            assert fast(bad) == want


def test_a_tree_with_descriptors_is_never_templated() -> None:
    tree = NVList([("fd", Descriptor(0)), ("peerid", 3)])
    blob = pack(tree)
    for _ in range(3):
        assert unpack(blob, nfds=1) == tree
        with pytest.raises(NVError, match="nvlh_descriptors is 1 but only 0"):
            unpack(blob, nfds=0)


def test_flags_argument_is_checked_on_the_template_path() -> None:
    blob = pack(NVList([("a", 1)], flags=nv.NV_FLAG_IGNORE_CASE))
    assert unpack(blob, flags=nv.NV_FLAG_IGNORE_CASE)["A"] == 1
    assert unpack(blob, flags=nv.NV_FLAG_IGNORE_CASE)["A"] == 1
    with pytest.raises(NVError, match="EILSEQ"):
        unpack(blob, flags=0)


def test_results_of_the_template_path_are_independent_objects() -> None:
    blob = pack(NVList([("n", NVList([("x", 1)])), ("y", 2)]))
    first = unpack(blob)
    second = unpack(blob)
    first.get_nvlist("n")["x"] = 5
    first.add("z", 3)
    assert unpack(blob) == second == {"n": {"x": 1}, "y": 2}


# Random trees of the types templates cover (and a few they do not), one byte changed.
_names = st.sampled_from(["a", "b", "peerid", "key", "iv", "cipher", "in", "out", ""])
_leaf = st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=1, max_size=9),
                  st.text(st.characters(blacklist_characters="\0",
                                        blacklist_categories=("Cs",)), max_size=5),
                  st.booleans(), st.none())


def _tree(children: st.SearchStrategy[Any]) -> st.SearchStrategy[NVList]:
    def build(pairs: list[tuple[str, Any]]) -> NVList:
        nvl = NVList()
        for name, value in pairs:
            if name not in nvl:
                nvl.add(name, value)
        return nvl
    return st.lists(st.tuples(_names, children), max_size=4).map(build)


_trees = _tree(st.recursive(_leaf, lambda inner: st.one_of(
    _tree(inner), st.lists(_tree(inner), min_size=1, max_size=3)), max_leaves=10))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees, st.sampled_from(["little", "big"]), st.data())
def test_random_trees_with_one_byte_changed(tree: NVList, order: str, data: st.DataObject) -> None:
    blob = pack(tree, byteorder=order)
    assert fast(blob) == tree == reference(blob)
    pos = data.draw(st.integers(0, len(blob) - 1))
    xor = data.draw(st.integers(1, 255))
    changed = blob[:pos] + bytes([blob[pos] ^ xor]) + blob[pos + 1:]
    assert same(fast(changed), reference(changed))


# -- bounded caches ---------------------------------------------------------------------

def test_caches_stay_bounded_under_many_names_and_shapes() -> None:
    for i in range(3000):
        name = f"n{i}"
        nvl = NVList([(name, i), (name + "s", "v" * (i % 70)), (name + "b", b"x" * (1 + i % 50)),
                      (name + "l", NVList([("x", i)]))])
        assert unpack(pack(nvl)) == nvl
        assert unpack(pack(nvl, byteorder="big")) == nvl
        assert unpack(pack({"peers": [{name: 1}, {name: 2}]})) == {"peers": [{name: 1},
                                                                            {name: 2}]}
    assert len(nv._TOP_TEMPLATES) <= nv._TEMPLATE_KEYS_MAX
    assert all(len(v) <= nv._TEMPLATES_PER_KEY for v in nv._TOP_TEMPLATES.values())
    assert len(nv._ELEMENT_TEMPLATES) <= nv._TEMPLATE_KEYS_MAX
    assert len(nv._CSTR_CACHE) <= nv._CSTR_CACHE_MAX
    assert all(len(k) <= nv._CSTR_CACHE_LEN for k in nv._CSTR_CACHE)
    assert len(nv._NAME_CACHE) <= nv._NAME_CACHE_MAX
    assert len(nv._STR_CACHE) <= nv._STR_CACHE_MAX
    for o in (nv._LITTLE, nv._BIG):
        for cache in (o.num_prefix, o.prefixes, o.nest_prefix):
            assert len(cache) <= nv._PREFIX_CACHE_MAX


def test_large_buffers_are_not_learned() -> None:
    blob = pack(NVList([("big", b"x" * (nv._TEMPLATE_MAX_SIZE + 1))]))
    unpack(blob)
    unpack(blob)
    assert len(blob) not in nv._TOP_TEMPLATES


# -- pack fast paths: same checks and messages --------------------------------------

@pytest.mark.parametrize("tree, message", [
    (NVList([("x", -1)]), "pair 'x': number -1 is outside"),
    (NVList([("x", 2**64)]), "pair 'x': number 18446744073709551616 is outside"),
    (NVList([("n", NVList([("x", -1)]))]), "pair 'n'.'x': number -1 is outside"),
    (NVList([("n", NVList([("y", NVList([("x", 2**64)]))]))]), "pair 'n'.'y'.'x': number"),
    (NVList([("n", NVList([("b", b"")]))]), "pair 'n'.'b': binary values cannot be empty"),
    (NVList([("s", "a\0b")]), "pair 's': string contains a NUL byte"),
    (NVList([("n", NVList([("s", "a\0b")]))]), "pair 'n'.'s': string contains a NUL byte"),
    (NVList([("a", [NVList([("s", "\ud800")])])]), "pair 'a'.'s': string cannot be encoded"),
    ({"x": -5}, "pair 'x': number -5 is outside"),
    ({"n": {"x": -5}}, "pair 'n'.'x': number -5 is outside"),
])
def test_pack_errors_name_the_pair(tree: Any, message: str) -> None:
    with pytest.raises(NVError, match=message.replace("(", r"\(")):
        pack(tree)


def test_pack_of_a_flat_list_that_fails_leaves_no_trace() -> None:
    # A nested list that starts flat and then holds a list takes the general
    # path after the flat attempt: the bytes must not contain the attempt.
    tree = NVList([("n", NVList([("a", 1), ("b", "s"), ("c", NVList([("d", 2)]))])), ("e", 3)])
    assert unpack(pack(tree)) == tree
    assert pack(tree) == pack(unpack(pack(tree)))


def test_cycles_are_found_at_any_depth_and_named_where_they_close() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(NVError, match=r"^pair 'self': nvlist contains itself"):
        pack(loop)
    inner: dict[str, Any] = {"x": 1}
    inner["back"] = inner
    deep: dict[str, Any] = {"n": inner}
    for i in range(40):
        deep = {f"d{i}": deep}
    with pytest.raises(NVError, match=r"'n'\.'back': nvlist contains itself"):
        pack(deep)
    arr: dict[str, Any] = {"a": 1}
    arr["list"] = [{"b": 1}, arr]
    with pytest.raises(NVError, match=r"^pair 'list': nvlist contains itself"):
        pack(arr)
    # Shared (not cyclic) children are fine, deep or not.
    shared = {"a": 1}
    wide: dict[str, Any] = {"x": shared, "y": [shared, shared]}
    for i in range(40):
        wide = {f"d{i}": wide, "s": shared}
    assert unpack(pack(wide))["s"] == {"a": 1}


def test_deep_trees_pack_and_unpack() -> None:
    tree = NVList([("leaf", 1)])
    for i in range(2000):
        tree = NVList([("d", tree), ("n", i)])
    blob = pack(tree)
    back = unpack(blob)
    assert pack(back) == blob


# -- NVList.add / typed getters -----------------------------------------------------

def test_add_still_checks_names_and_values_after_caching() -> None:
    nvl = NVList([("peerid", 1)])
    assert pack(nvl)                      # "peerid" is in the name cache now
    with pytest.raises(NVError, match="duplicate name 'peerid'"):
        nvl.add("peerid", 2)
    for bad in (b"peerid", 5, None):
        with pytest.raises(NVError, match="pair names must be str"):
            NVList().add(bad, 1)  # type: ignore[arg-type]
    with pytest.raises(NVError, match="NUL"):
        NVList().add("pe\0erid", 1)
    with pytest.raises(NVError, match="too long"):
        NVList().add("x" * 2048, 1)
    with pytest.raises(NVError, match="cannot be packed"):
        NVList().add("peerid", 1.5)
    with pytest.raises(NVError, match="empty lists"):
        NVList().add("peerid", [])
    child = NVList()
    child.add("n", {"x": 1})
    assert type(child["n"]) is NVList
    with pytest.raises(NVError, match="NVList flags"):
        NVList(flags=4)
    with pytest.raises(NVError, match="NVList flags"):
        NVList(flags=True)  # type: ignore[arg-type]


def test_typed_getters_fast_path() -> None:
    nvl = unpack(pack(NVList([("n", 5), ("s", "t"), ("b", b"xy"), ("l", NVList([("a", 1)])),
                              ("t", True)])))
    assert nvl.get_number("n", lo=5, hi=5) == 5
    with pytest.raises(NVFieldError, match=r"field 'n': expected a number in \[6, 9\], found 5"):
        nvl.get_number("n", lo=6, hi=9)
    with pytest.raises(NVFieldError, match="field 's': expected a pair of type number, "
                                           "found a pair of type string"):
        nvl.get_number("s")
    with pytest.raises(NVFieldError, match="found no pair with that name"):
        nvl.get_string("missing")
    assert nvl.get_string("s") == "t"
    assert nvl.get_binary("b", size=(1, 2)) == b"xy"
    with pytest.raises(NVFieldError, match="a binary of 3 bytes"):
        nvl.get_binary("b", size=3)
    assert nvl.get_nvlist("l") == {"a": 1}
    with pytest.raises(NVFieldError, match="expected a pair of type nvlist"):
        nvl.get_nvlist("n")
    assert nvl.get_bool("t") is True
    with pytest.raises(NVFieldError):
        nvl.get_number("t")               # True is a BOOL, not a NUMBER
    assert nvl.get_typed("n", nv.NVType.NUMBER) == 5
    assert nvl.has_number("n") and not nvl.has_number("s")
