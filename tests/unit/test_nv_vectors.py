"""bsd_ovpn.nv against the golden vectors that real FreeBSD libnv produced.

Every file under shared/vectors/nvlist/ is one test case, so a vector added
later without a matching rule here fails instead of being silently skipped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bsd_ovpn.nv import Descriptor, NVError, NVList, NVType, nvtype_of, pack, unpack

VECTORS = Path("/work/shared/vectors/nvlist")
if not VECTORS.is_dir():  # a checkout without the shared tree: look beside the repo
    VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "nvlist"

# The tolerated blobs that are not what libnv's pack writes for their content
# (see the nv module docstring): unpack accepts them, pack normalises them.
NON_CANONICAL_TOLERATED = {
    "bool_array_value_2": "BOOL_ARRAY byte 2 reads as True, packs as 1",
    "missing_final_up": "pack writes the missing NVLIST_UP marker",
    "nested_version_7": "nested nvlh_version is ignored, pack writes 0",
    "nvlist_pair_datasize_wrong": "pack writes the true NVLIST datasize",
    "up_marker_named": "pack writes unnamed, empty markers",
    "version_ff": "nvlh_version is ignored, pack writes 0",
}


def _all_files() -> list[str]:
    if not VECTORS.is_dir():
        return []
    return sorted(str(p.relative_to(VECTORS)) for p in VECTORS.rglob("*") if p.is_file())


# -- JSON content <-> NVList ------------------------------------------------

def _normal(spec: Any) -> dict[str, Any]:
    """A JSON nvlist (a pair list, or {"flags","pairs"}) as {"flags", "pairs"}."""
    if isinstance(spec, dict):
        flags, pairs = spec["flags"], spec["pairs"]
    else:
        flags, pairs = 0, spec
    out = []
    for name, kind, value in pairs:
        if kind == "nvlist":
            value = _normal(value)
        elif kind == "nvlist_array":
            value = [_normal(v) for v in value]
        out.append([name, kind, value])
    return {"flags": flags, "pairs": out}


def build(spec: dict[str, Any]) -> NVList:
    """NVList from normalised JSON content, keeping pair order and every flag."""
    nvl = NVList(flags=spec["flags"])
    for name, kind, value in spec["pairs"]:
        nvl.add(name, _python_value(kind, value))
    return nvl


def _python_value(kind: str, value: Any) -> Any:
    if kind == "binary":
        return bytes.fromhex(value)
    if kind == "nvlist":
        return build(value)
    if kind == "nvlist_array":
        return [build(v) for v in value]
    if kind == "descriptor":
        return Descriptor(value)
    if kind == "descriptor_array":
        return [Descriptor(v) for v in value]
    return value


def to_json(nvl: NVList) -> dict[str, Any]:
    """The JSON content of an NVList, with libnv type names (so types are compared)."""
    pairs = []
    for name, value in nvl.items():
        kind = nvtype_of(value)
        if kind == NVType.BINARY:
            value = bytes(value).hex()
        elif kind == NVType.NVLIST:
            value = to_json(value)
        elif kind == NVType.NVLIST_ARRAY:
            value = [to_json(v) for v in value]
        elif kind == NVType.DESCRIPTOR:
            value = value.index
        elif kind == NVType.DESCRIPTOR_ARRAY:
            value = [d.index for d in value]
        pairs.append([name, kind.label, value])
    return {"flags": nvl.flags, "pairs": pairs}


def _descriptor_count(spec: dict[str, Any]) -> int:
    count = 0
    for _, kind, value in spec["pairs"]:
        if kind == "descriptor":
            count += 1
        elif kind == "descriptor_array":
            count += len(value)
        elif kind == "nvlist":
            count += _descriptor_count(value)
        elif kind == "nvlist_array":
            count += sum(_descriptor_count(v) for v in value)
    return count


def _libnv_call(txt: str) -> tuple[int, str]:
    """(flags argument, result) from the 'real libnv nvlist_unpack(buf, N, F): ...' line."""
    match = re.search(r"nvlist_unpack\(buf, (\d+), (\d+)\): (.*)", txt)
    assert match, f"no libnv call line in {txt!r}"
    return int(match.group(2)), match.group(3)


# -- the cases --------------------------------------------------------------

def _check_json_vector(path: Path) -> None:
    """NAME.json: pack(content) == NAME.bin, and unpack(NAME.bin) == content, types too."""
    meta = json.loads(path.read_text())
    blob = path.with_suffix(".bin").read_bytes()
    content = _normal(meta)
    order = "big" if meta.get("big_endian") else "little"
    assert (blob[2] & 0x80 != 0) == (order == "big")
    nfds = _descriptor_count(content)

    assert pack(build(content), byteorder=order) == blob

    got = unpack(blob, flags=meta["unpack_flags"], nfds=nfds)
    assert to_json(got) == content
    assert got.byteorder == order
    assert got == build(content)
    if nfds:
        # nvlist_unpack passes no fds: the descriptor vectors must be refused then,
        # and pack refuses them where descriptors are not allowed (toward the kernel).
        with pytest.raises(NVError):
            unpack(blob, flags=meta["unpack_flags"], nfds=0)
        with pytest.raises(NVError, match="descriptors are not allowed"):
            pack(got, byteorder=order, allow_descriptors=False)


def _check_json_blob(path: Path) -> None:
    """NAME.bin with a NAME.json: unpack -> pack gives the identical bytes."""
    meta = json.loads(path.with_suffix(".json").read_text())
    blob = path.read_bytes()
    got = unpack(blob, flags=meta["unpack_flags"], nfds=_descriptor_count(_normal(meta)))
    assert pack(got, byteorder=got.byteorder) == blob
    # The other byte order carries the same content and round-trips too.
    other = "little" if got.byteorder == "big" else "big"
    swapped = pack(got, byteorder=other)
    assert len(swapped) == len(blob) and swapped[2] == blob[2] ^ 0x80
    again = unpack(swapped, flags=meta["unpack_flags"], nfds=_descriptor_count(_normal(meta)))
    assert again == got and again.byteorder == other
    assert pack(again, byteorder=got.byteorder) == blob


def _check_invalid(path: Path) -> None:
    txt = path.with_suffix(".txt").read_text()
    flags, result = _libnv_call(txt)
    assert result.startswith("UNPACK-FAILED")
    with pytest.raises(NVError) as info:
        unpack(path.read_bytes(), flags=flags)
    assert info.value.offset is not None and info.value.reason
    assert f"offset {info.value.offset}" in str(info.value)


def _check_tolerated(path: Path) -> None:
    txt = path.with_suffix(".txt").read_text()
    flags, result = _libnv_call(txt)
    expected = _normal(json.loads(result))
    blob = path.read_bytes()
    got = unpack(blob, flags=flags)
    assert to_json(got) == expected
    # Re-packing gives what libnv's pack writes for that content.
    assert pack(got) == pack(build(expected))
    assert (pack(got) != blob) == (path.stem in NON_CANONICAL_TOLERATED)


def _check_txt(path: Path) -> None:
    """Every .txt describes a .bin beside it and names libnv's verdict."""
    assert path.with_suffix(".bin").is_file()
    flags, result = _libnv_call(path.read_text())
    assert flags in (0, 1, 2, 3)
    assert result.startswith("UNPACK-FAILED") == (path.parent.name == "invalid")


