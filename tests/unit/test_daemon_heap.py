"""HeapTrimmer: malloc_trim after handshake bursts, at most once per interval."""
from __future__ import annotations

import platform

import pytest

from bsd_ovpn.binding import release_free_heap
from bsd_ovpn.daemon.heap import HeapTrimmer


def test_releases_once_per_interval_while_handshakes_finish() -> None:
    calls: list[int] = []
    t = HeapTrimmer(lambda: calls.append(1) or True, interval=1.0)
    assert t.deadline() is None
    t.tick(10.0)
    assert calls == []                        # nothing finished: nothing to give back
    t.note()
    assert t.deadline() == 0.0                # the first one at once
    t.tick(10.0)
    assert calls == [1] and t.pending == 0
    for i in range(50):                       # a burst: one release per interval
        t.note()
        t.tick(10.0 + i * 0.05)
    assert len(calls) == 3                    # at 11.0 and 12.0 (2.45 s of burst)
    assert t.deadline() == 12.0 + 1.0         # the tail of the burst is still owed ...
    t.tick(13.0)
    assert len(calls) == 4 and t.deadline() is None   # ... and paid once it is due


def test_stops_counting_where_the_libc_cannot_trim() -> None:
    t = HeapTrimmer(lambda: None)
    t.note()
    t.tick(1.0)
    t.note(5)
    assert not t.supported and t.pending == 0 and t.deadline() is None


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_heap_gives_holes_back_on_glibc() -> None:
    junk = [bytearray(b"x" * 65536) for _ in range(800)]      # ~50 MiB on the heap, touched
    del junk[::2]                             # ~25 MiB of holes glibc keeps by itself
    before = _rss_kib()
    assert release_free_heap() is True
    assert before - _rss_kib() > 15 * 1024, "malloc_trim gave back less than 15 MiB"
    del junk


def test_server_gc_tuning_freezes_startup_objects_and_raises_gen0() -> None:
    """Run in a child: the collector settings are process-wide."""
    import subprocess
    import sys
    code = ("import gc\n"
            "from bsd_ovpn.daemon.loop import SERVER_GC_THRESHOLD, tune_gc_for_server\n"
            "before = gc.get_freeze_count()\n"
            "tune_gc_for_server()\n"
            "assert gc.isenabled()\n"
            "assert gc.get_threshold()[0] == SERVER_GC_THRESHOLD, gc.get_threshold()\n"
            "assert gc.get_freeze_count() > before\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
