"""CI's short fuzz pass: every target over its whole corpus, then a bounded hypothesis run.

The targets live in ``fuzz/targets.py`` and are shared with the atheris
long runs (``fuzz/run_atheris.py``), so any input a long run found -- and
merged into ``fuzz/corpus/<target>/`` -- is replayed here on every CI run.
Each corpus input must also stay under a memory bound (tracemalloc peak),
which catches a parser that trusts a length field and allocates for it.

The hypothesis part mutates corpus inputs (splice, overwrite, truncate) as
well as drawing fresh bytes, a few seconds per target.  Tests at the end
show that the harness really fails when a parser misbehaves, and hold the
minimal reproductions of bugs the long runs found in other modules.
"""
from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets as T  # noqa: E402

#: Peak Python allocation allowed while one input runs (bytes).  Inputs are at
#: most a few KiB; the server target builds TLS sessions, hence its own bound.
MEMORY_BOUND = {"server_endpoint": 48 << 20, "client_session": 48 << 20,
                "engine_commands": 32 << 20}
DEFAULT_MEMORY_BOUND = 16 << 20
#: hypothesis examples per target: a few seconds each on a slow CI machine.
EXAMPLES = {"server_endpoint": 25, "client_session": 25, "engine_commands": 60, "config": 80}
DEFAULT_EXAMPLES = 150


def corpus(name: str) -> list[bytes]:
    d = FUZZ / "corpus" / name
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def run_bounded(name: str, data: bytes) -> int:
    """Run one input under tracemalloc; return the peak and enforce the bound."""
    tracemalloc.start()
    try:
        T.run(name, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = MEMORY_BOUND.get(name, DEFAULT_MEMORY_BOUND)
    assert peak <= bound, f"{name}: {peak} bytes allocated for a {len(data)}-byte input"
    return peak


@pytest.mark.parametrize("name", sorted(T.TARGETS))
def test_corpus_replays_cleanly(name: str) -> None:
    inputs = corpus(name)
    assert len(inputs) >= 3, f"fuzz/corpus/{name} is missing or nearly empty"
    for data in inputs:
        run_bounded(name, data)


def test_corpus_stays_small() -> None:
    files = [p for p in (FUZZ / "corpus").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2 << 20
    assert max(p.stat().st_size for p in files) <= 8192


@st.composite
def fuzz_input(draw: st.DrawFn, name: str) -> bytes:
    """Fresh bytes, or a corpus input with a splice/overwrite/truncation."""
    seeds = corpus(name)
    if not seeds or draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if how == 0:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif how == 1 and data:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif how == 2:
            del data[pos:pos + draw(st.integers(1, 32))]
        else:
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))):]
    return bytes(data)


def _hypothesis_test(name: str):  # type: ignore[no-untyped-def]
    @settings(max_examples=EXAMPLES.get(name, DEFAULT_EXAMPLES), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=fuzz_input(name))
    def test(data: bytes) -> None:
        T.run(name, data)
    test.__name__ = f"test_hypothesis_{name}"
    return test


for _name in T.TARGETS:
    globals()[f"test_hypothesis_{_name}"] = _hypothesis_test(_name)


# --------------------------------------------------------------------- the harness can fail

def test_an_undocumented_exception_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from bsd_ovpn.proto import packet

    def broken(cls, data):  # type: ignore[no-untyped-def]
        raise IndexError("simulated parser bug")
    monkeypatch.setattr(packet.ControlPacket, "decode", classmethod(broken))
    seed = next(d for d in corpus("control_none") if d[0] == 0)
    with pytest.raises(IndexError):
        T.run("control_none", seed)


def test_a_lying_length_field_is_caught_by_the_memory_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bsd_ovpn import nv
    real = nv.unpack

    def trusting(data, **kw):  # type: ignore[no-untyped-def]
        _ = bytearray(64 << 20)            # what a trusted nvlh_size would cost
        return real(data, **kw)
    monkeypatch.setattr(nv, "unpack", trusting)
    with pytest.raises(AssertionError, match="allocated"):
        run_bounded("nv_unpack", corpus("nv_unpack")[0])


def test_an_unauthenticated_packet_is_a_property_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bsd_ovpn.proto import wrap

    monkeypatch.setattr(wrap.hmac, "compare_digest", lambda a, b: True)
    corrupt = bytes([2, 3]) + next(d for d in corpus("control_tls_auth") if d[0] == 0)[2:]
    with pytest.raises(T.FuzzPropertyError, match="corrupted"):
        T.run("control_tls_auth", corrupt)


def test_engine_state_change_on_a_failed_command_is_detected(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from bsd_ovpn.engine import commands
    real = commands.Engine._del_peer

    def leaky(self, ifs, nvl):  # type: ignore[no-untyped-def]
        ifs.flags ^= 1                       # a side effect before failing
        raise commands.CommandError(errno.ENOENT)
    monkeypatch.setitem(commands.Engine._SET, commands.Command.OVPN_DEL_PEER, leaky)
    assert real is not leaky
    vec = FUZZ.parents[1] / "shared" / "vectors" / "nvlist"
    if not vec.is_dir():
        vec = Path("/work/shared/vectors/nvlist")
    payload = (vec / "ovpn_del_peer.bin").read_bytes()
    cmd = T._CMDS.index(commands.Command.OVPN_DEL_PEER)
    seed = bytes([0, cmd, 1]) + len(payload).to_bytes(2, "big") + payload + b"\x00"
    with pytest.raises(T.FuzzPropertyError, match="changed the engine state"):
        T.run("engine_commands", seed)


# --------------------------------------------------------------------- findings (reproductions)

def test_peer_info_trailing_cr_is_refused_by_build() -> None:
    """Found by the keymethod long run: ``IV_CIPHERS=AES-128-GCM\\r:`` parses to a cipher
    named ``'AES-128-GCM\\r'``; written at the end of a line, parse() would strip the
    CR, so build() refuses a CR in a value as it refuses LF and NUL."""
    from bsd_ovpn.errors import ValidationError
    from bsd_ovpn.proto.keymethod import PeerInfo
    pi = PeerInfo.parse("IV_CIPHERS=AES-128-GCM\r:\n")
    with pytest.raises(ValidationError, match="CR, LF or NUL"):
        pi.build()
