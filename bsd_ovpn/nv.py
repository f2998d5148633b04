"""FreeBSD libnv packed nvlists (``nvlist_pack`` / ``nvlist_unpack``) in pure Python.

Why this exists: every if_ovpn(4) command and reply is a packed nvlist, and the
userspace engine speaks the same nvlists on Linux.  The bytes must be exactly
what FreeBSD's libnv writes, and anything a kernel, engine or peer sends must
be checked as strictly as libnv checks it (the kernel turns any unpack failure
into EINVAL).  Reference: ``shared/spec/nvlist.md``; golden vectors from real
libnv in ``shared/vectors/nvlist/``.

Wire format in brief (all integers in the packing host's byte order)::

    nvlist := HEADER pair*                       HEADER  = 19 bytes (magic 0x6c, version,
    pair   := PAIRHDR name\\0 value                          flags, ndescriptors, size)
    NVLIST value       := HEADER pair* UP        PAIRHDR = 19 bytes (type, namesize,
    NVLIST_ARRAY value := (HEADER pair* NEXT)*n              datasize, nitems)

Two surprises drive the structure of ``pack``: a header's ``nvlh_size`` counts
the bytes to the end of the *whole buffer*, and its ``nvlh_descriptors`` counts
the descriptors in that list *and everything after it in the stream*.  Both
are only known at the end, so ``pack`` writes placeholders and patches them.

Python values and libnv types:

=====================  ==========================================================
Python                 libnv type
=====================  ==========================================================
``None``               NULL
``bool``               BOOL (checked before ``int``: ``bool`` is an ``int``)
``int``                NUMBER, unsigned 64-bit
``str``                STRING; text is UTF-8 with ``surrogateescape``, so any
                       byte string from the wire round-trips
``bytes``/bytearray    BINARY (never empty: libnv refuses size 0)
``Mapping``/NVList     NVLIST (an ``NVList`` child keeps its own flags)
``Descriptor``         DESCRIPTOR (an index into the SCM_RIGHTS fd array)
non-empty list/tuple   BOOL/NUMBER/STRING/NVLIST/DESCRIPTOR_ARRAY after its items
                       (all items of one kind; unpack returns lists)
=====================  ==========================================================

Guarantees of ``unpack``: every malformed input raises ``NVError`` (offset +
reason) and nothing else; it never recurses (nesting depth is bounded only by
the input length, as in libnv), and no size field is trusted before it has
been checked against the bytes actually present, so a lying size cannot cause
a large allocation.  ``pack`` is iterative too, so anything ``unpack`` returns
can be packed again.

Round trip: ``pack(unpack(b), byteorder=<its .byteorder>) == b`` for every
blob that libnv's ``nvlist_pack``/``nvlist_send`` can produce.  The blobs in
the vectors' ``tolerated/`` folder are accepted with exactly libnv's result,
but they are not canonical and so they do NOT re-pack to the same bytes:
libnv's own unpack -> pack does the same normalisation.  Precisely:

* a nonzero ``nvlh_version`` byte is ignored on input; pack writes 0;
* a stream that ends inside a nested list (missing UP/NEXT markers) is
  accepted; pack writes the markers;
* marker pairs with a name or a nonzero datasize are accepted (the datasize
  is bounds-checked, not consumed); pack writes unnamed, empty markers;
* an NVLIST pair's datasize is only checked to be nonzero and in bounds,
  an NVLIST_ARRAY pair's datasize only to be in bounds, and the nitems of
  non-array pairs is not looked at; pack writes the true values;
* BOOL_ARRAY bytes other than 0/1 read as True; pack writes 1;
* a NEXT marker inside a plain nested list acts like UP, and UP inside an
  array element leaves the whole array (remaining elements stay empty), as
  libnv's unpack loop does;
* the ``nvlh_descriptors`` of nested headers are only checked against
  ``nfds``, and a blob whose headers disagree in byte order is decoded the
  way libnv decodes it (pairs follow the top header and each array-element
  header; nested NVLIST headers do not change it) but packs in one order.

Speed (every if_ovpn command and reply of the userspace engine goes through
here): ``unpack`` learns the shape of each small buffer it reads (headers,
names and markers: everything but the NUMBER/BINARY/STRING value bytes) and
reads a buffer of a known shape with one struct call and one comparison,
still checking what depends on the values (strings NUL-terminated, array
element sizes); see ``_Template``.  ``pack`` and ``NVList.add`` keep the
encoded names and pair headers they have validated.  Every cache is bounded
in entries and entry size, so hostile input cannot grow them, and a buffer
that misses the caches gets the same full checks as before.

Array sizes are compared as exact integers, so no 64-bit wrap-around of
``8 * nitems`` can let a lying ``nitems`` through (current libnv guards that
multiplication as well).

Descriptors: ``nvlist_pack`` refuses them; ``pack`` writes what
``nvlist_send`` writes (the indexes held by each ``Descriptor``, with the
``nvlh_descriptors`` counts).  Use ``allow_descriptors=False`` toward the
kernel: if_ovpn's libnv has no descriptor case and would panic on one.
"""
from __future__ import annotations

import enum
import functools
import operator
import struct
import sys
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, \
    MutableMapping, Sequence, ValuesView
from dataclasses import dataclass
from typing import Any

from bsd_ovpn.errors import OvpnError

__all__ = [
    "NV_FLAG_IGNORE_CASE", "NV_FLAG_NO_UNIQUE", "NV_NAME_MAX", "HEADER_SIZE", "U64_MAX",
    "NVType", "NVError", "NVFieldError", "Descriptor", "NVList",
    "nvtype_of", "pack", "unpack",
]

NV_FLAG_IGNORE_CASE = 0x01
NV_FLAG_NO_UNIQUE = 0x02
NV_FLAG_PUBLIC_MASK = 0x03
NV_FLAG_BIG_ENDIAN = 0x80       # private: set in every header by a big-endian packer
NV_FLAG_ALL_MASK = 0x83         # any other header flag bit is rejected
NV_NAME_MAX = 2048              # namesize limit, NUL included: names are <= 2047 bytes
NVLIST_HEADER_MAGIC = 0x6C      # 'l'
HEADER_SIZE = 19                # both struct nvlist_header and struct nvpair_header

U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1


class NVType(enum.IntEnum):
    """libnv's type ids (``sys/sys/nv.h``; the two markers from ``nv_impl.h``)."""

    NONE = 0
    NULL = 1
    BOOL = 2
    NUMBER = 3
    STRING = 4
    NVLIST = 5
    DESCRIPTOR = 6
    BINARY = 7
    BOOL_ARRAY = 8
    NUMBER_ARRAY = 9
    STRING_ARRAY = 10
    NVLIST_ARRAY = 11
    DESCRIPTOR_ARRAY = 12
    NVLIST_ARRAY_NEXT = 254
    NVLIST_UP = 255

    @property
    def label(self) -> str:
        """The name used in messages: ``number``, ``nvlist_array``..."""
        return self.name.lower()


# Plain ints for the hot paths (IntEnum comparisons are slower).
_NULL, _BOOL, _NUMBER, _STRING, _NVLIST, _DESCRIPTOR, _BINARY = 1, 2, 3, 4, 5, 6, 7
_BOOL_ARRAY, _NUMBER_ARRAY, _STRING_ARRAY, _NVLIST_ARRAY, _DESCRIPTOR_ARRAY = 8, 9, 10, 11, 12
_NEXT, _UP = 254, 255