def _check_readme(path: Path) -> None:
    """The README documents the JSON fields these tests rely on."""
    text = path.read_text()
    for word in ("unpack_flags", "big_endian", "invalid/", "tolerated/", "descriptor"):
        assert word in text


def _case_for(rel: str) -> Any:
    path = VECTORS / rel
    folder = path.parent.name if path.parent != VECTORS else ""
    if rel == "README.md":
        return _check_readme
    if folder == "" and path.suffix == ".json" and path.with_suffix(".bin").is_file():
        return _check_json_vector
    if folder == "" and path.suffix == ".bin" and path.with_suffix(".json").is_file():
        return _check_json_blob
    if folder in ("invalid", "tolerated") and path.suffix == ".txt":
        return _check_txt
    if folder == "invalid" and path.suffix == ".bin" and path.with_suffix(".txt").is_file():
        return _check_invalid
    if folder == "tolerated" and path.suffix == ".bin" and path.with_suffix(".txt").is_file():
        return _check_tolerated
    return None


@pytest.mark.parametrize("rel", _all_files())
def test_vector_file(rel: str) -> None:
    case = _case_for(rel)
    assert case is not None, f"no test rule covers vector file {rel}: add one"
    case(VECTORS / rel)


def test_vectors_present() -> None:
    files = _all_files()
    assert len(files) > 100, f"vector folder {VECTORS} missing or nearly empty"
    stems = {Path(f).stem for f in files if f.startswith("tolerated/")}
    assert set(NON_CANONICAL_TOLERATED) <= stems


def test_unknown_file_has_no_rule() -> None:
    # What test_vector_file relies on to fail for a file nobody wrote a rule for.
    assert _case_for("new_vector.cbor") is None
    assert _case_for("invalid/orphan_without_txt.bin") is None
