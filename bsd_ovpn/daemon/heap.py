"""Give the heap back after handshake bursts (server daemon).

Every TLS handshake allocates and frees tens of KiB (OpenSSL state, records,
certificates).  When a thousand clients connect at once their handshakes
overlap, the heap grows to the sum of them, and glibc keeps the freed chunks
in place: RSS stays at the burst's peak although the connected clients need
a fraction of it.  :class:`HeapTrimmer` returns that memory after the burst
(``binding.release_free_heap``, glibc's malloc_trim) at most once per
interval, so a steady stream of handshakes costs one cheap call per second
(about 2 ms for a 60 MiB heap), not one per handshake.
"""
from __future__ import annotations

from collections.abc import Callable


class HeapTrimmer:
    """Count finished handshakes; release free heap when some finished and the
    last release is ``interval`` seconds old."""

    def __init__(self, release: Callable[[], bool | None], interval: float = 1.0) -> None:
        self._release = release
        self.interval = interval
        self.pending = 0
        self.last: float | None = None
        self.releases = 0
        self.supported = True

    def note(self, n: int = 1) -> None:
        """``n`` handshakes (or dropped sessions) just gave their memory back to malloc."""
        if self.supported:
            self.pending += n

    def deadline(self) -> float | None:
        """When :meth:`tick` has work to do (None: nothing pending)."""
        if not self.pending:
            return None
        return 0.0 if self.last is None else self.last + self.interval

    def tick(self, now: float) -> None:
        d = self.deadline()
        if d is None or now < d:
            return
        self.pending = 0
        self.last = now
        if self._release() is None:
            self.supported = False               # not glibc / not built: stop counting
        else:
            self.releases += 1