class NVError(OvpnError, ValueError):
    """A packed nvlist is malformed, or a value cannot be packed.

    ``offset`` is the byte offset in the packed buffer where the problem was
    found (``None`` for pack errors, which name the pair instead) and
    ``reason`` says what is wrong in words.
    """

    def __init__(self, reason: str, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        if offset is None:
            super().__init__(reason)
        else:
            super().__init__(f"invalid packed nvlist at offset {offset}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:   # keep offset/reason across pickling
        return type(self), (self.reason, self.offset)


class NVFieldError(NVError):
    """A field a consumer requires is missing, of another type, or out of range.

    Raised by the ``NVList.get_*`` accessors, which validate what a kernel,
    engine or peer sent.  Messages never include binary contents (keys travel
    as BINARY), only sizes.
    """

    def __init__(self, name: str, expected: str, found: str) -> None:
        self.name = name
        self.expected = expected
        self.found = found
        super().__init__(f"field {name!r}: expected {expected}, found {found}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.expected, self.found)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A DESCRIPTOR value: the index of a file descriptor in the fd array.

    The fds themselves travel beside the packed bytes (SCM_RIGHTS), so the
    nvlist only holds indexes.  A distinct type keeps them from being mistaken
    for NUMBERs.  ``-1`` is what ``nvlist_send`` writes for an unset fd.
    """

    index: int

    def __post_init__(self) -> None:
        if type(self.index) is not int or not -1 <= self.index <= _I64_MAX:
            raise NVError(f"descriptor index must be an int in [-1, 2**63-1], "
                          f"not {self.index!r}")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _check_name(name: object) -> str:
    """Validate a pair name the way nvpair creation does; return it."""
    if type(name) is not str:
        raise NVError(f"pair names must be str, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise NVError(f"name {name!r} cannot be encoded: {exc.reason}") from None
    if b"\0" in raw:
        raise NVError(f"name {name!r} contains a NUL byte")
    if len(raw) >= NV_NAME_MAX:
        raise NVError(f"name of {len(raw)} bytes is too long (at most {NV_NAME_MAX - 1})")
    return name


def _check_flags(flags: object, what: str) -> int:
    if type(flags) is not int or flags & ~NV_FLAG_PUBLIC_MASK:
        raise NVError(f"{what} must be a combination of NV_FLAG_IGNORE_CASE and "
                      f"NV_FLAG_NO_UNIQUE, not {flags!r}")
    return flags


_ARRAY_OF: dict[NVType | None, NVType] = {
             NVType.BOOL: NVType.BOOL_ARRAY, NVType.NUMBER: NVType.NUMBER_ARRAY,
             NVType.STRING: NVType.STRING_ARRAY, NVType.NVLIST: NVType.NVLIST_ARRAY,
             NVType.DESCRIPTOR: NVType.DESCRIPTOR_ARRAY}


def _scalar_type(value: object) -> NVType | None:
    """The libnv type of a non-list value, or None when it has none."""
    if value is None:
        return NVType.NULL
    if isinstance(value, bool):
        return NVType.BOOL
    if isinstance(value, int):
        return NVType.NUMBER
    if isinstance(value, str):
        return NVType.STRING
    if isinstance(value, (bytes, bytearray)):
        return NVType.BINARY
    if isinstance(value, Mapping):
        return NVType.NVLIST
    if isinstance(value, Descriptor):
        return NVType.DESCRIPTOR
    return None


def nvtype_of(value: object) -> NVType:
    """The libnv type ``value`` packs as; NVError if it has none.

    Only the shape is checked here (lists: non-empty, one element type);
    ranges and contents are checked by ``pack``.
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise NVError("empty lists cannot be packed: libnv arrays need at least one item")
        first = _scalar_type(value[0])
        if first not in _ARRAY_OF:
            raise NVError(f"lists of {type(value[0]).__name__} cannot be packed")
        for item in value:
            if _scalar_type(item) is not first:
                raise NVError(f"mixed list: {first.label} and {type(item).__name__} "
                              f"items cannot share one array")
        return _ARRAY_OF[first]
    kind = _scalar_type(value)
    if kind is None:
        raise NVError(f"values of type {type(value).__name__} cannot be packed")
    return kind


def _coerce(value: Any) -> Any:
    """Check a value's shape and turn plain mappings into NVLists (copies).

    Storing children as NVList makes ``get_nvlist`` and friends work on
    everything inside an NVList, however it was built.
    """
    kind = nvtype_of(value)
    if kind == NVType.NVLIST and not isinstance(value, NVList):
        return NVList(value)
    if kind == NVType.NVLIST_ARRAY:
        return [v if isinstance(v, NVList) else NVList(v) for v in value]
    return value


_MISSING = object()


class NVList(MutableMapping[str, Any]):
    """An ordered nvlist: a list of (name, value) pairs plus its flags.

    Pair order is insertion order and decides the packed bytes.  Without
    ``NV_FLAG_NO_UNIQUE`` names are unique (``add`` of a duplicate raises);
    with it, repeated names are kept: iteration, ``items()`` and ``len`` see
    every pair, ``nvl[name]`` the first.  ``NV_FLAG_IGNORE_CASE`` compares
    names ASCII-case-insensitively, like libnv's ``strcasecmp``.

    ``nvl[name] = v`` replaces the value of the first pair with that name (in
    place) or appends; ``del nvl[name]`` removes every pair with that name.
    Plain mappings stored as values are copied into NVLists.

    Comparison: two NVLists are equal when they would pack to the same bytes
    (same flags, same pairs in the same order, same libnv types).  An NVList
    without repeated names compares with a plain dict like a dict does.

    ``byteorder`` is the byte order of the buffer an NVList was unpacked from
    (``"little"``/``"big"``, top-level list only), else None.
    """

    __slots__ = ("_pairs", "_first", "_flags", "byteorder")

    def __init__(self, pairs: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
                 *, flags: int = 0) -> None:
        if type(flags) is not int or flags & ~NV_FLAG_PUBLIC_MASK:
            _check_flags(flags, "NVList flags")
        self._flags = flags
        self._pairs: list[tuple[str, Any]] = []
        self._first: dict[str, int] = {}   # lookup key -> index of the first such pair
        self.byteorder: str | None = None
        if pairs is None:
            return
        if type(pairs) is list or type(pairs) is tuple:
            items: Iterable[Any] = pairs
        else:
            items = pairs.items() if isinstance(pairs, Mapping) else pairs
        add = self.add
        for item in items:
            try:
                name, value = item
            except (TypeError, ValueError):
                raise NVError(f"NVList items must be (name, value) pairs, not {item!r}") from None
            add(name, value)

    # -- flags and names --------------------------------------------------

    @property
    def flags(self) -> int:
        """Public flags: NV_FLAG_IGNORE_CASE | NV_FLAG_NO_UNIQUE (read-only)."""
        return self._flags

    def _key(self, name: str) -> str:
        return name.translate(_ASCII_LOWER) if self._flags & NV_FLAG_IGNORE_CASE else name

    def _reindex(self) -> None:
        first: dict[str, int] = {}
        for i, (name, _) in enumerate(self._pairs):
            first.setdefault(self._key(name), i)
        self._first = first

    # -- mapping protocol -------------------------------------------------

    def add(self, name: str, value: Any) -> None:
        """Append a pair, as ``nvlist_add_*`` does (NVError on a duplicate name).

        Requests are built with one ``add`` per field, so the usual case is
        kept short: a name in ``_NAME_CACHE`` was validated before, and a
        value of a plain type needs no coercion.
        """
        if type(name) is not str or name not in _NAME_CACHE:
            _encode_name(name)      # validates the name (NVError), caches it if there is room
        if type(value) not in _STORED_AS_IS:
            value = _coerce(value)
        flags = self._flags
        key = name.translate(_ASCII_LOWER) if flags & NV_FLAG_IGNORE_CASE else name
        first = self._first
        if key in first:
            if not flags & NV_FLAG_NO_UNIQUE:
                raise NVError(f"duplicate name {name!r} in an nvlist without NV_FLAG_NO_UNIQUE")
        else:
            first[key] = len(self._pairs)
        self._pairs.append((name, value))

    def __getitem__(self, name: str) -> Any:
        if type(name) is not str:
            raise KeyError(name)
        return self._pairs[self._first[self._key(name)]][1]

    def __setitem__(self, name: str, value: Any) -> None:
        index = self._first.get(self._key(_check_name(name)))
        if index is None:
            self.add(name, value)
        else:
            self._pairs[index] = (self._pairs[index][0], _coerce(value))

    def __delitem__(self, name: str) -> None:
        if type(name) is not str or self._key(name) not in self._first:
            raise KeyError(name)
        key = self._key(name)
        self._pairs = [p for p in self._pairs if self._key(p[0]) != key]
        self._reindex()

    def __contains__(self, name: object) -> bool:
        return type(name) is str and self._key(name) in self._first

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def items(self) -> ItemsView[str, Any]:
        """Every pair in order, repeated names included."""
        return _PairsView(self)

    def values(self) -> ValuesView[Any]:
        return _ValuesView(self)

    def keys(self) -> KeysView[str]:
        return KeysView(self)

    def clear(self) -> None:
        self._pairs = []
        self._first = {}

    def get_all(self, name: str) -> list[Any]:
        """The values of every pair called ``name`` (NO_UNIQUE lists), in order."""
        key = self._key(name)
        return [v for n, v in self._pairs if self._key(n) == key]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NVList):
            return (self._flags == other._flags and len(self._pairs) == len(other._pairs)
                    and all(a[0] == b[0] and _same_value(a[1], b[1])
                            for a, b in zip(self._pairs, other._pairs)))
        if isinstance(other, Mapping):
            if len(self._first) != len(self._pairs):
                return False
            return dict(self._pairs) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        flags = f", flags={self._flags}" if self._flags else ""
        return f"NVList({self._pairs!r}{flags})"

    # -- typed, checked access (what consumers of kernel/peer data use) ---

    def _find(self, name: str, nvtype: int) -> Any:
        """First value of pair (name, type), as libnv's nvlist_find; else _MISSING."""
        if not self._flags:         # the usual case: one dict lookup, one type lookup
            index = self._first.get(name)
            if index is None:
                return _MISSING
            value = self._pairs[index][1]
            kind = _FAST_KIND.get(type(value))
            if kind is None:
                kind = _kind_of(value)
            return value if kind == nvtype else _MISSING
        key = self._key(name)
        start = self._first.get(key)
        if start is None:
            return _MISSING
        if not self._flags & NV_FLAG_NO_UNIQUE:
            value = self._pairs[start][1]
            return value if _kind_of(value) == nvtype else _MISSING
        for pname, value in self._pairs[start:]:
            if self._key(pname) == key and _kind_of(value) == nvtype:
                return value
        return _MISSING

    def _what_is(self, name: str) -> str:
        kinds = [_label(v) for v in self.get_all(name)]
        if not kinds:
            return "no pair with that name"
        return "a pair of type " + " and ".join(kinds)

    def has(self, name: str, nvtype: NVType | int | None = None) -> bool:
        """``nvlist_exists[_type]``: is there a pair ``name`` (of type ``nvtype``)?"""
        if nvtype is None:
            return name in self
        return self._find(name, int(nvtype)) is not _MISSING

    def has_null(self, name: str) -> bool:
        return self._find(name, _NULL) is not _MISSING

    def has_bool(self, name: str) -> bool:
        return self._find(name, _BOOL) is not _MISSING

    def has_number(self, name: str) -> bool:
        return self._find(name, _NUMBER) is not _MISSING

    def has_string(self, name: str) -> bool:
        return self._find(name, _STRING) is not _MISSING

    def has_binary(self, name: str) -> bool:
        return self._find(name, _BINARY) is not _MISSING

    def has_nvlist(self, name: str) -> bool:
        return self._find(name, _NVLIST) is not _MISSING

    def has_nvlist_array(self, name: str) -> bool:
        return self._find(name, _NVLIST_ARRAY) is not _MISSING

    def get_typed(self, name: str, nvtype: NVType | int) -> Any:
        """The first value of pair (name, nvtype); NVFieldError if there is none."""
        if type(nvtype) is not int:
            nvtype = int(nvtype)
        value = self._find(name, nvtype)
        if value is _MISSING:
            raise NVFieldError(name, f"a pair of type {NVType(nvtype).label}",
                               self._what_is(name))
        return value

    def get_number(self, name: str, *, lo: int = 0, hi: int = U64_MAX) -> int:
        """A NUMBER in [lo, hi] (inclusive)."""
        value = self._find(name, _NUMBER)
        if value is _MISSING:
            value = self.get_typed(name, _NUMBER)   # raises NVFieldError
        if not lo <= value <= hi:
            raise NVFieldError(name, f"a number in [{lo}, {hi}]", f"{int(value)}")
        return value

    def get_bool(self, name: str) -> bool:
        return self.get_typed(name, _BOOL)

    def get_string(self, name: str) -> str:
        value = self._find(name, _STRING)
        return self.get_typed(name, _STRING) if value is _MISSING else value

    def get_null(self, name: str) -> None:
        self.get_typed(name, _NULL)

    def get_binary(self, name: str, *, size: int | tuple[int, ...] | None = None) -> bytes:
        """A BINARY, optionally of exactly ``size`` bytes (or one of the sizes)."""
        value = self._find(name, _BINARY)
        if value is _MISSING:
            value = self.get_typed(name, _BINARY)   # raises NVFieldError
        if size is not None:
            sizes = (size,) if isinstance(size, int) else tuple(size)
            if len(value) not in sizes:
                wanted = " or ".join(str(s) for s in sizes)
                raise NVFieldError(name, f"a binary of {wanted} bytes",
                                   f"a binary of {len(value)} bytes")
        return bytes(value)

    def get_nvlist(self, name: str) -> NVList:
        value = self._find(name, _NVLIST)
        return self.get_typed(name, _NVLIST) if value is _MISSING else value

    def get_nvlist_array(self, name: str) -> list[NVList]:
        return self.get_typed(name, _NVLIST_ARRAY)

    def get_descriptor(self, name: str) -> Descriptor:
        return self.get_typed(name, _DESCRIPTOR)

    def get_bool_array(self, name: str) -> list[bool]:
        return self.get_typed(name, _BOOL_ARRAY)

    def get_number_array(self, name: str) -> list[int]:
        return self.get_typed(name, _NUMBER_ARRAY)

    def get_string_array(self, name: str) -> list[str]:
        return self.get_typed(name, _STRING_ARRAY)


class _PairsView(ItemsView):  # type: ignore[type-arg]
    """items() of an NVList: every (name, value) pair, repeats included."""

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._mapping._pairs)  # type: ignore[attr-defined]

    def __contains__(self, item: object) -> bool:
        return item in self._mapping._pairs  # type: ignore[attr-defined]


class _ValuesView(ValuesView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        return (v for _, v in self._mapping._pairs)  # type: ignore[attr-defined]


def _kind_of(value: object) -> int:
    """libnv type id of a stored value, or 0 when it has none (never raises)."""
    try:
        return int(nvtype_of(value))
    except NVError:
        return 0


def _label(value: object) -> str:
    kind = _kind_of(value)
    return NVType(kind).label if kind else type(value).__name__


def _same_value(a: object, b: object) -> bool:
    """Equality that also requires the same libnv type (True is not 1)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return _kind_of(a) == _kind_of(b) and a == b


# ---------------------------------------------------------------------------
# Byte-order specific structs.  nvlist header: magic u8, version u8, flags u8,
# descriptors u64, size u64.  Pair header: type u8, namesize u16, datasize u64,
# nitems u64.  No padding (the C structs are __packed).


class _Order:
    """Precompiled structs for one byte order."""

    __slots__ = ("name", "big_flag", "header", "header_tail", "pair", "u64", "i64", "marker_up",
                 "marker_next", "empty_headers", "num_prefix", "prefixes", "nest_prefix",
                 "pack_tools")

    def __init__(self, name: str) -> None:
        c = "<" if name == "little" else ">"
        self.name = name
        self.big_flag = NV_FLAG_BIG_ENDIAN if name == "big" else 0
        self.header = struct.Struct(c + "BBBQQ")
        self.header_tail = struct.Struct(c + "QQ")     # descriptors, size
        self.pair = struct.Struct(c + "BHQQ")
        self.u64 = struct.Struct(c + "Q")
        self.i64 = struct.Struct(c + "q")
        self.marker_up = self.pair.pack(_UP, 1, 0, 0) + b"\0"
        self.marker_next = self.pair.pack(_NEXT, 1, 0, 0) + b"\0"
        # Headers with placeholder counts, by public flags (pack patches them).
        self.empty_headers = [self.header.pack(NVLIST_HEADER_MAGIC, 0, f | self.big_flag, 0, 0)
                              for f in range(NV_FLAG_PUBLIC_MASK + 1)]
        # Pair header + encoded name of the pair shapes pack meets again and
        # again: name -> NUMBER or NVLIST pair prefix; (type, name, datasize
        # or nitems) -> prefix of a BINARY/STRING/NVLIST_ARRAY pair.  Each
        # dict holds at most _PREFIX_CACHE_MAX entries.
        self.num_prefix: dict[str, bytes] = {}
        self.prefixes: dict[tuple[int, str, int], bytes] = {}
        self.nest_prefix: dict[str, bytes] = {}
        self.pack_tools = (self.u64.pack, self.empty_headers, self.num_prefix, self.prefixes,
                           self.nest_prefix)

    def array(self, code: str, n: int) -> struct.Struct:
        return struct.Struct(f"{'<' if self.name == 'little' else '>'}{n}{code}")


_LITTLE = _Order("little")
_BIG = _Order("big")
_HOST = _LITTLE if sys.byteorder == "little" else _BIG
assert _LITTLE.header.size == _LITTLE.pair.size == HEADER_SIZE


def _order(byteorder: str | None) -> _Order:
    if byteorder is None:
        return _HOST
    if byteorder == "little":
        return _LITTLE
    if byteorder == "big":
        return _BIG
    raise ValueError(f"byteorder must be None, 'little' or 'big', not {byteorder!r}")


# ---------------------------------------------------------------------------
# pack

# Value types NVList.add stores unchanged (no _coerce needed).
_STORED_AS_IS = frozenset({int, bool, str, bytes, type(None), Descriptor, NVList})

_FAST_KIND = {int: _NUMBER, bool: _BOOL, str: _STRING, bytes: _BINARY, type(None): _NULL,
              NVList: _NVLIST, dict: _NVLIST, Descriptor: _DESCRIPTOR, bytearray: _BINARY}

# Encoded names ("name\0") of names already validated, and (per byte order,
# in _Order) whole pair prefixes.  Kernel command names are a small fixed set;
# the caps keep peer-chosen names and values from growing the caches.
_NAME_CACHE: dict[str, bytes] = {}
_NAME_CACHE_MAX = 512
_PREFIX_CACHE_MAX = 1024
# Encoded string values ("text\0") already checked for NUL bytes; only short
# ones (cipher names and the like) are kept.
_STR_CACHE: dict[str, bytes] = {}
_STR_CACHE_MAX = 256
_STR_CACHE_LEN = 64


def _encode_name(name: object) -> bytes:
    raw = _NAME_CACHE.get(name)  # type: ignore[arg-type]
    if raw is None:
        raw = _check_name(name).encode("utf-8", "surrogateescape") + b"\0"
        if len(_NAME_CACHE) < _NAME_CACHE_MAX:
            _NAME_CACHE[name] = raw  # type: ignore[index]
    return raw


def _number_prefix(o: _Order, name: object) -> bytes:
    """Header + name of a NUMBER pair called ``name`` (validates the name; cached)."""
    raw_name = _encode_name(name)
    prefix = o.pair.pack(_NUMBER, len(raw_name), 8, 0) + raw_name
    if len(o.num_prefix) < _PREFIX_CACHE_MAX:
        o.num_prefix[name] = prefix  # type: ignore[index]
    return prefix


def _nest_prefix(o: _Order, name: object) -> bytes:
    """Header (datasize 0, patched later) + name of an NVLIST pair (validates the name; cached)."""
    raw_name = _encode_name(name)
    prefix = o.pair.pack(_NVLIST, len(raw_name), 0, 0) + raw_name
    if len(o.nest_prefix) < _PREFIX_CACHE_MAX:
        o.nest_prefix[name] = prefix  # type: ignore[index]
    return prefix


def _pair_prefix(o: _Order, kind: int, name: object, datasize: int, nitems: int) -> bytes:
    """Header + name of a pair (validates the name; cached under (kind, name, size)).

    The cache key's size is the datasize, or nitems for NVLIST_ARRAY.
    """
    raw_name = _encode_name(name)
    prefix = o.pair.pack(kind, len(raw_name), datasize, nitems) + raw_name
    if len(o.prefixes) < _PREFIX_CACHE_MAX:
        o.prefixes[(kind, name, nitems if kind == _NVLIST_ARRAY else datasize)] = prefix  # type: ignore[index]
    return prefix


def _encode_str(value: str, stack: list[tuple[Any, ...]], name: str) -> bytes:
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise NVError(f"{_path(stack, name)}: string cannot be encoded: {exc.reason}") from None
    if b"\0" in raw:
        raise NVError(f"{_path(stack, name)}: string contains a NUL byte")
    return raw


def _encode_cstr(value: str, stack: list[tuple[Any, ...]], name: str) -> bytes:
    """``value`` encoded with its NUL terminator (checked; short ones cached)."""
    raw = _encode_str(value, stack, name) + b"\0"
    if len(raw) <= _STR_CACHE_LEN and len(_STR_CACHE) < _STR_CACHE_MAX and type(value) is str:
        _STR_CACHE[value] = raw
    return raw


def _pairs_of(nvl: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    if type(nvl) is NVList:
        return iter(nvl._pairs)
    return iter(nvl.items())


def pack(nvl: Mapping[str, Any], *, byteorder: str | None = None,
         allow_descriptors: bool = True) -> bytes:
    """Pack ``nvl`` exactly as libnv does (``nvlist_send``'s bytes when it holds descriptors).

    ``byteorder`` None means the host's order, like libnv; "little"/"big"
    force one.  With ``allow_descriptors=False`` any DESCRIPTOR or
    DESCRIPTOR_ARRAY raises NVError (if_ovpn panics on them).

    The stream is written in one pre-order pass without recursion.  Nested
    headers get placeholder sizes, patched at the end when the total length
    and descriptor count are known; an NVLIST pair's datasize is patched when
    its child is finished.  Speed (every engine request and reply is packed
    here): the frequent pairs (NUMBER, BINARY, STRING, nested NVLists) are
    recognised by exact type and written from a cached header+name prefix;
    other types go through ``nvtype_of`` and ``_pack_rare``.
    """
    top_type = type(nvl)
    if top_type is not NVList and top_type is not dict and not isinstance(nvl, Mapping):
        raise TypeError(f"pack needs a Mapping or NVList, not {type(nvl).__name__}")
    o = _HOST if byteorder is None else _order(byteorder)
    empty_headers = o.empty_headers
    out = bytearray(empty_headers[nvl._flags if top_type is NVList else _list_flags(nvl)])
    pairs = iter(nvl._pairs) if top_type is NVList else _pairs_of(nvl)
    u64_pack, _, num_prefix, prefixes, nest_prefix = o.pack_tools
    str_cache = _STR_CACHE
    # One frame per open nested list: (parent's pair iterator, pair name,
    # offset of the pair header, child's header offset, array or None, next
    # array index, the child object).
    stack: list[tuple[Any, ...]] = []
    # Offsets of the nested headers, in stream order, and (offset, count) of
    # the descriptor pairs: made when the first one is written (most
    # requests are a single flat list and need neither).
    headers: list[int] | None = None
    descriptors: list[tuple[int, int]] | None = None
    # Ids of the lists on the current path (a cycle would never end), kept
    # only once the path is _CYCLE_DEPTH deep: a cycle gets there, and
    # ordinary requests never pay for the bookkeeping.
    open_ids: set[int] | None = None

    while True:
        for name, value in pairs:
            t = type(value)
            if t is int:
                prefix = num_prefix.get(name) or _number_prefix(o, name)
                try:
                    raw = u64_pack(value)
                except struct.error:
                    raise NVError(f"{_path(stack, name)}: number {value} is outside "
                                  f"[0, 2**64-1]") from None
                out += prefix
                out += raw
                continue
            if t is bytes:
                n = len(value)
                if not n:
                    raise NVError(f"{_path(stack, name)}: binary values cannot be empty "
                                  f"(libnv rejects size 0)")
                out += (prefixes.get((_BINARY, name, n))
                        or _pair_prefix(o, _BINARY, name, n, 0))
                out += value
                continue
            if t is str:
                raw = str_cache.get(value) or _encode_cstr(value, stack, name)
                n = len(raw)
                out += (prefixes.get((_STRING, name, n))
                        or _pair_prefix(o, _STRING, name, n, 0))
                out += raw
                continue
            if t is NVList:
                # A nested NVList (the common case, inlined).
                pair_offset = len(out)
                out += nest_prefix.get(name) or _nest_prefix(o, name)
                header_offset = len(out)
                if headers is None:
                    headers = [header_offset]
                else:
                    headers.append(header_offset)
                out += empty_headers[value._flags]
                child_pairs = value._pairs
                done = _pack_flat(out, o, child_pairs, stack, name)
                if done == len(child_pairs):
                    # Only NUMBER/BINARY/STRING pairs (a sockaddr, a key, counters):
                    # written in one call, no frame; it cannot contain a cycle.
                    o.u64.pack_into(out, pair_offset + 3, len(out) - header_offset)
                    out += o.marker_up
                    continue
                if open_ids is not None or len(stack) >= _CYCLE_DEPTH:
                    open_ids = _track_cycle(open_ids, nvl, stack, name, value)
                stack.append((pairs, name, pair_offset, header_offset, None, 0, value))
                pairs = iter(child_pairs[done:] if done else child_pairs)
                break       # the while loop continues with the rest of the child's pairs
            if t is dict:
                array, child, child_flags = None, value, 0
            elif t is list and value and all([type(v) is NVList for v in value]):
                array, child = value, value[0]
                child_flags = child._flags
            else:
                kind = _FAST_KIND.get(t) or int(nvtype_of(value))
                if kind == _NVLIST:
                    array, child = None, value
                elif kind == _NVLIST_ARRAY:
                    array, child = value, value[0]
                else:
                    at = len(out)
                    count = _pack_rare(out, o, kind, name, value, stack, allow_descriptors)
                    if count:
                        if descriptors is None:
                            descriptors = []
                        descriptors.append((at, count))
                    continue
                child_flags = _list_flags(child)

            # Descend into ``child`` (a mapping, or the first element of an array).
            if open_ids is not None or len(stack) >= _CYCLE_DEPTH:
                open_ids = _track_cycle(open_ids, nvl, stack, name, child)
            pair_offset = len(out)
            if array is None:
                out += nest_prefix.get(name) or _nest_prefix(o, name)
            else:
                n = len(array)
                out += (prefixes.get((_NVLIST_ARRAY, name, n))
                        or _pair_prefix(o, _NVLIST_ARRAY, name, 0, n))
            header_offset = len(out)
            if headers is None:
                headers = [header_offset]
            else:
                headers.append(header_offset)
            out += empty_headers[child_flags]
            stack.append((pairs, name, pair_offset, header_offset, array, 1, child))
            pairs = iter(child._pairs) if type(child) is NVList else _pairs_of(child)
            break
        else:
            # The current list is finished: close it and resume its parent.
            if not stack:
                break
            parent_pairs, name, pair_offset, header_offset, array, index, child = stack.pop()
            if open_ids is not None:
                open_ids.discard(id(child))
            if array is None:
                # NVLIST: datasize is the child's size without its UP marker.
                o.u64.pack_into(out, pair_offset + 3, len(out) - header_offset)
                out += o.marker_up
                pairs = parent_pairs
                continue
            out += o.marker_next
            if index == len(array):
                pairs = parent_pairs
                continue
            child = array[index]
            if open_ids is not None or len(stack) >= _CYCLE_DEPTH:
                open_ids = _track_cycle(open_ids, nvl, stack, name, child)
            header_offset = len(out)
            headers.append(header_offset)  # type: ignore[union-attr]  # made at the descent
            if type(child) is NVList:
                out += empty_headers[child._flags]
                pairs = iter(child._pairs)
            else:
                out += empty_headers[_list_flags(child)]
                pairs = _pairs_of(child)
            stack.append((parent_pairs, name, pair_offset, header_offset, array, index + 1, child))

    total = len(out) - HEADER_SIZE
    tail_pack_into = o.header_tail.pack_into
    if descriptors is None:
        tail_pack_into(out, 3, 0, total)
        if headers is not None:
            for offset in headers:
                tail_pack_into(out, offset + 3, 0, total - offset)
    else:
        # A header counts the descriptors of its list and of everything after it.
        ndesc = sum(count for _, count in descriptors)
        k = 0
        for offset in [0, *(headers or ())]:
            while k < len(descriptors) and descriptors[k][0] < offset:
                ndesc -= descriptors[k][1]
                k += 1
            tail_pack_into(out, offset + 3, ndesc, total - offset)
    return bytes(out)


def _pack_flat(out: bytearray, o: _Order, pairs: list[tuple[str, Any]],
               stack: Sequence[tuple[Any, ...]], list_name: str | None) -> int:
    """Append the leading NUMBER/BINARY/STRING pairs of ``pairs``; return how many.

    Whole if_ovpn requests and their nested lists are made of such pairs,
    and writing them here spares ``pack`` a stack frame and a restart of its
    loop per list; ``pack`` goes on with the remaining pairs, if any.  Checks and
    errors are ``pack``'s; ``stack`` and ``list_name`` (None for the top-level
    list) only serve the error messages.
    """
    u64_pack, _, num_prefix, prefixes, _ = o.pack_tools
    str_cache = _STR_CACHE
    done = 0
    for name, value in pairs:
        t = type(value)
        if t is int:
            prefix = num_prefix.get(name) or _number_prefix(o, name)
            try:
                raw = u64_pack(value)
            except struct.error:
                raise NVError(f"{_flat_path(stack, list_name, name)}: number {value} "
                              f"is outside [0, 2**64-1]") from None
            out += prefix
            out += raw
        elif t is bytes:
            n = len(value)
            if not n:
                raise NVError(f"{_flat_path(stack, list_name, name)}: binary values "
                              f"cannot be empty (libnv rejects size 0)")
            out += prefixes.get((_BINARY, name, n)) or _pair_prefix(o, _BINARY, name, n, 0)
            out += value
        elif t is str:
            raw = str_cache.get(value) or _encode_cstr(value, _flat_stack(stack, list_name), name)
            n = len(raw)
            out += prefixes.get((_STRING, name, n)) or _pair_prefix(o, _STRING, name, n, 0)
            out += raw
        else:
            return done
        done += 1
    return done


def _flat_stack(stack: Sequence[tuple[Any, ...]],
                list_name: str | None) -> list[tuple[Any, ...]]:
    return [*stack] if list_name is None else [*stack, (None, list_name)]


def _flat_path(stack: Sequence[tuple[Any, ...]], list_name: str | None, name: str) -> str:
    return _path(_flat_stack(stack, list_name), name)


_FLAT_TYPES = frozenset({int, bytes, str})
_CYCLE_DEPTH = 32


def _track_cycle(open_ids: set[int] | None, root: Mapping[str, Any],
                 stack: list[tuple[Any, ...]], name: str, child: object) -> set[int]:
    """Add ``child`` to the ids of the open lists; NVError if it is open already.

    The set is built from the stack the first time (the path is then
    _CYCLE_DEPTH deep).  The error names the first pair on the path that
    closed a loop, the same pair an eager check would have named.
    """
    if open_ids is None:
        open_ids = {id(root)}
        open_ids.update(id(frame[6]) for frame in stack)
    if id(child) in open_ids:
        seen = {id(root)}
        for i, frame in enumerate(stack):
            if id(frame[6]) in seen:
                raise NVError(f"{_path(stack[:i], frame[1])}: nvlist contains itself")
            seen.add(id(frame[6]))
        raise NVError(f"{_path(stack, name)}: nvlist contains itself")
    open_ids.add(id(child))
    return open_ids


def _pack_rare(out: bytearray, o: _Order, kind: int, name: str, value: Any,
               stack: list[tuple[Any, ...]], allow_descriptors: bool) -> int:
    """Append a pair of a type if_ovpn commands rarely use; return its descriptor count.

    Also the path for subclasses of int/str/bytes (IntEnum...) and bytearray.
    """
    raw_name = _NAME_CACHE.get(name) or _encode_name(name)
    namesize = len(raw_name)
    if kind == _NUMBER:
        if not 0 <= value <= U64_MAX:
            raise NVError(f"{_path(stack, name)}: number {value} is outside [0, 2**64-1]")
        out += o.pair.pack(_NUMBER, namesize, 8, 0)
        out += raw_name
        out += o.u64.pack(value)
    elif kind == _STRING:
        raw = _encode_str(value, stack, name)
        out += o.pair.pack(_STRING, namesize, len(raw) + 1, 0)
        out += raw_name
        out += raw
        out += b"\0"
    elif kind == _BINARY:
        if not value:
            raise NVError(f"{_path(stack, name)}: binary values cannot be empty "
                          f"(libnv rejects size 0)")
        out += o.pair.pack(_BINARY, namesize, len(value), 0)
        out += raw_name
        out += value
    elif kind == _BOOL:
        out += o.pair.pack(_BOOL, namesize, 1, 0)
        out += raw_name
        out += b"\1" if value else b"\0"
    elif kind == _NULL:
        out += o.pair.pack(_NULL, namesize, 0, 0)
        out += raw_name
    elif kind == _DESCRIPTOR:
        if not allow_descriptors:
            raise NVError(f"{_path(stack, name)}: descriptors are not allowed here")
        out += o.pair.pack(_DESCRIPTOR, namesize, 8, 0)
        out += raw_name
        out += o.i64.pack(value.index)
        return 1
    else:
        return _pack_array(out, o, kind, raw_name, value, stack, name, allow_descriptors)
    return 0


def _list_flags(nvl: Mapping[str, Any]) -> int:
    return nvl._flags if isinstance(nvl, NVList) else 0  # type: ignore[attr-defined]


def _path(stack: list[tuple[Any, ...]], name: str) -> str:
    """Path of a pair for pack error messages: ``pair 'encrypt'.'key'``."""
    return "pair " + ".".join([repr(frame[1]) for frame in stack] + [repr(name)])


def _pack_array(out: bytearray, o: _Order, kind: int, raw_name: bytes, value: Any,
                stack: list[tuple[Any, ...]], name: str, allow_descriptors: bool) -> int:
    """Append a BOOL/NUMBER/STRING/DESCRIPTOR array pair; return its descriptor count."""
    where = _path(stack, name)
    n = len(value)
    namesize = len(raw_name)
    if kind == _BOOL_ARRAY:
        out += o.pair.pack(_BOOL_ARRAY, namesize, n, n)
        out += raw_name
        out += bytes(1 if v else 0 for v in value)
        return 0
    if kind == _NUMBER_ARRAY:
        for v in value:
            if not 0 <= v <= U64_MAX:
                raise NVError(f"{where}: number {v} is outside [0, 2**64-1]")
        out += o.pair.pack(_NUMBER_ARRAY, namesize, 8 * n, n)
        out += raw_name
        out += o.array("Q", n).pack(*value)
        return 0
    if kind == _STRING_ARRAY:
        raw = b"".join(_encode_str(v, stack, name) + b"\0" for v in value)
        out += o.pair.pack(_STRING_ARRAY, namesize, len(raw), n)
        out += raw_name
        out += raw
        return 0
    if kind == _DESCRIPTOR_ARRAY:
        if not allow_descriptors:
            raise NVError(f"{where}: descriptors are not allowed here")
        out += o.pair.pack(_DESCRIPTOR_ARRAY, namesize, 8 * n, n)
        out += raw_name
        out += o.array("q", n).pack(*(d.index for d in value))
        return n
    raise NVError(f"{where}: cannot pack type {kind}")  # unreachable: nvtype_of covers all


# ---------------------------------------------------------------------------
# unpack


def _read_header(data: bytes, pos: int, nfds: int) -> tuple[int, _Order]:
    """Check one nvlist header at ``pos`` (libnv's nvlist_unpack_header).

    Returns the list's public flags and the byte order its own 0x80 bit
    announces.  The version byte is deliberately not checked (libnv doesn't).
    """
    left = len(data) - pos
    if left < HEADER_SIZE:
        raise NVError(f"{left} bytes left, too short for a {HEADER_SIZE}-byte nvlist header", pos)
    magic, _version, flags = data[pos], data[pos + 1], data[pos + 2]
    if magic != NVLIST_HEADER_MAGIC:
        raise NVError(f"nvlist header magic is 0x{magic:02x}, not 0x6c", pos)
    if flags & ~NV_FLAG_ALL_MASK:
        raise NVError(f"nvlist header flags 0x{flags:02x} have bits outside 0x83", pos)
    o = _BIG if flags & NV_FLAG_BIG_ENDIAN else _LITTLE
    ndesc, size = o.header_tail.unpack_from(data, pos + 3)
    if size != left - HEADER_SIZE:
        raise NVError(f"nvlh_size is {size} but {left - HEADER_SIZE} bytes follow the header", pos)
    if ndesc > nfds:
        raise NVError(f"nvlh_descriptors is {ndesc} but only {nfds} descriptors were passed", pos)
    return flags & NV_FLAG_PUBLIC_MASK, o


# C strings from the wire ("text\0", no other NUL) already decoded: pair names
# and short STRING values.  A hit proves the bytes are one NUL-terminated
# string of exactly that length, so the find + decode is skipped.  Capped in
# count and length, so hostile input cannot grow it.
_CSTR_CACHE: dict[bytes, str] = {}
_CSTR_CACHE_MAX = 1024
_CSTR_CACHE_LEN = 64


def _cache_cstr(raw: bytes, text: str) -> None:
    if len(raw) <= _CSTR_CACHE_LEN and len(_CSTR_CACHE) < _CSTR_CACHE_MAX:
        _CSTR_CACHE[raw] = text


def unpack(data: bytes | bytearray | memoryview, *, flags: int = 0, nfds: int = 0) -> NVList:
    """Unpack and validate a packed nvlist like libnv's ``nvlist_unpack``/``nvlist_recv``.

    ``flags`` must equal the top header's public flags (libnv: EILSEQ);
    ``nfds`` is the number of descriptors that came with the buffer (0 for
    ``nvlist_unpack``, so any descriptor is rejected).  Both byte orders are
    read; the top list's ``.byteorder`` records which one the buffer used.

    Speed (this runs for every engine command): a buffer of a shape seen
    before is read by its template (see ``_Template``); anything else goes
    through ``_unpack_stream``, which then learns the shape.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"unpack needs bytes, not {type(data).__name__}")
        data = bytes(data)
    if type(flags) is not int or flags & ~NV_FLAG_PUBLIC_MASK:
        _check_flags(flags, "unpack flags")
    if type(nfds) is not int or nfds < 0:
        raise ValueError(f"nfds must be a non-negative int, not {nfds!r}")
    end = len(data)
    if _templates_on:
        templates = _TOP_TEMPLATES.get(end)
        if templates:
            root = _empty_list(flags)
            for template in templates:
                if template.flags == flags and template.read(data, 0, end, root):
                    root.byteorder = template.order.name
                    return root
    root, learn = _unpack_stream(data, flags, nfds)
    if learn and _templates_on and end <= _TEMPLATE_MAX_SIZE:
        _learn(_TOP_TEMPLATES, end, _compile(data, 0, end, root, element=False))
    return root


def _unpack_stream(data: bytes, flags: int, nfds: int) -> tuple[NVList, bool]:
    """Read ``data`` pair by pair with every check; return (root, shape can be learned).

    One bounds check per pair covers name and data; a name seen before is
    one dict lookup (``_CSTR_CACHE``) instead of find + decode; the frequent
    types are tested first and the rare ones live in ``_unpack_rare``.  A
    pair that fails the quick checks goes through ``_check_pair``, which
    repeats every check in libnv's order and names the first one that
    fails.  The elements of an nvlist array are read by element templates
    when their shape is known (GET_PEER_STATS: one element per peer).
    """
    end = len(data)
    top_flags, o = _read_header(data, 0, nfds)
    if top_flags != flags:
        raise NVError(f"top-level flags 0x{top_flags:x} differ from the expected flags 0x{flags:x}"
                      f" (libnv: EILSEQ)", 0)
    root = _empty_list(top_flags)
    root.byteorder = o.name
    cur = root
    cur_pairs = root._pairs
    cur_first = root._first
    plain = not top_flags          # names are unique and case-sensitive
    learn = True                   # no arrays or rare types (seen so far)
    # Open lists above ``cur``: [parent list, array elements or None, next
    # element index, array name, offset of the current element's header,
    # learn that element's shape when it ends].
    stack: list[list[Any]] = []
    pair_unpack = o.pair.unpack_from
    u64_unpack = o.u64.unpack_from
    cstrs = _CSTR_CACHE
    pos = HEADER_SIZE

    while pos < end:
        start = pos
        try:
            kind, namesize, datasize, nitems = pair_unpack(data, pos)
        except struct.error:
            raise NVError(f"{end - pos} bytes left, too short for a pair header", pos) from None
        pos += HEADER_SIZE + namesize                  # start of the data
        vend = pos + datasize
        name = cstrs.get(data[start + HEADER_SIZE:pos])
        if name is None or vend > end:
            name = _check_pair(data, start, kind, namesize, datasize, end)

        if kind == _NUMBER:
            if datasize != 8:
                raise _pair_error(kind, name, start, f"datasize is {datasize}, not 8")
            value: Any = u64_unpack(data, pos)[0]
        elif kind == _BINARY:
            if datasize == 0:
                raise _pair_error(kind, name, start, "datasize 0 (libnv rejects empty binaries)")
            value = data[pos:vend]
        elif kind == _STRING:
            raw = data[pos:vend]
            value = cstrs.get(raw)
            if value is None:
                if datasize == 0 or raw.find(b"\0") != datasize - 1:
                    raise _pair_error(kind, name, start, "value is not exactly NUL-terminated")
                value = raw[:-1].decode("utf-8", "surrogateescape")
                _cache_cstr(raw, value)
        elif kind == _NVLIST:
            # The datasize is only checked for nonzero (and in bounds above):
            # the child's own header and markers delimit it.  The child header
            # does not change the byte order pairs are read in.
            if datasize == 0:
                raise _pair_error(kind, name, start, "datasize 0")
            child_flags, _ = _read_header(data, pos, nfds)
            child = _empty_list(child_flags)
            if plain and name not in cur_first:
                cur_first[name] = len(cur_pairs)
                cur_pairs.append((name, child))
            else:
                _append(cur, name, child, start)
            stack.append([cur, None, 0, name, pos, False])
            cur = child
            cur_pairs = child._pairs
            cur_first = child._first
            plain = not child_flags
            pos += HEADER_SIZE
            continue
        elif kind == _UP:
            # Name and datasize are not checked (datasize is not consumed).
            if not stack:
                raise NVError("NVLIST_UP marker at the top level", start)
            cur = stack.pop()[0]
            cur_pairs = cur._pairs
            cur_first = cur._first
            plain = not cur._flags
            continue
        elif kind == _NEXT:
            if not stack:
                raise NVError("NVLIST_ARRAY_NEXT marker outside an nvlist array", start)
            frame = stack[-1]
            elements, index = frame[1], frame[2]
            if elements is None:
                cur = stack.pop()[0]        # a plain nested list: NEXT acts like UP
            else:
                if frame[5]:                # the element read pair by pair: learn its shape
                    frame[5] = False
                    _learn(_ELEMENT_TEMPLATES, frame[3],
                           _compile(data, frame[4], pos, elements[index - 1], element=True))
                if index < len(elements) and _templates_on:
                    pos, index, order = _match_elements(data, pos, end, elements, index, frame[3])
                    if order is not None:
                        o = order
                        pair_unpack = o.pair.unpack_from
                        u64_unpack = o.u64.unpack_from
                if index == len(elements):
                    cur = stack.pop()[0]    # after the last element: go up
                else:
                    cur = elements[index]
                    cur._flags, o = _read_header(data, pos, nfds)
                    pair_unpack = o.pair.unpack_from
                    u64_unpack = o.u64.unpack_from
                    frame[2] = index + 1
                    frame[4] = pos
                    pos += HEADER_SIZE
            cur_pairs = cur._pairs
            cur_first = cur._first
            plain = not cur._flags
            continue
        elif kind == _NVLIST_ARRAY:
            learn = False
            if nitems == 0:
                raise _pair_error(kind, name, start, "nitems 0")
            if HEADER_SIZE * nitems > end - pos:
                raise _pair_error(kind, name, start,
                                  f"{nitems} items cannot fit in the {end - pos} bytes left")
            # Like libnv, all elements exist up front; one the stream never
            # reaches stays an empty list.  Element headers set the byte order.
            # The checks run in libnv's order: first element header, then the
            # name's uniqueness, then the elements.
            elements = [_empty_list(0) for _ in range(nitems)]
            index = 0
            if _templates_on:
                pos, index, order = _match_elements(data, pos, end, elements, 0, name)
                if order is not None:
                    o = order
                    pair_unpack = o.pair.unpack_from
                    u64_unpack = o.u64.unpack_from
            if index == 0:
                elements[0]._flags, o = _read_header(data, pos, nfds)
                pair_unpack = o.pair.unpack_from
                u64_unpack = o.u64.unpack_from
            if plain and name not in cur_first:
                cur_first[name] = len(cur_pairs)
                cur_pairs.append((name, elements))
            else:
                _append(cur, name, elements, start)
            if index == nitems:
                continue                    # every element read by a template
            if index:
                elements[index]._flags, o = _read_header(data, pos, nfds)
                pair_unpack = o.pair.unpack_from
                u64_unpack = o.u64.unpack_from
            stack.append([cur, elements, index + 1, name, pos, _templates_on])
            cur = elements[index]
            cur_pairs = cur._pairs
            cur_first = cur._first
            plain = not cur._flags
            pos += HEADER_SIZE
            continue
        else:
            learn = False
            value = _unpack_rare(data, kind, name, start, pos, datasize, nitems, nfds, o)

        # The pair is complete: add it (libnv's uniqueness rule) and move on.
        if plain and name not in cur_first:
            cur_first[name] = len(cur_pairs)
            cur_pairs.append((name, value))
        else:
            _append(cur, name, value, start)
        pos = vend
    return root, learn


# ---------------------------------------------------------------------------
# Shape templates: unpack's fast path for buffers shaped like one seen before.
#
# Why this is sound: what ``_unpack_stream`` checks and builds depends only
# on the headers, names and markers of a buffer (its "skeleton") and on the
# bytes of STRING values (NUL-terminated?); the bytes of NUMBER and BINARY
# values are copied out unchecked.  Once a buffer has been read pair by pair,
# a template records its skeleton; another buffer with the same skeleton
# byte for byte, whose strings pass the same check, goes through exactly the
# same checks with the same outcome, so the template builds the result
# directly: one struct call over the whole span, one tuple comparison.
# Where the skeleton would depend on the position (nvlh_size fields of an
# array element, which count to the end of the buffer), the template takes
# the field as a value and checks it.  Templates are only learned for spans
# of NUMBER/BINARY/STRING/NVLIST pairs whose headers count no descriptors,
# and whose every datasize stays inside the span, so neither nfds nor the
# span's position can change an outcome.  Anything that does not match goes
# the slow way (which names the error, if there is one).

_templates_on = True           # tests switch this off to get the reference result
_TEMPLATE_MAX_SIZE = 2048      # larger spans are never learned
_TEMPLATES_PER_KEY = 4         # the most recent shapes per key are kept
_TEMPLATE_KEYS_MAX = 32        # more keys than this: forget them all
_TOP_TEMPLATES: dict[int, list[_Template]] = {}       # len(buffer) -> templates
_ELEMENT_TEMPLATES: dict[str, list[_Template]] = {}   # nvlist array name -> templates


class _Template:
    """The shape of one nvlist span (a whole buffer, or one nvlist array element).

    ``unpack_from`` reads the span as skeleton and value items alternating,
    skeleton first and last; ``skeleton`` holds the skeleton items expected.
    ``lists`` rebuilds the nvlists, children first: (flags, names, lookup
    index, getter of the values, slot for the finished list or -1 for the
    span's own list).  ``flat``: a single list whose values are exactly the
    value items in order (SET_PEER, DEL_PEER, notifications...), built
    without getters.
    """

    __slots__ = ("unpack_from", "size", "skeleton", "order", "flags", "strings", "sizes",
                 "lists", "pad", "flat", "names", "first")

    def __init__(self, layout: str, skeleton: tuple[bytes, ...], order: _Order, flags: int,
                 strings: tuple[int, ...], sizes: tuple[tuple[int, int], ...],
                 lists: tuple[tuple[Any, ...], ...], children: int, flat: bool) -> None:
        compiled = struct.Struct(layout)
        self.unpack_from = compiled.unpack_from
        self.size = compiled.size
        self.skeleton = skeleton
        self.order = order
        self.flags = flags
        self.strings = strings
        self.sizes = sizes
        self.lists = lists
        self.pad = [None] * children
        self.flat = flat
        self.names = lists[-1][1]
        self.first = lists[-1][2]

    def read(self, data: bytes, base: int, end: int, root: NVList) -> bool:
        """Fill the empty ``root`` from ``data[base:]`` if it has this shape; else False."""
        try:
            items = self.unpack_from(data, base)
        except struct.error:        # fewer bytes left than the span
            return False
        if items[0::2] != self.skeleton:
            return False
        values: Any = items[1::2]
        if self.sizes:
            left = end - base - HEADER_SIZE
            for index, offset in self.sizes:
                if values[index] != left - offset:
                    return False
        if self.strings:
            values = list(values)
            for index in self.strings:
                raw = values[index]
                text = _CSTR_CACHE.get(raw)
                if text is None:
                    if raw.find(b"\0") != len(raw) - 1:
                        return False
                    text = raw[:-1].decode("utf-8", "surrogateescape")
                    _cache_cstr(raw, text)
                values[index] = text
        if self.flat:
            root._flags = self.flags
            root._pairs = list(zip(self.names, values))
            root._first = self.first.copy()
            return True
        values = [*values, *self.pad]
        for flags, names, first, getter, slot in self.lists:
            if slot < 0:
                nvl = root
                nvl._flags = flags
            else:
                nvl = _empty_list(flags)
                values[slot] = nvl
            nvl._pairs = list(zip(names, getter(values)))
            nvl._first = first.copy()
        return True


def _match_elements(data: bytes, pos: int, end: int, elements: list[NVList], index: int,
                    name: str) -> tuple[int, int, _Order | None]:
    """Fill ``elements[index:]`` by templates while they match, from the header at ``pos``.

    Returns the position after the last matched element (after its NEXT
    marker), the index of the first element not matched, and the byte order
    of the last matched element (None when none matched).
    """
    templates = _ELEMENT_TEMPLATES.get(name)
    if not templates:
        return pos, index, None
    last = None
    template = templates[-1]
    n = len(elements)
    while index < n:
        element = elements[index]
        if not template.read(data, pos, end, element):
            for template in templates:
                if template.read(data, pos, end, element):
                    break
            else:
                break
        pos += template.size
        index += 1
        last = template
    return pos, index, None if last is None else last.order


def _learn(table: dict[Any, list[_Template]], key: Any, template: _Template | None) -> None:
    """Keep ``template`` under ``key`` (bounded: see _TEMPLATES_PER_KEY, _TEMPLATE_KEYS_MAX)."""
    if template is None:
        return
    templates = table.get(key)
    if templates is None:
        if len(table) >= _TEMPLATE_KEYS_MAX:
            table.clear()
        templates = table[key] = []
    elif len(templates) >= _TEMPLATES_PER_KEY:
        del templates[0]
    templates.append(template)


def _compile(data: bytes, base: int, stop: int, root: NVList, *,
             element: bool) -> _Template | None:
    """The template of ``data[base:stop]``, which unpacked to ``root``; None if not learnable.

    ``element``: the span is one nvlist array element, ending with its NEXT
    marker, at a position other buffers may not share; otherwise it is a
    whole buffer.  Walks the span the way ``_unpack_stream`` moves through
    it, cross-checking names and pair counts against ``root``.
    """
    if stop - base > _TEMPLATE_MAX_SIZE or stop - base < HEADER_SIZE:
        return None
    order = _BIG if data[base + 2] & NV_FLAG_BIG_ENDIAN else _LITTLE
    pair_unpack = order.pair.unpack_from
    layout = ["<" if order is _LITTLE else ">"]
    skeleton: list[bytes] = []
    run = base                 # start of the skeleton bytes not yet emitted
    nvalues = 0
    strings: list[int] = []
    sizes: list[tuple[int, int]] = []

    def value(at: int, width: int, code: str) -> int:
        nonlocal run, nvalues
        layout.append(f"{at - run}s{code}")
        skeleton.append(data[run:at])
        run = at + width
        nvalues += 1
        return nvalues - 1

    def header(at: int) -> bool:
        if stop - at < HEADER_SIZE or any(data[at + 3:at + 11]):   # descriptors counted
            return False
        if element:
            sizes.append((value(at + 11, 8, "Q"), at - base))
        return True

    # Per nvlist, in pre-order: [the list, value slots of its pairs (("v", i)
    # a value item, ("c", k) the k-th child list)]; child_spec[k]: the spec
    # index of the k-th child list.
    specs: list[list[Any]] = [[root, []]]
    child_spec: list[int] = []
    if not header(base):
        return None
    cur, done = 0, 0           # current spec, pairs of it seen
    stack: list[tuple[int, int]] = []
    pos = base + HEADER_SIZE
    closed = False
    while pos < stop:
        if stop - pos < HEADER_SIZE:
            return None
        kind, namesize, datasize, _nitems = pair_unpack(data, pos)
        dstart = pos + HEADER_SIZE + namesize
        if dstart + datasize > stop:
            return None            # a bounds check that could depend on the position
        if kind == _UP or kind == _NEXT:
            if not stack:
                if element and kind == _NEXT and dstart == stop:
                    closed = True
                    pos = dstart
                    break
                return None
            if done != len(specs[cur][0]._pairs):
                return None
            cur, done = stack.pop()
            pos = dstart
            continue
        nvl, slots = specs[cur]
        if done >= len(nvl._pairs):
            return None
        name, item = nvl._pairs[done]
        if data[pos + HEADER_SIZE:dstart - 1].decode("utf-8", "surrogateescape") != name:
            return None
        if kind == _NUMBER:
            slots.append(("v", value(dstart, 8, "Q")))
        elif kind == _BINARY:
            slots.append(("v", value(dstart, datasize, f"{datasize}s")))
        elif kind == _STRING:
            index = value(dstart, datasize, f"{datasize}s")
            strings.append(index)
            slots.append(("v", index))
        elif kind == _NVLIST and type(item) is NVList:
            slots.append(("c", len(child_spec)))
            child_spec.append(len(specs))
            specs.append([item, []])
            if not header(dstart):
                return None
            stack.append((cur, done + 1))
            cur, done = len(specs) - 1, 0
            pos = dstart + HEADER_SIZE
            continue
        else:
            return None
        done += 1
        pos = dstart + datasize
    if element and not closed:
        return None
    layout.append(f"{stop - run}s")                    # the closing skeleton item
    skeleton.append(data[run:stop])
    if len(skeleton) != nvalues + 1 or nvalues > 255:
        return None

    lists = []
    slot_of_spec = {spec: nvalues + k for k, spec in enumerate(child_spec)}
    for k in range(len(specs) - 1, -1, -1):
        nvl, slots = specs[k]
        if len(slots) != len(nvl._pairs):
            return None
        resolved = [i if tag == "v" else nvalues + i for tag, i in slots]
        if len(resolved) >= 2:
            getter: Any = operator.itemgetter(*resolved)
        elif resolved:
            getter = functools.partial(_one_item, resolved[0])
        else:
            getter = _no_items
        lists.append((nvl._flags, tuple(n for n, _ in nvl._pairs), dict(nvl._first), getter,
                      slot_of_spec.get(k, -1)))
    flat = len(specs) == 1 and not sizes and specs[0][1] == [("v", i) for i in range(nvalues)]
    template = _Template("".join(layout), tuple(skeleton), order, root._flags, tuple(strings),
                         tuple(sizes), tuple(lists), len(child_spec), flat)
    if template.size != stop - base:
        return None
    return template


def _one_item(index: int, values: list[Any]) -> tuple[Any]:
    return (values[index],)


def _no_items(values: list[Any]) -> tuple[()]:
    return ()


def _check_pair(data: bytes, start: int, kind: int, namesize: int, datasize: int,
                end: int) -> str:
    """Every check of one pair's header and name, in libnv's order; return the name.

    The slow path of ``unpack``: names not in the cache, and pairs whose name
    or data run past the end (this raises the precise error).
    """
    if not (_NULL <= kind <= _DESCRIPTOR_ARRAY or kind == _NEXT or kind == _UP):
        raise NVError(f"pair type {kind} is not a valid type", start)
    pos = start + HEADER_SIZE
    if namesize == 0 or namesize > NV_NAME_MAX:
        raise NVError(f"namesize {namesize} is outside [1, {NV_NAME_MAX}]", start)
    if namesize > end - pos:
        raise NVError(f"namesize {namesize} exceeds the {end - pos} bytes left", start)
    raw = data[pos:pos + namesize]
    if raw.find(b"\0") != namesize - 1:
        raise NVError("pair name is not exactly NUL-terminated (namesize must be "
                      "strlen(name)+1)", start)
    name = raw[:-1].decode("utf-8", "surrogateescape")
    pos += namesize
    if datasize > end - pos:
        raise NVError(f"datasize {datasize} exceeds the {end - pos} bytes left", start)
    _cache_cstr(raw, name)
    return name


def _unpack_rare(data: bytes, kind: int, name: str, start: int, pos: int, datasize: int,
                 nitems: int, nfds: int, o: _Order) -> Any:
    """The value of a pair of a type the if_ovpn commands do not use (or an invalid type)."""
    if kind == _BOOL:
        if datasize != 1:
            raise _pair_error(kind, name, start, f"datasize is {datasize}, not 1")
        if data[pos] > 1:
            raise _pair_error(kind, name, start, f"value byte is {data[pos]}, not 0 or 1")
        return data[pos] == 1
    if kind == _NULL:
        if datasize != 0:
            raise _pair_error(kind, name, start, f"datasize is {datasize}, not 0")
        return None
    if kind == _DESCRIPTOR:
        if datasize != 8:
            raise _pair_error(kind, name, start, f"datasize is {datasize}, not 8")
        index = o.i64.unpack_from(data, pos)[0]
        if not 0 <= index < nfds:
            raise _pair_error(kind, name, start,
                              f"descriptor index {index} is outside [0, nfds={nfds})")
        return Descriptor(index)
    if kind == _BOOL_ARRAY:
        if nitems == 0 or datasize != nitems:
            raise _pair_error(kind, name, start,
                              f"nitems {nitems} and datasize {datasize} do not match")
        return [b != 0 for b in data[pos:pos + datasize]]
    if kind == _NUMBER_ARRAY:
        if nitems == 0 or datasize != 8 * nitems:
            raise _pair_error(kind, name, start,
                              f"nitems {nitems} and datasize {datasize} do not match")
        return list(o.array("Q", nitems).unpack_from(data, pos))
    if kind == _STRING_ARRAY:
        raw = data[pos:pos + datasize]
        if nitems == 0 or datasize == 0 or raw[-1] != 0 or raw.count(0) != nitems:
            raise _pair_error(kind, name, start, f"datasize {datasize} does not hold "
                              f"exactly {nitems} NUL-terminated strings")
        return [s.decode("utf-8", "surrogateescape") for s in raw[:-1].split(b"\0")]
    if kind == _DESCRIPTOR_ARRAY:
        if nitems == 0 or datasize != 8 * nitems:
            raise _pair_error(kind, name, start,
                              f"nitems {nitems} and datasize {datasize} do not match")
        indexes = o.array("q", nitems).unpack_from(data, pos)
        for index in indexes:
            if not 0 <= index < nfds:
                raise _pair_error(kind, name, start,
                                  f"descriptor index {index} is outside [0, nfds={nfds})")
        return [Descriptor(i) for i in indexes]
    raise NVError(f"pair type {kind} is not a valid type", start)


def _empty_list(flags: int) -> NVList:
    """A new empty NVList without NVList.__init__'s argument checks (unpack's hot path)."""
    nvl = NVList.__new__(NVList)
    nvl._flags = flags
    nvl._pairs = []
    nvl._first = {}
    nvl.byteorder = None
    return nvl


def _pair_error(kind: int, name: str, offset: int, reason: str) -> NVError:
    return NVError(f"{NVType(kind).label} pair {name!r}: {reason}", offset)


def _append(nvl: NVList, name: str, value: Any, offset: int) -> None:
    """Add an unpacked pair, enforcing uniqueness as nvlist_move_nvpair does."""
    key = name.translate(_ASCII_LOWER) if nvl._flags & NV_FLAG_IGNORE_CASE else name
    if key in nvl._first:
        if not nvl._flags & NV_FLAG_NO_UNIQUE:
            raise NVError(f"duplicate name {name!r} (libnv: EEXIST)", offset)
    else:
        nvl._first[key] = len(nvl._pairs)
    nvl._pairs.append((name, value))
